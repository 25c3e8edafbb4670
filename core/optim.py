"""Optimisers for constrained parameters: momentum Stiefel Adam beside plain AdamW.

``StiefelAdam`` follows the adaptive ("Adam") version of the momentum Stiefel optimiser of
Kong, Wang & Tao (ICLR 2023, "Momentum Stiefel Optimizer, with Applications to
Suitably-Orthogonal Attention, and Optimal Transport"). A parameter X (n x m, n >= m,
X^T X = I) carries its momentum split the way the paper splits the cotangent vector:

* Y (m x m, skew-symmetric): the momentum *along* X, in X's own frame (the Lie-algebra
  coordinates), so it never needs transporting from one tangent space to the next;
* V (n x m, V^T X = 0): the momentum normal to X's columns (absent when n = m: then
  St(n, n) = O(n) and the whole update is X <- X expm(xi)).

One step, with the Euclidean gradient G and the canonical-type metric parameter a (the
paper's Definition 1; a = 1/2 is the canonical metric, b = a / (a - 1)):

    g_Y = (1 - b)/2 (X^T G - G^T X)            skew part of the gradient in X's frame
    g_V = G - X X^T G                          normal part
    Y <- beta1 Y - (1 - beta1) g_Y             momentum (phi_1 of the splitting)
    s_Y <- beta2 s_Y + (1 - beta2) g_Y^2       Adam's second moment, entry-wise
    xi = lr / c1 * Y / (sqrt(s_Y / c2) + eps)  skew (s_Y is symmetric), c_i bias corrections
    X <- X cay(xi),  cay(xi) = (I - xi/2)^-1 (I + xi/2)   rotation inside span(X)
    V <- beta1 V + (2 - 3a)/2 lr V Y - (1 - beta1) g_V,   s_V likewise  (phi_2)
    D = V / (sqrt(s_V / c2) + eps);  D <- D - X X^T D
    X <- X + lr / c1 D;  V <- V - lr X D^T V   (phi_3, the normal move)
    X <- polar(X) = X (X^T X)^(-1/2)           retraction onto the manifold

The paper writes the rotation as expm(xi); the Cayley transform (one of the options of the
authors' own code) is orthogonal too, equals expm(xi) to second order in the step and costs
a small linear solve. The paper's integrator keeps X on the manifold up to its splitting
error; the final polar retraction (in float64) makes it orthonormal to float precision
after any number of steps, and V is re-projected onto the new normal space. Both are what
"exactly orthogonal" needs and change nothing to first order.

Parameters in groups with ``stiefel=False`` get AdamW (Loshchilov & Hutter, 2019,
decoupled weight decay) from the same optimiser object, so Lightning's automatic
optimisation and a single LR scheduler drive both, as SODA's recipe needs (Stiefel Adam
for the rotation factors, AdamW for the spectral shift).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn as nn

from .errors import ConfigError

CANONICAL_METRIC = 0.5  # a of the paper's canonical-type metric family


def is_orthonormal(x: torch.Tensor, atol: float = 1e-5) -> bool:
    """Whether the columns (of a tall matrix; rows of a wide one) are orthonormal."""
    m = x if x.shape[-2] >= x.shape[-1] else x.transpose(-2, -1)
    gram = m.transpose(-2, -1).double() @ m.double()
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return bool(torch.linalg.matrix_norm(gram - eye).max() < atol)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor U V^T of X = U S V^T (a batch of matrices): the nearest
    matrix with orthonormal columns (rows, if wide). Through an SVD, so it is defined for
    any X, however badly conditioned."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def polar_near(x: torch.Tensor) -> torch.Tensor:
    """``polar`` of a near-orthonormal tall X as X (X^T X)^(-1/2), through the eigenvectors
    of the small m x m Gram matrix: much cheaper than an SVD of X, and exact when X^T X is
    close to I (as after an optimiser step); not for badly conditioned X."""
    evals, evecs = torch.linalg.eigh(x.transpose(-2, -1) @ x)
    return x @ (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.transpose(-2, -1)


def cayley(xi: torch.Tensor) -> torch.Tensor:
    """(I - xi/2)^-1 (I + xi/2): orthogonal for skew ``xi``, equal to expm(xi) to second
    order, and a linear solve instead of a matrix exponential."""
    eye = torch.eye(xi.shape[-1], dtype=xi.dtype, device=xi.device).expand_as(xi)
    return torch.linalg.solve(eye - xi / 2, eye + xi / 2)


def skew(a: torch.Tensor) -> torch.Tensor:
    return a - a.transpose(-2, -1)


class StiefelAdam(torch.optim.Optimizer):
    """Momentum Stiefel Adam (Kong et al., ICLR 2023) for ``stiefel=True`` groups, AdamW
    for the others; see the module docstring for the update.

    Args:
        params: parameters or param groups; a group may set ``stiefel`` (default below).
            Stiefel parameters are matrices (or stacks of matrices, ``(..., n, m)``) whose
            columns (rows, if wide) must be orthonormal; a matrix that is not is projected
            onto the manifold at its first step.
        lr: learning rate (the paper recommends one for both kinds, its Remark 1).
        betas: first and second moment decays.
        eps: Adam's epsilon.
        weight_decay: AdamW's decoupled weight decay; Stiefel groups ignore it (a norm-
            preserving parameter cannot decay).
        metric: a of the canonical-type metric (< 1; 0.5 canonical, 0 Euclidean).
        stiefel: the default of groups that do not say.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        metric: float = CANONICAL_METRIC,
        stiefel: bool = True,
    ) -> None:
        problems = []
        if not lr >= 0.0:
            problems.append(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            problems.append(f"betas must lie in [0, 1), got {tuple(betas)}")
        if not eps > 0.0:
            problems.append(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            problems.append(f"weight_decay must be >= 0, got {weight_decay}")
        if not metric < 1.0:
            problems.append(f"metric (the paper's a) must be < 1, got {metric}")
        if problems:
            raise ConfigError("StiefelAdam: " + "; ".join(problems) + ".")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            metric=metric,
            stiefel=stiefel,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["stiefel"]:
                for p in group["params"]:
                    if p.dim() < 2:
                        raise ConfigError(
                            f"StiefelAdam: a Stiefel parameter must be a matrix, got shape "
                            f"{tuple(p.shape)}; put vectors in a group with stiefel=False."
                        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["stiefel"]:
                self._stiefel_group(params, group)
            else:
                for p in params:
                    self._adamw(p, group)
        return loss

    # -- AdamW -----------------------------------------------------------------------------

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise ConfigError("StiefelAdam does not take sparse gradients.")
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        c1, c2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / c2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / c1)

    # -- Stiefel Adam ----------------------------------------------------------------------

    def _stiefel_group(self, params: list[torch.Tensor], group: dict) -> None:
        """Matrices of one shape are stacked so each step is a few batched operations
        (SODA has hundreds of small factors)."""
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            buckets[(tuple(p.shape), p.device, p.dtype)].append(p)
        for same in buckets.values():
            self._stiefel_bucket(same, group)

    def _stiefel_bucket(self, params: list[torch.Tensor], group: dict) -> None:
        wide = params[0].shape[-2] < params[0].shape[-1]

        def tall(t: torch.Tensor) -> torch.Tensor:  # work on tall (n >= m) matrices
            return t.transpose(-2, -1) if wide else t

        states = [self._stiefel_state(p, tall(p.detach())) for p in params]
        x = torch.stack([tall(p.detach()) for p in params]).double()
        g = torch.stack([tall(p.grad) for p in params]).double()
        n, m = x.shape[-2:]
        keys = ("Y", "sY") if n == m else ("Y", "sY", "V", "sV")
        # float64 moments; a state loaded by load_state_dict arrives in the parameter's dtype
        buf = {k: torch.stack([s[k] for s in states]).double() for k in keys}
        steps = x.new_tensor([s["step"] for s in states]).view(-1, *[1] * (x.dim() - 1))
        x = stiefel_adam_update(x, g, buf, steps, group)
        for i, (p, state) in enumerate(zip(params, states, strict=True)):
            p.copy_(tall(x[i]).to(p.dtype))
            for k in keys:
                state[k] = buf[k][i]

    def _stiefel_state(self, p: torch.Tensor, x: torch.Tensor) -> dict:
        """The moments of ``p`` (``x``: its tall view); a first step projects ``p`` onto
        the manifold if it starts off it."""
        state = self.state[p]
        if not state:
            if not is_orthonormal(x, atol=1e-4):
                x.copy_(polar(x.double()).to(x.dtype))  # x views p's storage
            n, m = x.shape[-2:]
            zeros = partial(torch.zeros, dtype=torch.float64, device=x.device)
            state.update(step=0, Y=zeros(*x.shape[:-2], m, m), sY=zeros(*x.shape[:-2], m, m))
            if n > m:
                state.update(V=zeros(x.shape), sV=zeros(x.shape))
        state["step"] += 1
        return state


def stiefel_adam_update(
    x: torch.Tensor,
    g: torch.Tensor,
    buf: dict[str, torch.Tensor],
    step: int | torch.Tensor,
    group: dict,
) -> torch.Tensor:
    """One Stiefel Adam step on tall matrices ``x`` (..., n, m) with gradients ``g``;
    updates the moment buffers in ``buf`` in place and returns the new (orthonormal) x.
    ``step`` (1-based) may be a tensor broadcasting against ``x``, one count per matrix."""
    beta1, beta2 = group["betas"]
    lr, eps, a = group["lr"], group["eps"], group["metric"]
    b = a / (a - 1)
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    x = polar_near(x)  # undo the rounding of fp32 / half storage
    xtg = x.transpose(-2, -1) @ g
    g_y = (1 - b) / 2 * skew(xtg)
    buf["Y"].mul_(beta1).add_(g_y, alpha=-(1 - beta1))
    buf["sY"].mul_(beta2).addcmul_(g_y, g_y, value=1 - beta2)
    xi = (lr / c1) * buf["Y"] / ((buf["sY"] / c2).sqrt() + eps)
    xi = (xi - xi.transpose(-2, -1)) / 2  # exactly skew despite rounding
    new_x = x @ cayley(xi)
    if "V" in buf:
        new_x = _normal_move(x, new_x, g - x @ xtg, buf, lr, c1, c2, beta1, beta2, eps, a)
    return polar_near(new_x)


def _normal_move(x, new_x, g_v, buf, lr, c1, c2, beta1, beta2, eps, a) -> torch.Tensor:
    """The paper's phi_2/phi_3 for n > m: momentum V normal to X moves X out of its span."""
    v, s_v = buf["V"], buf["sV"]
    s_v.mul_(beta2).addcmul_(g_v, g_v, value=1 - beta2)
    v.mul_(beta1).add_(v @ buf["Y"], alpha=(2 - 3 * a) / 2 * lr).add_(g_v, alpha=-(1 - beta1))
    d = v / ((s_v / c2).sqrt() + eps)
    d = d - new_x @ (new_x.transpose(-2, -1) @ d)
    moved = new_x + (lr / c1) * d
    v.sub_(lr * new_x @ (d.transpose(-2, -1) @ v))
    projected = polar_near(moved)
    v.sub_(projected @ (projected.transpose(-2, -1) @ v))  # keep V^T X = 0
    return projected


# -- splitting a model's parameters ----------------------------------------------------------


def stiefel_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that must stay on the Stiefel manifold, by name.

    A module declares them through a ``stiefel_parameters()`` method returning its own
    parameters (e.g. ``SODAAdapter`` with ``orthogonal="stiefel"``)."""
    declared = set()
    for module in model.modules():
        hook = getattr(module, "stiefel_parameters", None)
        if callable(hook):
            declared.update(id(p) for p in hook())
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) in declared}


def split_stiefel(
    model: nn.Module,
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(Stiefel parameters, every other trainable parameter), each by name."""
    stiefel = stiefel_parameters(model)
    rest = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in stiefel}
    return stiefel, rest


def stiefel_adam_for(
    model: nn.Module,
    *,
    lr: float,
    stiefel_lr: float | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> StiefelAdam:
    """StiefelAdam over ``model``'s trainable parameters: Stiefel Adam for the declared
    Stiefel matrices (``stiefel_lr``, default ``lr``), AdamW for the rest (decay on
    matrices only, as ``core.lightning.PeftModule`` does)."""
    stiefel, rest = split_stiefel(model)
    decay = [p for p in rest.values() if p.ndim >= 2]
    no_decay = [p for p in rest.values() if p.ndim < 2]
    groups = [
        {"params": params, "weight_decay": wd, "stiefel": False, "name": name}
        for name, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0))
        if params
    ]
    if stiefel:
        s_lr = lr if stiefel_lr is None else stiefel_lr
        groups.append(
            {"params": list(stiefel.values()), "stiefel": True, "lr": s_lr, "name": "stiefel"}
        )
    if not groups:
        raise ConfigError("stiefel_adam_for: the model has no trainable parameters.")
    return StiefelAdam(groups, lr=lr, betas=betas, weight_decay=weight_decay, stiefel=False)


__all__ = [
    "StiefelAdam",
    "is_orthonormal",
    "polar",
    "polar_near",
    "split_stiefel",
    "stiefel_adam_for",
    "stiefel_adam_update",
    "stiefel_parameters",
]
