"""The orthogonal fine-tuning family: a frozen weight re-parameterised by a learned
(quasi-)orthogonal transform T of its input space. Every neuron's weight vector w (a row of W,
flattened to in_channels * kernel for convolutions) becomes T w, so

    W' = W T^T,        y = W' x + b = W (T^T x) + b.

The transform is applied to the weight, not to the activations: its cost (out * d * b for
OFT) does not grow with the number of tokens, no activation is touched twice, and merging
writes exactly the weight the forward used. T starts as the identity, so every method starts
as the frozen model.

Training on linear layers is the exception: there the weight side needs the weight
gradient's GEMM, dW' = dy^T x, as large as the layer's own. The same function is then
computed on the activations, y = W (T^T x) + b, as HF PEFT's OFT does. OFT applies its
block-diagonal R^T to the inputs. qGOFT and BOFT run T^T as a few "grid ops" of
``core.kernels.grid_linear`` (each a batched product of small blocks over the token columns,
fused with the layer's GEMM): BOFT's m factors multiply out to one block-diagonal op with
blocks of b 2^(m-1), qGOFT's Givens stages to two or three ops whose blocks are about
sqrt(d) wide (``GivensGrid``). Their blocks are read off the per-row maps by applying them
to a few probe rows (``blocks_from_probes``), so no dense d x d matrix is formed. BOFT's
output scale s needs W h for its gradient, one (tokens, out) activation: BOFT takes the
activation side while that is no larger than what HF PEFT's BOFT keeps per layer, and the
weight side otherwise. A weight-side layer in training recomputes W' in its backward
instead of keeping it (one small block product), so a step holds no weight-sized tensor
per layer. Without gradients, qGOFT and BOFT take the side with fewer rows to transform
(tokens or out).

OFT (Qiu et al., NeurIPS 2023, "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning"): T = R = diag(R_1, ..., R_r), r blocks of size b (r * b = d). Each block is the
Cayley transform of a skew-symmetric S_i built from its strictly upper triangle (b(b-1)/2
numbers):

    R_i = (I - S_i)(I + S_i)^{-1}

which is the paper's (I + Q)(I - Q)^{-1} with Q = -S; the sign is HF PEFT's, kept so
weights move between the two unchanged. Parameters: r * b(b-1)/2 per layer (b(b-1)/2 with
``block_share``). COFT (the paper's constrained variant) projects each S_i back into the
Frobenius ball of radius eps / sqrt(stored blocks) before use, as HF PEFT does.

BOFT (Liu et al., ICLR 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"): T = B_m ... B_2 B_1 with B_i = P_i D_i P_i^T, D_i block-diagonal
with d/b Cayley blocks of size b and P_i the i-th block butterfly permutation (P_1 = I), and a
magnitude vector s on the outputs: W' = diag(s) W T^T. Parameters: m (d/b) b(b-1)/2 + out.
The permutations are index gathers, never dense d x d matrices.

qGOFT (Ma et al., ICML 2024, "Parameter Efficient Quasi-Orthogonal Fine-Tuning via Givens
Rotation"): T = N G_L ... G_1. Each stage G_s rotates d/2 disjoint coordinate pairs
(i, i XOR 2^s) by its own angle, so L = log2 d stages of parallel Givens rotations
connect every coordinate with every other (the butterfly pattern, (d/2) log2 d angles).
That is a (d/2) log2 d-dimensional family inside SO(d), not all of SO(d) (dimension
d(d-1)/2): it reaches every direction, not every rotation. The paper's structure is kept
(parallel Givens stages; flexible norm and relative angular adjustment under a soft
orthogonality regulariser); the exact quasi-Givens formula below is this implementation's.
The quasi-Givens 2x2 block of a pair is

    [[cos t, -sin(t + p)],
     [sin t,  cos(t + p)]]

a rotation by t whose second axis is turned by an extra relative angle p (p = 0: an exact
Givens rotation), and N = diag(n) is the flexible norm, a trainable scaling per input
dimension. Both relaxations are held near orthogonality by the soft regulariser

    lambda * (sum over blocks ||G^T G - I||_F^2 + ||N^T N - I||_F^2)
  = lambda * (sum 2 sin^2 p + sum (n^2 - 1)^2)

returned by ``aux_loss()`` (``core.aux_loss(model)`` sums it; the training loop adds it).
For d not a power of two, stages pair (i, i XOR 2^s) only where both are < d, and the top
stage also runs first: it hands the tail coordinates [2^(L-1), d) into the low block, whose
full butterfly then reaches every coordinate, and the final top stage hands it back, so
every output still depends on every input.

Layers: nn.Linear, transformers' Conv1D and nn.Conv1d/2d/3d (groups=1, zero padding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_float, check_int
from ..errors import CheckpointError, ConfigError, MergeError
from ..kernels import block_apply, butterfly_apply, cayley
from ..kernels.orthogonal import grid_linear, grid_rows, skew_from_upper, transposed_ops
from ..layers import Adapter, conv_forward, is_fan_in_fan_out, weight_dtype
from ..peft_format import PeftFormat, register_peft_format
from ..registry import register

SUPPORTED = "nn.Linear, transformers Conv1D and nn.Conv1d/2d/3d (groups=1, zero padding)"


# --- the base layer seen as rows of weight vectors -------------------------------------


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) or is_fan_in_fan_out(module):
        return "linear"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return "conv"
    return None


def layer_problem(module: nn.Module, method: str) -> str | None:
    """Why ``module`` is no layer this family can rotate, or None."""
    kind = layer_kind(module)
    if kind is None:
        return f"{method} wraps {SUPPORTED}"
    if kind == "conv" and (module.groups != 1 or module.padding_mode != "zeros"):
        return f"{method} on convolutions needs groups=1 and padding_mode='zeros'"
    return None


def in_features(module: nn.Module) -> int:
    """The dimension the transform acts on: in_features, or in_channels * kernel volume."""
    if is_fan_in_fan_out(module):
        return module.weight.shape[0]
    return module.weight[0].numel()


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_fan_in_fan_out(module) else module.weight.shape[0]


def weight_rows(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, d) rows of weight vectors, a view of its storage."""
    if is_fan_in_fan_out(base):
        return base.weight.T
    return base.weight.flatten(1)


def write_rows(base: nn.Module, rows: torch.Tensor) -> None:
    weight = base.weight
    rows = rows.to(weight.dtype)
    weight.data.copy_(rows.T if is_fan_in_fan_out(base) else rows.reshape(weight.shape))


def run_with_rows(base: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The base layer's output with its weight replaced by ``rows`` (out, d)."""
    if layer_kind(base) == "linear":
        return F.linear(x, rows, base.bias)
    weight = rows.reshape(base.weight.shape)
    y = conv_forward(base, x, weight)
    if base.bias is not None:
        y = y + base.bias.reshape(-1, *[1] * (weight.dim() - 2))
    return y


def divisor_hint(d: int) -> str:
    divisors = [k for k in range(2, min(d, 64) + 1) if d % k == 0]
    return ", ".join(map(str, divisors[-6:])) or "none below 64"


# --- skew-symmetric blocks and their Cayley transforms ---------------------------------


@functools.lru_cache(maxsize=64)
def upper_indices(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(b, b, 1, device=device)
    return rows, cols


def upper_from_skew(skew: torch.Tensor) -> torch.Tensor:
    rows, cols = upper_indices(skew.shape[-1], skew.device)
    return skew[..., rows, cols]


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """HF PEFT's truncated Neumann series (``use_cayley_neumann``), reproduced for parity.

    It expands (I + S)(I - S)^{-1} = I + 2 sum_k S^k as I + 2 (S + ... + S^(t-1)) + S^t with
    t = max(3, terms - 1), so terms=3 and 4 give the same series, and it approximates the
    transpose of the exact Cayley transform (I - S)(I + S)^{-1}. It is not exactly
    orthogonal.
    """
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
    if terms == 2:
        return eye + 2 * skew
    top = max(3, terms - 1)
    result, power = eye, eye
    for k in range(1, top + 1):
        power = power @ skew
        result = result + (1.0 if k == top else 2.0) * power
    return result


def identity_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """OFT's multiplicative dropout as HF PEFT implements it: int(p * n) random blocks of
    one random factor of (m, n, b, b) become the identity for this step."""
    factors, n, b, _ = blocks.shape
    count = int(p * n)
    if count == 0 or n == 1:
        return blocks
    mask = blocks.new_zeros(factors, n, 1, 1)
    factor = int(torch.randint(factors, ()))
    mask[factor, torch.randperm(n, device=blocks.device)[:count]] = 1.0
    eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
    return blocks * (1 - mask) + eye * mask


# --- butterfly permutations as index gathers -------------------------------------------


def butterfly_perm(d: int, b: int, factor: int) -> torch.Tensor:
    """Index form of BOFT's i-th butterfly permutation P (P v = v[perm]); factor 0 is I.

    Within each group of b * 2^factor coordinates, the chunks of b/2 are reordered even
    chunks first, then odd ones: that brings chunks 2^factor * b/2 apart into one block.
    """
    if factor == 0:
        return torch.arange(d)
    half = b // 2
    return torch.arange(d).reshape(-1, 2**factor, 2, half).transpose(1, 2).reshape(-1)


def chain_gathers(perms: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Gathers around each factor of B_k ... B_1 (B = P D P^T, so B v = (D v[inv])[perm]),
    with the perm of one factor and the inverse of the next fused into one gather; None
    where the gather is the identity."""
    gathers, previous = [], None
    for perm in perms:
        inverse = torch.argsort(perm)
        gathers.append(inverse if previous is None else previous[inverse])
        previous = perm
    gathers.append(previous)
    d = len(perms[0])
    return [None if torch.equal(g, torch.arange(d)) else g for g in gathers]


# --- Givens stages ---------------------------------------------------------------------


def givens_stage_bits(d: int) -> list[int]:
    """The bit s of each stage (pairs i, i XOR 2^s); see the module docstring."""
    levels = (d - 1).bit_length()
    bits = list(range(levels))
    return bits if d & (d - 1) == 0 else [levels - 1, *bits]


def givens_pairs(d: int, bit: int) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(d)
    j = i ^ (1 << bit)
    keep = (i < j) & (j < d)
    return i[keep], j[keep]


# --- grid blocks read off a transform by probing ----------------------------------------
#
# A transform P that only mixes coordinates within aligned blocks of k ("low") or only
# coordinates with equal i mod k ("high") is known from k (or width/k) probe rows: applying
# P to the rows e_j = sum of the unit vectors of every block's j-th coordinate returns every
# block's j-th column at once. That turns a chain of cheap per-row maps (Givens stages,
# butterfly factors) into the blocks of ``core.kernels.grid_linear``, whatever the token
# count: the probes are (k, width), not (tokens, width).


def probe_rows(kind: str, width: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    i = torch.arange(width)
    if kind == "low":
        return (torch.arange(k)[:, None] == i % k).to(dtype)
    return (torch.arange(width // k)[:, None] == i // k).to(dtype)


def blocks_from_probes(kind: str, probed: torch.Tensor, k: int, rows: int) -> torch.Tensor:
    """The grid blocks of P^T (``core.kernels.grid_apply``) from ``probed`` = the probe rows
    after the row map w -> P w; ``rows`` is the grid's number of rows H (H k >= d)."""
    width = probed.shape[1]
    if kind == "low":  # probed[j, blk k + c] = P[blk k + c, blk k + j]
        return probed.view(k, width // k, k).permute(1, 0, 2)[:rows]
    n = width // k  # probed[h0, h k + l] = P[h k + l, h0 k + l]
    return probed.view(n, n, k).permute(2, 0, 1)[:, :rows, :rows]


# --- the shared adapter: transform the weight rows, run the layer with them ------------


class RowTransformAdapter(Adapter):
    """Computes the base output with W' = diag(out_scale) W T^T; merges by writing W'.

    Subclasses define ``rotate(rows, inverse, train)`` (each row w -> T w, or T^{-1} w;
    ``train`` enables module dropout, which only the forward uses) and may expose
    ``out_scale``. Derived index tensors are cached per device rather than stored as
    buffers: they follow from the shapes, and ``to_empty`` would leave buffers as garbage.
    """

    replaces_base = True
    out_scale: torch.Tensor | None = None

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.d = in_features(base)
        self.out = out_features(base)
        self.opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        self._cache: dict[Any, list[torch.Tensor | None]] = {}
        # What a PEFT export must check; adapters never see their base layer afterwards.
        self.base_kind = type(base).__name__
        self.conv_geometry = conv_geometry(base) if layer_kind(base) == "conv" else None

    def cached(self, key: Any, device: torch.device, build: Callable[[], list]) -> list:
        if (key, device) not in self._cache:
            self._cache[key, device] = [None if t is None else t.to(device) for t in build()]
        return self._cache[key, device]

    def rotate(self, rows: torch.Tensor, inverse: bool = False, train: bool = False):
        raise NotImplementedError

    def before_use(self) -> None:
        """Hook run before the transform is built (COFT projects here)."""

    def transformed_rows(
        self, base: nn.Module, inverse: bool = False, train: bool = False
    ) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        rows = weight_rows(base).to(dtype)
        scale = self.out_scale
        if not inverse:
            rows = self.rotate(rows, train=train)
            return rows if scale is None else rows * scale[:, None]
        if scale is not None:
            if bool((scale == 0).any()):
                raise MergeError(f"{type(self).__name__}: a zero output scale cannot be undone.")
            rows = rows / scale[:, None]
        return self.rotate(rows, inverse=True)

    def rotate_inputs(self, rows: torch.Tensor, train: bool = False) -> torch.Tensor | None:
        """Each row v -> T^T v, or None when the subclass transforms weights only. Then
        y = W (T^T x) + b is computed on the activations: used in training, where the
        weight side would need the weight gradient's GEMM (dy^T x) that this avoids."""
        return None

    def grid_ops(self, train: bool = False) -> list[tuple[str, torch.Tensor]] | None:
        """The input transform h = T^T x as ``core.kernels`` grid ops (a few batched
        block products), or None where the subclass has no such form."""
        return None

    def on_inputs(self, x: torch.Tensor) -> bool:
        """Whether this call computes y = W (T^T x) + b on the activations (see the module
        docstring); subclasses with grid ops decide per call."""
        return torch.is_grad_enabled() and self.out_scale is None

    def fewer_token_rows(self, x: torch.Tensor) -> bool:
        """Whether x has fewer token rows than the weight has rows: without gradients the
        transform then costs less on the activations than on the weight."""
        return x.numel() // self.d < self.out

    def run_on_inputs(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        dtype = next(self.parameters()).dtype
        weight = weight_rows(base)
        ops = self.grid_ops(train=self.training)
        if ops is not None:
            y = grid_linear(x.reshape(-1, self.d), weight, base.bias, self.out_scale, ops)
            return y.view(*x.shape[:-1], y.shape[-1])
        if self.out_scale is not None:
            return None
        h = self.rotate_inputs(x.reshape(-1, self.d).to(dtype), train=self.training)
        if h is None:
            return None
        y = F.linear(h.to(weight.dtype), weight, base.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        self.before_use()
        if layer_kind(base) == "linear" and self.on_inputs(x):
            y = self.run_on_inputs(x, base)
            if y is not None:
                return y
        train = self.training
        rows = self.transformed_rows(base, train=train).to(base.weight.dtype)
        random = train and getattr(self, "dropout_p", 0.0) > 0  # module dropout
        if not torch.is_grad_enabled() or random or layer_kind(base) != "linear":
            return run_with_rows(base, x, rows)

        # The layer's backward needs W' for dx. Rather than keep a weight-sized tensor per
        # layer until the backward (HF PEFT's input-side OFT keeps none), it is recomputed
        # there from the parameters: a few small block products, no GEMM over the tokens.
        def recompute() -> torch.Tensor:
            with torch.no_grad():
                return self.transformed_rows(base).to(base.weight.dtype)

        return LinearWithRecomputedWeight.apply(x, rows, base.bias, recompute)

    def merge(self, base: nn.Module) -> None:
        self.before_use()
        write_rows(base, self.transformed_rows(base))

    def unmerge(self, base: nn.Module) -> None:
        write_rows(base, self.transformed_rows(base, inverse=True))

    def identity_rows(self) -> torch.Tensor:
        param = next(self.parameters())
        return torch.eye(self.d, dtype=param.dtype, device=param.device)

    def matrix(self) -> torch.Tensor:
        """The dense d x d input transform T (for inspection and tests; O(d^2) memory)."""
        return self.rotate(self.identity_rows()).T


class LinearWithRecomputedWeight(torch.autograd.Function):
    """``F.linear(x, rows, bias)`` whose backward recomputes ``rows`` for dx instead of
    keeping it: only x is saved; d(rows) = dy^T x flows on into the transform's graph."""

    @staticmethod
    def forward(ctx, x, rows, bias, recompute):
        ctx.recompute, ctx.has_bias = recompute, bias is not None
        ctx.save_for_backward(x)
        return F.linear(x, rows, bias)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = drows = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy2, ctx.recompute()).view(x.shape)
        if ctx.needs_input_grad[1]:
            drows = torch.mm(dy2.t(), x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy2.sum(0)
        return dx, drows, dbias, None


def conv_geometry(base: nn.Module) -> dict[str, tuple | None]:
    return {
        key: None if isinstance(getattr(base, key), str) else tuple(getattr(base, key))
        for key in ("kernel_size", "stride", "padding", "dilation")
    }


# --- block count / size shared by OFT and BOFT -----------------------------------------


def check_blocks(cfg: AdapterConfig, count_name: str, size_name: str, default_size: int) -> None:
    count, size = getattr(cfg, count_name), getattr(cfg, size_name)
    name = type(cfg).__name__
    if count is not None and size is not None:
        raise ConfigError(
            f"{name} takes either {count_name} (number of blocks) or {size_name}, not both "
            f"(they are tied by {count_name} * {size_name} = input features); got "
            f"{count_name}={count}, {size_name}={size}. Drop one of them."
        )
    if count is None and size is None:
        object.__setattr__(cfg, size_name, default_size)
    if count is not None:
        check_int(cfg, count_name, minimum=1)
    else:
        check_int(cfg, size_name, minimum=2)


def block_layout(d: int, count: int | None, size: int | None) -> tuple[int, int] | str:
    """(number of blocks, block size) for d features, or why they do not fit."""
    if size is not None:
        if d % size:
            return (
                f"its {d} input features (in_channels * kernel for convolutions) are not "
                f"divisible by block_size={size}; pick a divisor of {d} ({divisor_hint(d)})"
            )
        return d // size, size
    if d % count or d // count < 2:
        return (
            f"its {d} input features cannot be split into {count} blocks of at least 2; "
            f"pick a block count dividing {d} into blocks of 2 or more"
        )
    return count, d // count


def check_bool(cfg: object, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(
                f"{type(cfg).__name__}.{name} must be True or False, got {getattr(cfg, name)!r}."
            )


# --- OFT -------------------------------------------------------------------------------


@register("oft", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class OFT(AdapterConfig):
    """OFT config (Qiu et al., 2023): W' = W R^T with R block-diagonal Cayley rotations.

    Starts as the identity (every S_i = 0). Give ``block_size`` or ``r`` (block count),
    never both; with neither, block_size=32 (HF PEFT's default).

    Args:
        r: number of blocks per layer; the block size is then input features / r.
        block_size: size b of each orthogonal block; must divide the input features.
        neumann_terms: None (default) for the exact Cayley transform (the paper's, exactly
            orthogonal); an int >= 2 reproduces HF PEFT's truncated Neumann series
            (``use_cayley_neumann``; PEFT's default is 5 terms), faster but only
            approximately orthogonal.
        coft: COFT, the constrained variant: before each use, every S_i is projected into
            ||S_i||_F <= eps / sqrt(number of stored blocks) (HF PEFT's projection).
        eps: COFT radius.
        block_share: one block shared by all r positions (b(b-1)/2 parameters per layer).
        module_dropout: during training, int(p * r) random blocks are the identity each
            step (multiplicative dropout; HF PEFT builds but never applies it).
    """

    r: int | None = None
    block_size: int | None = None
    neumann_terms: int | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_blocks(self, "r", "block_size", default_size=32)
        if self.neumann_terms is not None:
            check_int(self, "neumann_terms", minimum=2)
        check_bool(self, "coft", "block_share")
        check_float(self, "eps", low=0.0, low_open=True)
        check_float(self, "module_dropout", low=0.0, high=1.0, high_open=True)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        problem = layer_problem(module, "OFT")
        if problem is None:
            layout = block_layout(in_features(module), self.r, self.block_size)
            problem = layout if isinstance(layout, str) else None
        return problem

    def build(self, module: nn.Module, path: str) -> OFTAdapter:
        n_blocks, size = block_layout(in_features(module), self.r, self.block_size)
        return OFTAdapter(module, n_blocks=n_blocks, block_size=size, cfg=self)


class OFTAdapter(RowTransformAdapter):
    """W' = W R^T, R = diag(R_1..R_r), R_i = Cayley(S_i); see the module docstring.

    ``Q`` holds the strictly upper triangles of the S_i (one row per block, or one shared
    row with ``block_share``), zero at start.
    """

    def __init__(self, base: nn.Module, *, n_blocks: int, block_size: int, cfg: OFT) -> None:
        super().__init__(base)
        self.n_blocks, self.block_size = n_blocks, block_size
        self.neumann_terms, self.dropout_p = cfg.neumann_terms, cfg.module_dropout
        self.coft, self.eps = cfg.coft, cfg.eps
        stored = 1 if cfg.block_share else n_blocks
        self.Q = nn.Parameter(torch.zeros(stored, block_size * (block_size - 1) // 2, **self.opts))

    def before_use(self) -> None:
        if self.coft and not self.Q.is_meta:
            with torch.no_grad():
                self.Q.copy_(project_to_ball(self.Q, self.eps / math.sqrt(self.Q.shape[0])))

    def blocks(self, train: bool = False) -> torch.Tensor:
        """The (r, b, b) rotation blocks."""
        if self.neumann_terms is None:
            blocks = cayley(self.Q, self.block_size)
        else:
            blocks = cayley_neumann(skew_from_upper(self.Q, self.block_size), self.neumann_terms)
        if train and self.dropout_p > 0:
            blocks = identity_dropout(blocks[None], self.dropout_p)[0]
        return blocks.expand(self.n_blocks, -1, -1)

    def rotate_inputs(self, rows: torch.Tensor, train: bool = False) -> torch.Tensor:
        return block_apply(rows, self.blocks(train).transpose(-1, -2))  # x R = (R^T x^T)^T

    def rotate(self, rows: torch.Tensor, inverse: bool = False, train: bool = False):
        blocks = self.blocks(train)
        if inverse:  # the Neumann series is not orthogonal, so invert rather than transpose
            blocks = torch.linalg.inv(blocks)
        return block_apply(rows, blocks)


def project_to_ball(upper: torch.Tensor, radius: float) -> torch.Tensor:
    """COFT: scale each skew block with ||S||_F > radius back onto the sphere of that radius
    (||S||_F = sqrt(2) ||upper||), as HF PEFT's ``_project_batch``."""
    norm = math.sqrt(2.0) * upper.norm(dim=-1, keepdim=True)
    return torch.where(norm <= radius, upper, upper * (radius / norm))


# --- BOFT ------------------------------------------------------------------------------


@register("boft", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class BOFT(AdapterConfig):
    """BOFT config (Liu et al., ICLR 2024): W' = diag(s) W (B_m ... B_1)^T with butterfly
    factors B_i = P_i D_i P_i^T (D_i: d/b Cayley blocks of size b), plus the output
    magnitude s. Starts as the identity (S = 0, s = 1).

    Give ``block_size`` or ``block_num``; with neither, block_size=4 (HF PEFT's default).
    ``butterfly_factors`` m is honoured on every device (HF PEFT silently uses m = 1 when
    its CUDA extension does not build, e.g. on every CPU). m >= 2 needs an even block size
    and input features divisible by b * 2^(m-1).

    Args:
        block_size: size b of each orthogonal block.
        block_num: number of blocks d/b per factor instead of ``block_size``.
        butterfly_factors: m, the number of butterfly factors (m = 1 is OFT plus s).
        module_dropout: during training, int(p * d/b) random blocks of one random factor are
            the identity each step (HF PEFT's ``boft_dropout``).
    """

    block_size: int | None = None
    block_num: int | None = None
    butterfly_factors: int = 1
    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_blocks(self, "block_num", "block_size", default_size=4)
        check_int(self, "butterfly_factors", minimum=1)
        check_float(self, "module_dropout", low=0.0, high=1.0, high_open=True)
        m = self.butterfly_factors
        if m >= 2 and self.block_size is not None and self.block_size % 2:
            raise ConfigError(
                f"BOFT.block_size must be even when butterfly_factors >= 2 (butterfly "
                f"permutations move half blocks), got block_size={self.block_size}; "
                f"use {self.block_size + 1} or {self.block_size - 1}, or butterfly_factors=1."
            )
        if m >= 2 and self.block_num is not None and self.block_num % 2 ** (m - 1):
            raise ConfigError(
                f"BOFT.block_num={self.block_num} must be a multiple of 2^(butterfly_factors-1)"
                f" = {2 ** (m - 1)} so that {m} butterfly factors fit; lower butterfly_factors "
                "or pick such a block_num."
            )

    def unsupported_reason(self, module: nn.Module) -> str | None:
        problem = layer_problem(module, "BOFT")
        if problem is not None:
            return problem
        d = in_features(module)
        layout = block_layout(d, self.block_num, self.block_size)
        if isinstance(layout, str):
            return layout
        size, m = layout[1], self.butterfly_factors
        span = size * 2 ** (m - 1)
        if m >= 2 and (size % 2 or d % span):
            return (
                f"butterfly_factors={m} with block size {size} needs an even block size and "
                f"input features divisible by block_size * 2^(m-1) = {span}, but it has {d}; "
                "lower butterfly_factors or the block size"
            )
        return None

    def build(self, module: nn.Module, path: str) -> BOFTAdapter:
        n_blocks, size = block_layout(in_features(module), self.block_num, self.block_size)
        return BOFTAdapter(module, n_blocks=n_blocks, block_size=size, cfg=self)


class BOFTAdapter(RowTransformAdapter):
    """W' = diag(scale) W (B_m ... B_1)^T; see the module docstring.

    ``Q`` (m, d/b, b(b-1)/2) holds the strictly upper triangles of the skew blocks (HF PEFT
    stores full b x b matrices and uses their skew part: 2.7x the numbers at b = 4 for the
    same function); ``scale`` (out,) is the magnitude vector s.
    """

    def __init__(self, base: nn.Module, *, n_blocks: int, block_size: int, cfg: BOFT) -> None:
        super().__init__(base)
        self.n_blocks, self.block_size = n_blocks, block_size
        self.m, self.dropout_p = cfg.butterfly_factors, cfg.module_dropout
        triangle = block_size * (block_size - 1) // 2
        self.Q = nn.Parameter(torch.zeros(self.m, n_blocks, triangle, **self.opts))
        self.scale = nn.Parameter(torch.ones(self.out, **self.opts))
        self.grid_block = boft_grid_block(self.d, block_size, self.m)

    @property
    def out_scale(self) -> torch.Tensor:
        return self.scale

    def factors(self, train: bool = False) -> torch.Tensor:
        """The (m, d/b, b, b) rotation blocks of the m butterfly factors."""
        blocks = cayley(self.Q, self.block_size)
        if train and self.dropout_p > 0:
            blocks = identity_dropout(blocks, self.dropout_p)
        return blocks

    def perms(self) -> list[torch.Tensor]:
        return [butterfly_perm(self.d, self.block_size, i) for i in range(self.m)]

    def rotate_factors(self, rows: torch.Tensor, inverse: bool = False, train: bool = False):
        """Rows w -> T w (or T^{-1} w) factor by factor: m block products and gathers."""
        factors = list(self.factors(train).unbind(0))
        perms = self.perms()
        if inverse:  # (B_m ... B_1)^{-1} = B_1^{-1} ... B_m^{-1}, B^{-1} = P D^T P^T
            factors = [f.transpose(-1, -2) for f in reversed(factors)]
            perms = perms[::-1]
        gathers = self.cached(inverse, rows.device, lambda: chain_gathers(perms))
        return butterfly_apply(rows, factors, gathers)

    def grid_ops(self, train: bool = False) -> list[tuple[str, torch.Tensor]] | None:
        """T^T as one block-diagonal op: factor i mixes coordinates only within aligned
        groups of b 2^i, so B_m ... B_1 is block-diagonal with blocks of b 2^(m-1),
        read off the factors with that many probe rows."""
        k = self.grid_block
        if k is None:
            return None
        dtype, device = self.Q.dtype, self.Q.device
        probes = self.cached(
            ("probes", dtype), device, lambda: [probe_rows("low", self.d, k, dtype)]
        )
        probed = self.rotate_factors(probes[0], train=train)
        return [("low", blocks_from_probes("low", probed, k, self.d // k))]

    def rotate(self, rows: torch.Tensor, inverse: bool = False, train: bool = False):
        ops = None if inverse else self.grid_ops(train)
        if ops is None:
            return self.rotate_factors(rows, inverse, train)
        return grid_rows(rows, transposed_ops(ops))

    def on_inputs(self, x: torch.Tensor) -> bool:
        """Per call: the activation side avoids the weight side's (out x d x tokens) GEMM
        for d(W'), but the gradient of s then needs W h, one (tokens, out) activation. It is
        taken while that is no larger than what HF PEFT's BOFT keeps per layer (the rotated
        and the scaled weight, out x d each, and d x d rotations), so memory stays below
        PEFT's. Without gradients: whichever side has fewer rows to transform."""
        if self.grid_block is None:
            return False
        if not torch.is_grad_enabled():
            return self.fewer_token_rows(x)
        if not self.scale.requires_grad:
            return True
        tokens = x.numel() // self.d
        return tokens * self.out <= 2 * self.out * self.d + 2 * self.d**2


# Combined BOFT blocks up to this size run as one grid op; wider (large b with many factors)
# keep the factor-by-factor chain, whose cost grows with m b instead of b 2^(m-1).
GRID_MAX_BLOCK = 256
# Narrower blocks are widened (zeros off their diagonal) to this when d allows: one batched
# GEMM of 32 x 32 blocks beats four of 8 x 8 on CPU.
GRID_MIN_BLOCK = 32


def boft_grid_block(d: int, b: int, m: int) -> int | None:
    """The block size of BOFT's combined factors as a grid op, or None (too wide)."""
    k = b * 2 ** (m - 1)
    if k > GRID_MAX_BLOCK or d % k:
        return None
    while k < GRID_MIN_BLOCK and d % (2 * k) == 0:
        k *= 2
    return k


# --- qGOFT -----------------------------------------------------------------------------


@register("qgoft", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class QGOFT(AdapterConfig):
    """qGOFT config (Ma et al., ICML 2024): W' = W (N G_L ... G_1)^T with quasi-Givens
    butterfly stages G_s and the flexible norm N; see the module docstring for the block
    and the regulariser. Starts as the identity (all angles 0, N = I).

    Args:
        relative_angle: learn the extra angle p per rotation (the relative angular
            adjustment); off, every block is an exact Givens rotation.
        flexible_norm: learn the per-dimension scaling N; off, N = I.
        orthogonality_weight: lambda of the soft orthogonality regulariser (``aux_loss``);
            our default, the paper tunes it per task.
    With both relaxations off this is GOFT, the paper's exactly orthogonal variant.
    """

    relative_angle: bool = True
    flexible_norm: bool = True
    orthogonality_weight: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "relative_angle", "flexible_norm")
        check_float(self, "orthogonality_weight", low=0.0)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        problem = layer_problem(module, "qGOFT")
        if problem is None and in_features(module) < 2:
            problem = "qGOFT rotates pairs of input features and needs at least 2"
        return problem

    def build(self, module: nn.Module, path: str) -> QGOFTAdapter:
        return QGOFTAdapter(module, cfg=self)


class QGOFTAdapter(RowTransformAdapter):
    """T = N G_L ... G_1 on each weight row; see the module docstring.

    ``theta`` and ``phi`` hold each rotation's angle t and relative angle p, stage after
    stage; ``norm`` is the diagonal of N.
    """

    def __init__(self, base: nn.Module, *, cfg: QGOFT) -> None:
        super().__init__(base)
        self.weight_lambda = cfg.orthogonality_weight
        self.bits = givens_stage_bits(self.d)
        self.sizes = [len(givens_pairs(self.d, s)[0]) for s in self.bits]
        rotations = sum(self.sizes)
        self.theta = nn.Parameter(torch.zeros(rotations, **self.opts))
        self.phi = nn.Parameter(torch.zeros(rotations, **self.opts)) if cfg.relative_angle else None
        self.norm = nn.Parameter(torch.ones(self.d, **self.opts)) if cfg.flexible_norm else None

    def stages(self, device: torch.device) -> list[torch.Tensor]:
        def build() -> list[torch.Tensor]:
            return [t for s in self.bits for t in givens_pairs(self.d, s)]

        return self.cached("pairs", device, build)

    def rotate(
        self, rows: torch.Tensor, inverse: bool = False, train: bool = False, pure: bool = False
    ) -> torch.Tensor:
        if inverse or pure:
            return self.rotate_stages(rows, inverse, pure)
        return grid_rows(rows, transposed_ops(self.grid_ops()))

    def on_inputs(self, x: torch.Tensor) -> bool:
        """Training: always the activation side (no d(W') GEMM). Without gradients:
        whichever side has fewer rows to transform."""
        return torch.is_grad_enabled() or self.fewer_token_rows(x)

    def angle_tables(self, grid: GivensGrid) -> torch.Tensor:
        """Every block entry of every stage, flat: [cos t, -sin(t + p), sin t, cos(t + p)]
        (the entries (i, i), (i, j), (j, i), (j, j) of the pair's block) over (stage, slot)
        of the padded width; unused slots get angle 0, the identity."""
        half = grid.padded // 2
        slots = self.cached(
            ("slots", half), self.theta.device, lambda: [slot_index(self.sizes, half)]
        )

        def spread(angles: torch.Tensor) -> torch.Tensor:
            return angles.new_zeros(len(self.sizes) * half).index_copy(0, slots[0], angles)

        theta = spread(self.theta)
        c1, s1 = theta.cos(), theta.sin()
        if self.phi is None:
            return torch.cat([c1, -s1, s1, c1])
        turned = theta + spread(self.phi)
        return torch.cat([c1, -turned.sin(), s1, turned.cos()])

    def grid_ops(self, train: bool = False) -> list[tuple[str, torch.Tensor]]:
        """T^T = G_1^T ... G_L^T N as a few grid ops: consecutive stages of bits below
        log2 k are one low op, the others one high op (``GivensGrid``). Each stage's blocks
        are written densely (one index_copy per group), multiplied out per group (small
        batched GEMMs) and transposed; N is folded into the op that comes first on x."""
        grid = givens_grid(self.d)
        entries = self.angle_tables(grid)
        plans = self.cached("plans", self.theta.device, lambda: stage_block_plans(self.d))
        ops = []
        for number, ((kind, stages), dst, src) in enumerate(
            zip(grid.groups, plans[0::2], plans[1::2], strict=True)
        ):
            n, q = (grid.rows, grid.k) if kind == "low" else (grid.k, grid.rows)
            mats = entries.new_zeros(len(stages) * n * q * q)
            mats = mats.index_copy(0, dst, entries.index_select(0, src)).view(-1, n, q, q)
            product = mats[0]
            for mat in mats[1:]:  # rotate order: the group's first stage acts first
                product = torch.bmm(mat, product)
            blocks = product.transpose(1, 2)
            if number == len(grid.groups) - 1 and self.norm is not None:
                norm = F.pad(self.norm, (0, grid.rows * grid.k - self.d), value=1.0)
                norm = norm.view(grid.rows, grid.k)
                blocks = blocks * (norm[:, None, :] if kind == "low" else norm.t()[:, None, :])
            ops.append((kind, blocks))
        return ops[::-1]

    def rotate_stages(
        self, rows: torch.Tensor, inverse: bool = False, pure: bool = False
    ) -> torch.Tensor:
        """Rows w -> T w (T^{-1} w) stage by stage, the formula as written; ``pure`` drops the
        relative angles and the norm. Used to invert and as the tests' reference."""
        pairs = self.stages(rows.device)
        theta = self.theta.split(self.sizes)
        phi = [None] * len(theta) if self.phi is None or pure else self.phi.split(self.sizes)
        norm = None if pure else self.norm
        order = range(len(self.bits))
        if inverse:
            if norm is not None:
                rows = rows / norm
            order = reversed(order)
        for k in order:
            left, right = pairs[2 * k], pairs[2 * k + 1]
            rows = givens_stage(rows, left, right, theta[k], phi[k], inverse)
        if not inverse and norm is not None:
            rows = rows * norm
        return rows

    def matrix(self, pure: bool = False) -> torch.Tensor:
        """Dense T; ``pure`` drops the relative angles and the norm: the rotation part."""
        return self.rotate(self.identity_rows(), pure=pure).T

    def aux_loss(self) -> torch.Tensor | None:
        if self.weight_lambda == 0 or (self.phi is None and self.norm is None):
            return None
        total = self.theta.new_zeros(())
        if self.phi is not None:
            total = total + 2 * torch.sin(self.phi).pow(2).sum()
        if self.norm is not None:
            total = total + (self.norm.pow(2) - 1).pow(2).sum()
        return self.weight_lambda * total


@dataclass(frozen=True)
class GivensGrid:
    """qGOFT's stages as grid ops: coordinates i = h k + l of the padded width 2^L; a stage
    of bit s pairs i with i XOR 2^s, within a grid row (low, 2^s < k) or within a grid
    column (high). ``rows`` H = ceil(d / k) is the grid height the tokens need."""

    bits: tuple[int, ...]
    padded: int
    k: int
    rows: int
    groups: tuple[tuple[str, tuple[int, ...]], ...]  # (kind, stage positions), in order


@functools.lru_cache(maxsize=64)
def givens_grid(d: int) -> GivensGrid:
    bits = givens_stage_bits(d)
    levels = (d - 1).bit_length()
    k = 1 << ((levels + 1) // 2)  # about sqrt(d): both kinds of blocks stay small
    groups: list[tuple[str, list[int]]] = []
    for position, bit in enumerate(bits):
        kind = "low" if (1 << bit) < k else "high"
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(position)
        else:
            groups.append((kind, [position]))
    return GivensGrid(
        tuple(bits), 1 << levels, k, -(-d // k), tuple((g, tuple(p)) for g, p in groups)
    )


def slot_index(sizes: list[int], half: int) -> torch.Tensor:
    """Where each angle goes in the (stages, half) slot tables: a stage's pairs (i, i + 2^s),
    i ascending, are the first of its slots (the pairs with i + 2^s < d form a prefix)."""
    return torch.cat([k * half + torch.arange(n) for k, n in enumerate(sizes)])


def stage_block_plans(d: int) -> list[torch.Tensor]:
    """Per group of ``givens_grid(d)``: where each stage's block entries go in its dense
    (stages, n, q, q) blocks (low: n = H grid rows of q = k; high: n = k columns of q = H)
    and which entry of ``QGOFTAdapter.angle_tables`` each is. Entries outside the grid
    belong to pairs with a partner >= d, which stay the identity and never touch the rest."""
    grid = givens_grid(d)
    half, stages = grid.padded // 2, len(grid.bits)
    plans: list[torch.Tensor] = []
    for kind, positions in grid.groups:
        dst, src = [], []
        for local, stage in enumerate(positions):
            bit = grid.bits[stage]
            slot = torch.arange(half)
            i = ((slot >> bit) << (bit + 1)) | (slot & ((1 << bit) - 1))
            j = i + (1 << bit)
            for entry, (row, col) in enumerate(((i, i), (i, j), (j, i), (j, j))):
                if kind == "low":  # block row // k, entry (row % k, col % k)
                    block, r, c, n, q = row // grid.k, row % grid.k, col % grid.k, grid.rows, grid.k
                else:  # column row % k, entry (row // k, col // k)
                    block, r, c, n, q = (
                        row % grid.k,
                        row // grid.k,
                        col // grid.k,
                        grid.k,
                        grid.rows,
                    )
                keep = (block < n) & (r < q) & (c < q)
                dst.append((((local * n + block) * q + r) * q + c)[keep])
                src.append(((entry * stages + stage) * half + slot)[keep])
        plans += [torch.cat(dst), torch.cat(src)]
    return plans


def givens_stage(
    rows: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    theta: torch.Tensor,
    phi: torch.Tensor | None,
    inverse: bool,
) -> torch.Tensor:
    """Apply one stage of quasi-Givens blocks [[cos t, -sin(t+p)], [sin t, cos(t+p)]] (or
    their inverses) to the coordinate pairs (left, right) of every row."""
    turned = theta if phi is None else theta + phi
    c1, s1, c2, s2 = theta.cos(), theta.sin(), turned.cos(), turned.sin()
    a, b = rows.index_select(1, left), rows.index_select(1, right)
    if not inverse:
        new_a, new_b = c1 * a - s2 * b, s1 * a + c2 * b
    else:  # inverse of [[c1, -s2], [s1, c2]], determinant cos p
        det = c1 * c2 + s1 * s2
        if bool((det.abs() < 1e-6).any()):
            raise MergeError("qGOFT: a relative angle reached +-pi/2; the block is singular.")
        new_a, new_b = (c2 * a + s2 * b) / det, (c1 * b - s1 * a) / det
    return rows.index_copy(1, left, new_a).index_copy(1, right, new_b)


# --- HF PEFT spelling ------------------------------------------------------------------


def peft_exportable(path: str, adapter: RowTransformAdapter, peft_type: str) -> None:
    """Refuse layers HF PEFT's OFT/BOFT would compute differently from omnipeft."""
    kind, geometry = adapter.base_kind, adapter.conv_geometry
    if kind == "Linear":
        return
    square = geometry is not None and len(set(geometry["kernel_size"])) == 1
    if kind != "Conv2d" or not square or geometry["dilation"] != (1, 1):
        raise CheckpointError(
            f"{path}: HF PEFT's {peft_type} supports nn.Linear and square nn.Conv2d without "
            f"dilation only, so this {kind} adapter cannot be exported with equal outputs."
        )
    if peft_type == "OFT" and geometry["kernel_size"] != (1, 1):
        raise CheckpointError(
            f"{path}: HF PEFT's OFT rotates convolution inputs through unfold/fold, which "
            "sums overlapping patches, so for kernels larger than 1x1 its (unmerged) outputs "
            "differ from OFT's W R^T, even at initialisation. Only 1x1 convolutions export."
        )
    uniform = all(
        geometry[k] is not None and len(set(geometry[k])) == 1 for k in ("stride", "padding")
    )
    if peft_type == "BOFT" and not uniform:
        raise CheckpointError(
            f"{path}: HF PEFT's BOFT runs convolutions with stride[0] and padding[0] only; "
            "this layer's stride or padding differs per axis, so it cannot be exported."
        )


def _targets_from_peft(pc: dict) -> dict[str, Any]:
    return {
        "targets": pc["target_modules"],
        "exclude": pc.get("exclude_modules") or None,
        "modules_to_save": pc.get("modules_to_save") or None,
    }


def _oft_from_peft(pc: dict) -> OFT:
    neumann = pc.get("use_cayley_neumann", True)  # PEFT's default when the key is absent
    return OFT(
        **_targets_from_peft(pc),
        r=int(pc.get("r") or 0) or None,
        block_size=int(pc.get("oft_block_size") or 0) or None,
        neumann_terms=int(pc.get("num_cayley_neumann_terms", 5)) if neumann else None,
        coft=bool(pc.get("coft", False)),
        eps=float(pc.get("eps", 6e-5)),
        block_share=bool(pc.get("block_share", False)),
        module_dropout=float(pc.get("module_dropout", 0.0)),
    )


def _oft_to_peft(cfg: OFT, adapters: dict[str, OFTAdapter]) -> dict:
    for path, adapter in adapters.items():
        peft_exportable(path, adapter, "OFT")
    fields = {
        "r": cfg.r or 0,
        "oft_block_size": cfg.block_size or 0,
        "use_cayley_neumann": cfg.neumann_terms is not None,
        "num_cayley_neumann_terms": cfg.neumann_terms or 5,
        "coft": cfg.coft,
        "eps": cfg.eps,
        "block_share": cfg.block_share,
        "module_dropout": cfg.module_dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_weights": True,
    }
    if cfg.neumann_terms is not None:
        # PEFT warns that Neumann adapters older than 0.18 used another series; ours is the
        # series of PEFT >= 0.18, so say so.
        fields["peft_version"] = "0.18.0"
    return fields


def _boft_from_peft(pc: dict) -> BOFT:
    return BOFT(
        **_targets_from_peft(pc),
        block_size=int(pc.get("boft_block_size") or 0) or None,
        block_num=int(pc.get("boft_block_num") or 0) or None,
        butterfly_factors=int(pc.get("boft_n_butterfly_factor", 1)),
        module_dropout=float(pc.get("boft_dropout", 0.0)),
    )


def _boft_to_peft(cfg: BOFT, adapters: dict[str, BOFTAdapter]) -> dict:
    for path, adapter in adapters.items():
        peft_exportable(path, adapter, "BOFT")
    return {
        "boft_block_size": cfg.block_size or 0,
        "boft_block_num": cfg.block_num or 0,
        "boft_n_butterfly_factor": cfg.butterfly_factors,
        "boft_dropout": cfg.module_dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_weights": True,
    }


def _boft_tensors(adapter: BOFTAdapter) -> dict[str, torch.Tensor]:
    scale = adapter.scale.detach()
    shape = (-1, 1) if adapter.conv_geometry is None else (1, -1)
    return {
        "boft_R": skew_from_upper(adapter.Q.detach(), adapter.block_size),
        "boft_s": scale.reshape(shape),
    }


def _boft_import_tensor(cfg: BOFT, name: str, value: torch.Tensor) -> torch.Tensor:
    if name == "scale":
        return value.reshape(-1)
    if value.shape[0] != cfg.butterfly_factors:
        raise CheckpointError(
            f"this PEFT BOFT adapter's config says boft_n_butterfly_factor="
            f"{cfg.butterfly_factors} but its boft_R holds {value.shape[0]} factor(s): HF PEFT "
            "silently falls back to 1 factor when its CUDA extension does not build (e.g. on "
            "CPU), and that is what it trained and computes. Set boft_n_butterfly_factor to "
            f"{value.shape[0]} in adapter_config.json to load what PEFT actually ran."
        )
    return upper_from_skew(0.5 * (value - value.transpose(-1, -2)))


register_peft_format(
    PeftFormat(
        peft_type="OFT",
        method="oft",
        # Embedding adapters map too, so they meet a clear "OFT wraps ..." refusal.
        tensor_names={"oft_R.weight": "Q", "oft_embedding_R.weight": "Q"},
        config_from_peft=_oft_from_peft,
        config_to_peft=_oft_to_peft,
        neutral={"bias": "none", "layers_to_transform": None, "layers_pattern": None},
    )
)

register_peft_format(
    PeftFormat(
        peft_type="BOFT",
        method="boft",
        tensor_names={"boft_R": "Q", "boft_s": "scale"},
        config_from_peft=_boft_from_peft,
        config_to_peft=_boft_to_peft,
        export_tensors=_boft_tensors,
        import_tensor=_boft_import_tensor,
        neutral={"bias": "none", "layers_to_transform": None, "layers_pattern": None},
    )
)
