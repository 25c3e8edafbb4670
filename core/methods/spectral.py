"""The spectral family: updates of a frozen weight written in a spectral basis of it.

Each method re-parameterises a frozen weight W0 (d_out x d_in) and merges into it exactly.

* FourierFT (Gao et al., ICML 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier
  Transform"): Delta W = alpha * Re(IDFT2(F)), F zero except n trainable coefficients at
  fixed random frequencies.
* SVFT (Lingam et al., NeurIPS 2024, "SVFT: Parameter-Efficient Fine-Tuning with Singular
  Vectors"): W0 = U S V^T, Delta W = U M V^T with M sparse on a fixed pattern.
* SVFit (Sun et al., 2024, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained
  Models Using Singular Values"): only the top-r singular values of W0 train.
* SODA (Zhang et al., WACV 2025, "Spectrum-Aware Parameter Efficient Fine-Tuning for
  Diffusion Models"): W0 = W_spec W_basis, W = (W_spec + Delta S) W_basis R, R an orthogonal
  Kronecker product.

Every supported base layer is seen as one (d_out, d_in) matrix: a Linear as it is,
transformers' Conv1D transposed, a convolution flattened to (out, in/groups * prod(kernel)).

What is saved: the trainable values, and any fixed pattern that defines the method and
cannot be re-derived from the shapes (FourierFT's frequencies, SVFT's random and top-k
positions). The SVD/LQ bases are recomputed in ``on_attach`` (non-persistent buffers):
saving them would cost about two full weight matrices per layer, and with the sign
convention of ``thin_svd``/``thin_lq`` the recomputed bases equal the originals to float
tolerance. On the ``meta`` device no decomposition runs: the bases are shape-only.

Training steps (same maths, fewer passes; each checked against the plain formula with
gradients in tests/core/test_spectral.py): FourierFT (``FourierLinear``) builds Delta W
with a real-output ``irfft2`` and gets the coefficients' gradient from 1-D FFTs of dy and x,
never forming dy^T x; SVFT/SVFit (``SingularUpdateLinear``) run one GEMM with W0 + U M V^T
and take dM from dy U and x V; SODA rotates the weight with one matmul per Kronecker factor.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_choice, check_float, check_int
from ..errors import CheckpointError, ConfigError
from ..kernels.dispatch import hand_written_step_fits
from ..kernels.lora import folds
from ..layers import Adapter, conv_forward, is_fan_in_fan_out, weight_dtype
from ..peft_format import PeftFormat, register_peft_format
from ..registry import register

# --- base layers as (d_out, d_in) matrices ----------------------------------------------

LINEAR_LAYERS = "nn.Linear or transformers Conv1D"
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_fan_in_fan_out(module)


def matrix_shape(base: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the base weight seen as a matrix."""
    shape = base.weight.shape
    if is_fan_in_fan_out(base):
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def weight_matrix(base: nn.Module) -> torch.Tensor:
    """The base weight as a (d_out, d_in) view (no copy)."""
    weight = base.weight
    return weight.T if is_fan_in_fan_out(base) else weight.reshape(weight.shape[0], -1)


def in_weight_layout(base: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """A (d_out, d_in) matrix in the base weight's own layout and dtype."""
    if is_fan_in_fan_out(base):
        matrix = matrix.T
    return matrix.reshape(base.weight.shape).to(base.weight.dtype)


def add_to_weight(base: nn.Module, delta: torch.Tensor) -> None:
    base.weight.data += in_weight_layout(base, delta)


def thin_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular vectors (U: d_out x rank, Vh: rank x d_in) in float32.

    Signs are fixed (each u_i's largest entry positive, v_i flipped with it) so a
    recomputation gives the same bases and saved coefficients keep their meaning.
    """
    u, _, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    u, vh = u[:, :rank], vh[:rank]
    peak = u.gather(0, u.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    signs = torch.where(peak < 0, -1.0, 1.0).to(u)
    return u * signs, vh * signs[:, None]


def thin_lq(matrix: torch.Tensor) -> torch.Tensor:
    """Q (r x d_in, orthonormal rows) of W = L Q, with diag(L) >= 0 so it is unique."""
    q, r = torch.linalg.qr(matrix.float().T)  # W^T = q r, so W = r^T q^T = L Q
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q)
    return (q * signs).T


def shape_only(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# --- FourierFT ----------------------------------------------------------------------------


def peft_pattern_value(patterns: dict, path: str, default: int) -> int:
    """HF PEFT's FourierFT per-module lookup: the first key matching the end of the name
    after a dot (a regular expression), else the full name itself, else the default."""
    for key, value in patterns.items():
        if re.match(rf".*\.{key}$", path):
            return value
    return patterns.get(path, default)


@functools.lru_cache(maxsize=16)
def _seeded_positions(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // d_in, flat % d_in])


def frequency_positions(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) spectrum (row, column) positions exactly as HF PEFT draws them: the first n
    entries of a seeded permutation of the d_out * d_in entries. Cached per shape because
    every layer of one shape shares them (the paper's shared entry matrix)."""
    return _seeded_positions(d_out, d_in, n, seed).clone()


FOURIER_INITS = ("gaussian", "zeros")


@register("fourierft", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class FourierFT(AdapterConfig):
    """FourierFT config (Gao et al., 2024); defaults follow HF PEFT's ``FourierFTConfig``.

    Delta W = scaling * Re(IDFT2(F)), where F (d_out x d_in) is zero except the n trainable
    coefficients c at fixed random positions (the spectral entry matrix), and IDFT2
    includes the 1/(d_out d_in) factor. n parameters per adapted matrix.

    The paper's code and HF PEFT draw c from N(0, 1), so by default the model does NOT
    start exactly as the frozen one (the initial Delta W is small: alpha * sqrt(n/2) /
    (d_out d_in) per entry); ``init="zeros"`` starts from the identity.

    Args:
        n_frequency: number of trainable spectral coefficients n per matrix.
        scaling: alpha, multiplies Delta W (PEFT's ``scaling``; tuned per task, PEFT
            suggests 100-150 for RoBERTa on GLUE and 300 for LLaMA and ViT).
        random_loc_seed: seed of the frequency positions; the same seed gives PEFT's.
        init: "gaussian" (c ~ N(0, 1), the paper's and PEFT's) or "zeros".
        n_frequency_pattern: per-module n, keyed like PEFT (a name-suffix regex).
        store_positions: keep the positions in the checkpoint, so a reload is exact even if
            another seed or torch version would draw others. PEFT folders carry only the
            seed, so adapters imported from PEFT use False and re-derive them.
    """

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    init: str = "gaussian"
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    store_positions: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_frequency")
        check_float(self, "scaling", low=0.0, low_open=True)
        check_int(self, "random_loc_seed", minimum=0)
        check_choice(self, "init", FOURIER_INITS)
        if not isinstance(self.store_positions, bool):
            raise ConfigError(
                f"FourierFT.store_positions must be True or False, got {self.store_positions!r}."
            )
        for key, n in self.n_frequency_pattern.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(
                    f"FourierFT.n_frequency_pattern[{key!r}] must be an int >= 1, got {n!r}; "
                    "give the number of spectral coefficients for the modules it names."
                )

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not is_linear_like(module):
            return f"FourierFT wraps {LINEAR_LAYERS} (as HF PEFT does)"
        return None

    def build(self, module: nn.Module, path: str) -> FourierFTAdapter:
        n = peft_pattern_value(self.n_frequency_pattern, path, self.n_frequency)
        d_out, d_in = matrix_shape(module)
        if n > d_out * d_in:
            raise ConfigError(
                f"FourierFT at {path}: n_frequency={n} exceeds the {d_out}x{d_in} = "
                f"{d_out * d_in} spectrum entries; lower n_frequency (or set it for this "
                "module through n_frequency_pattern)."
            )
        return FourierFTAdapter(
            module,
            n=n,
            scaling=self.scaling,
            seed=self.random_loc_seed,
            init=self.init,
            store_positions=self.store_positions,
        )


class FourierFTAdapter(Adapter):
    """``y + x Delta W^T`` with Delta W = scaling * Re(IDFT2(F)); see ``FourierFT``."""

    def __init__(
        self,
        base: nn.Module,
        *,
        n: int,
        scaling: float,
        seed: int,
        init: str,
        store_positions: bool,
    ):
        super().__init__()
        self.shape = matrix_shape(base)
        self.scaling = scaling
        self.fan_in_fan_out = is_fan_in_fan_out(base)
        device = base.weight.device
        self.spectrum = nn.Parameter(torch.zeros(n, device=device, dtype=weight_dtype(base)))
        if base.weight.is_meta:  # counting only: no permutation of d_out*d_in entries
            positions = shape_only(2, n, dtype=torch.long)
        else:
            positions = frequency_positions(*self.shape, n, seed).to(device)
        # The positions define the adapter; saved unless they come from a PEFT seed.
        self.register_buffer("indices", positions, persistent=store_positions)
        if init == "gaussian":
            with torch.no_grad():
                self.spectrum.normal_()
        # Delta W is dense, so x (W + Delta W)^T in one GEMM beats a second full-size GEMM
        # for x Delta W^T; only when the base weight is in the adapter's dtype.
        self.replaces_base = base.weight.dtype == self.spectrum.dtype

    def delta_weight(self) -> torch.Tensor:
        """scaling * Re(IDFT2(F)) as (d_out, d_in), in float32 or wider."""
        return fourier_delta(self.spectrum, self.indices, self.shape, self.scaling)

    def run_base(self, x: torch.Tensor, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        weight = weight_matrix(base)
        if hand_written_step_fits(x, weight, self.spectrum):
            return FourierLinear.apply(
                x, weight, base.bias, self.spectrum, self.indices, self.scaling
            )
        return F.linear(x, weight + self.delta_weight().to(weight.dtype), base.bias)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.replaces_base:  # already inside run_base's output
            return y
        delta = self.delta_weight().to(self.spectrum.dtype)
        return y + F.linear(x.to(delta.dtype), delta).to(y.dtype)

    def merge(self, base: nn.Module) -> None:
        add_to_weight(base, self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        add_to_weight(base, -self.delta_weight())


# FourierFT's Delta W and its gradient through real-input/real-output transforms. With
# F real, Re(IDFT2(F)) = IDFT2(F_sym) for the even part F_sym[r, k] = (F[r, k] + F[-r, -k])
# / 2, which is Hermitian, so ``irfft2`` computes it from the half spectrum k <= d_in / 2 at
# half the cost of a complex ``ifft2``. For the gradient, with g the output gradient, each
# coefficient's derivative is a sum over rows of products of the rows' own 1-D DFTs
# (below), so neither the (d_out, d_in) weight gradient g^T x nor a 2-D FFT of it is needed.


def half_spectrum_scatter(
    indices: torch.Tensor, d_out: int, d_in: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Where F_sym's half spectrum (d_out, d_in // 2 + 1) receives each coefficient's two
    halves: at (r, k) when k <= d_in / 2, and at (-r, -k) when -k mod d_in <= d_in / 2.
    Returns the (rows, cols) positions and, for each, the coefficient it takes."""
    rows, cols = indices
    half = d_in // 2 + 1
    mirror_rows, mirror_cols = (-rows) % d_out, (-cols) % d_in
    keep, mirror_keep = cols < half, mirror_cols < half
    at = (
        torch.cat([rows[keep], mirror_rows[mirror_keep]]),
        torch.cat([cols[keep], mirror_cols[mirror_keep]]),
    )
    source = torch.cat([keep.nonzero().flatten(), mirror_keep.nonzero().flatten()])
    return at, source


def fourier_delta(
    spectrum: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], scaling: float
) -> torch.Tensor:
    """scaling * Re(IDFT2(F)) (IDFT2 with its 1/(d_out d_in)) for F zero except ``spectrum``
    at ``indices``, computed as ``irfft2`` of F_sym's half spectrum (float32 or wider)."""
    d_out, d_in = shape
    values = spectrum.to(torch.promote_types(spectrum.dtype, torch.float32))
    if values.is_meta:  # shapes only: the scatter's positions need real indices
        return values.new_empty(shape)
    at, source = half_spectrum_scatter(indices, d_out, d_in)
    half = values.new_zeros(d_out, d_in // 2 + 1)
    half = half.index_put(at, (values * (scaling / 2))[source], accumulate=True)
    return torch.fft.irfft2(half, s=(d_out, d_in))


def gather_columns(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``z[:, index]`` for a 2-D complex ``z``; complex64 moves as one 8-byte word through
    ``torch.gather``, several times faster than complex indexing on CPU."""
    if z.dtype == torch.complex64:
        packed = z.view(torch.float64)
        return torch.gather(packed, 1, index.expand(z.shape[0], -1)).view(torch.complex64)
    return z[:, index]


FOURIER_GRAD_ROWS = 128  # rows of (dy, x) per chunk: transforms and gathers stay in cache


def fourier_spectrum_grad(
    dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, scaling: float
) -> torch.Tensor:
    """d loss / d c_t of y = x Delta W^T, for 2-D ``dy`` (m, d_out) and ``x`` (m, d_in).

    With P_m(r) = sum_a dy[m, a] e^{2 pi i a r / d_out} and Q_m(k) likewise over x,
    dL/dc_t = scaling / (d_out d_in) * Re(sum_m P_m(r_t) Q_m(k_t)). For real rows,
    P(r) = conj(rfft(dy)[r]) for r <= d_out / 2, else rfft(dy)[d_out - r] (same for Q), so
    Re(P Q) = Re(G) Re(X) - sign * Im(G) Im(X) with sign = +1 when both or neither are
    conjugated. Cost: two batches of 1-D real FFTs and n dot products of length m.
    """
    d_out, d_in = dy.shape[1], x.shape[1]
    rows, cols = indices
    row_conj, col_conj = rows <= d_out // 2, cols <= d_in // 2
    row_at = torch.where(row_conj, rows, d_out - rows)
    col_at = torch.where(col_conj, cols, d_in - cols)
    sums = dy.new_zeros(rows.numel(), 2)
    for start in range(0, dy.shape[0], FOURIER_GRAD_ROWS):
        part = slice(start, start + FOURIER_GRAD_ROWS)
        g = gather_columns(torch.fft.rfft(dy[part], dim=-1), row_at)
        q = gather_columns(torch.fft.rfft(x[part], dim=-1), col_at)
        sums += (torch.view_as_real(g) * torch.view_as_real(q)).sum(0)
    sign = torch.where(row_conj == col_conj, 1.0, -1.0).to(sums.dtype)
    return (sums[:, 0] - sign * sums[:, 1]) * (scaling / (d_out * d_in))


class FourierLinear(torch.autograd.Function):
    """y = x (W + Delta W)^T + b, FourierFT's training step: one GEMM with the summed weight
    forward, and a backward that gets the coefficients' gradient from 1-D FFTs of dy and x
    (``fourier_spectrum_grad``) instead of the (d_out, d_in) product dy^T x and a 2-D FFT.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spectrum, indices, scaling):
        merged = weight + fourier_delta(spectrum, indices, weight.shape, scaling).to(weight)
        ctx.scaling = scaling
        # W + Delta W only for dx: where x needs no gradient (the first adapted layer) the
        # backward keeps nothing of the weight's size, as autograd of x W^T would not
        ctx.save_for_backward(x, merged if ctx.needs_input_grad[0] else None, indices)
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, dy):
        x, merged, indices = ctx.saved_tensors
        need_x, need_w, need_b, need_c = ctx.needs_input_grad[:4]
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = (dy2 @ merged).view(x.shape) if need_x else None
        dweight = dy2.T @ x2 if need_w else None
        dbias = dy2.sum(0) if need_b else None
        dspectrum = fourier_spectrum_grad(dy2, x2, indices, ctx.scaling) if need_c else None
        return dx, dweight, dbias, dspectrum, None, None


# --- SVFT and SVFit -------------------------------------------------------------------------

SVFT_PATTERNS = ("plain", "banded", "random", "top_k")
SAVED_PATTERNS = ("random", "top_k")  # not derivable from the shape alone


def banded_positions(rank: int, band: int) -> torch.Tensor:
    """(2, k) positions (i, j) of a rank x rank matrix with |i - j| <= band."""
    rows, cols = [], []
    for offset in range(-band, band + 1):
        i = torch.arange(max(0, -offset), min(rank, rank - offset))
        rows.append(i)
        cols.append(i + offset)
    return torch.stack([torch.cat(rows), torch.cat(cols)])


def random_positions(rank: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct positions of a rank x rank matrix, seeded, in row-major order."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(rank * rank, generator=generator)[:count].sort().values
    return torch.stack([flat // rank, flat % rank])


def top_alignment_positions(u: torch.Tensor, vh: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` positions (i, j) with the largest singular-vector alignment |u_i . v_j|.

    The absolute value is used because each singular pair's sign is arbitrary.
    """
    alignment = (u.T @ vh.T).abs()  # (rank, rank); needs d_out == d_in
    flat = alignment.flatten().topk(count).indices.sort().values
    rank = alignment.shape[0]
    return torch.stack([flat // rank, flat % rank])


def band_count(rank: int, band: int) -> int:
    """Entries of a rank x rank band of half-width ``band``: r(2d+1) - d(d+1)."""
    return rank * (2 * band + 1) - band * (band + 1)


@register("svft", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class SVFT(AdapterConfig):
    """SVFT config (Lingam et al., 2024).

    W0 = U S V^T (thin SVD, frozen) and W = W0 + U M V^T, M (r x r) sparse with trainable
    values on a fixed pattern, r = min(d_out, d_in) (or ``rank``). With d = min(off_diag,
    r - 1) the trainable count per matrix is

        plain:  r                          (M diagonal)
        banded: r(2d+1) - d(d+1)           (|i - j| <= d)
        random: r(2d+1) - d(d+1)           (that many distinct positions, seeded)
        top_k:  r(2d+1) - d(d+1)           (largest |u_i . v_j|; needs d_out == d_in)

    so the three sparse patterns share the banded budget, as in the authors' code. M starts
    at zero, so the model starts as the frozen one. (The authors' released code instead
    draws M from a Kaiming normal times a learnable sigmoid gate, and samples the random
    positions with replacement; here they are distinct, so each coefficient is its own.)

    Args:
        pattern: "plain", "banded", "random" or "top_k".
        off_diag: d, the band half-width that sets the budget of the sparse patterns
            (the paper's SVFT^B_d / SVFT^R_d / SVFT^T_d); 0 with "plain".
        rank: use only the top-``rank`` singular vectors (None: all of them).
        seed: seed of the random pattern.
    """

    pattern: str = "plain"
    off_diag: int = 0
    rank: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "pattern", SVFT_PATTERNS)
        check_int(self, "off_diag", minimum=0)
        check_int(self, "seed", minimum=0)
        if self.rank is not None:
            check_int(self, "rank")
        if self.pattern == "plain" and self.off_diag != 0:
            raise ConfigError(
                f"SVFT(pattern='plain') trains the diagonal of M only, so off_diag must be 0, "
                f"got {self.off_diag}; use pattern='banded' (or 'random', 'top_k') for "
                "off-diagonal coefficients."
            )

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not is_linear_like(module):
            return f"SVFT wraps {LINEAR_LAYERS}"
        d_out, d_in = matrix_shape(module)
        if self.pattern == "top_k" and d_out != d_in:
            return (
                f"pattern='top_k' ranks the alignments u_i . v_j, defined only for square "
                f"weights, but this one is {d_out}x{d_in}; use pattern='random' or 'banded'"
            )
        return None

    def build(self, module: nn.Module, path: str) -> SingularVectorAdapter:
        return SingularVectorAdapter(
            module, pattern=self.pattern, off_diag=self.off_diag, rank=self.rank, seed=self.seed
        )


@register("svfit", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class SVFit(AdapterConfig):
    """SVFit config (Sun et al., 2024).

    W0 = W_r + W_e with W_r = U_r diag(s_r) V_r^T the best rank-r approximation; only s_r
    trains, U_r, V_r and the residual W_e stay frozen:

        W = U_r diag(s_r + delta) V_r^T + W_e = W0 + U_r diag(delta) V_r^T,

    implemented in the second form (delta starts at zero, so the model starts as the frozen
    one; its gradient is that of s_r). r parameters per matrix. The paper keeps the top
    singular values holding over 99% of the matrix's information; its budgets (16x fewer
    than LoRA r=8, i.e. 768 per RoBERTa-base matrix) amount to all of them, hence
    ``r=None`` (all, r = min(d_out, d_in)) by default. With all singular values this
    coincides with SVFT(pattern="plain").

    Args:
        r: number of top singular values to train (None: all of them).
    """

    r: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is not None:
            check_int(self, "r")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return None if is_linear_like(module) else f"SVFit wraps {LINEAR_LAYERS}"

    def build(self, module: nn.Module, path: str) -> SingularVectorAdapter:
        return SingularVectorAdapter(module, pattern="plain", off_diag=0, rank=self.r, seed=0)


SPARSE_GATHER_LIMIT = 2  # k <= this * rank: gather the k entries; above, a dense rank^2 GEMM


class CoefficientPattern:
    """SVFT's M (rank x rank): ``coeffs`` at fixed (row, col) ``positions``, with the
    products the forward and backward need, each by the cheapest route for the layout:

    * "band" (``band`` given: the positions are ``banded_positions(rank, band)``, the
      diagonal when 0): one elementwise product per diagonal i - j = const;
    * "sparse" (k <= 2 rank): gathers of the k entries;
    * "dense": M formed, one rank^2 GEMM per product.
    """

    def __init__(self, positions: torch.Tensor, rank: int, band: int | None = None):
        self.rows, self.cols = positions
        self.rank = rank
        self.diagonals = None if band is None else list(band_diagonals(rank, band))
        self.route = "band" if band is not None else "sparse"
        if band is None and self.rows.numel() > SPARSE_GATHER_LIMIT * rank:
            self.route = "dense"

    def matrix(self, coeffs: torch.Tensor) -> torch.Tensor:
        m = coeffs.new_zeros(self.rank, self.rank)
        return m.index_put((self.rows, self.cols), coeffs, accumulate=True)

    def left(self, coeffs: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        """M V^T (rank, d_in)."""
        if self.route == "band":
            out = torch.zeros_like(vh)
            for i, j, c in self.band_slices(coeffs):
                out[i] += c[:, None] * vh[j]
            return out
        if self.route == "dense":
            return self.matrix(coeffs) @ vh
        return vh.new_zeros(vh.shape).index_add(0, self.rows, coeffs[:, None] * vh[self.cols])

    def mix(self, coeffs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h M^T over the last dimension of h (..., rank): M applied to each V^T x."""
        if self.route == "band":
            out = torch.zeros_like(h)
            for i, j, c in self.band_slices(coeffs):
                out[..., i] += h[..., j] * c
            return out
        if self.route == "dense":
            return h @ self.matrix(coeffs).T
        return torch.zeros_like(h).index_add(-1, self.rows, h[..., self.cols] * coeffs)

    def mix_t(self, coeffs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """g M for a 2-D g (m, rank): M^T applied to each row."""
        if self.route == "band":
            out = torch.zeros_like(g)
            for i, j, c in self.band_slices(coeffs):
                out[:, j] += g[:, i] * c
            return out
        if self.route == "dense":
            return g @ self.matrix(coeffs)
        picked = torch.gather(g, 1, self.rows.expand(g.shape[0], -1)) * coeffs
        return torch.zeros_like(g).index_add(1, self.cols, picked)

    def grad(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """d loss / d coeffs = (g^T h)[rows, cols] for 2-D g = dy U and h = x V (m, rank)."""
        if self.route == "band":
            return torch.cat([(g[:, i] * h[:, j]).sum(0) for i, j, _ in self.band_slices(None)])
        if self.route == "dense":
            return (g.T @ h)[self.rows, self.cols]
        m = g.shape[0]
        picked = torch.gather(g, 1, self.rows.expand(m, -1))
        return (picked * torch.gather(h, 1, self.cols.expand(m, -1))).sum(0)

    def band_slices(self, coeffs: torch.Tensor | None):
        """(rows, cols, coefficients) of each diagonal as slices: M[i, j] = c."""
        for offset, first, (start, stop) in self.diagonals:
            i, j = slice(start, stop), slice(start + offset, stop + offset)
            yield i, j, None if coeffs is None else coeffs[first : first + stop - start]


def band_diagonals(rank: int, band: int):
    """(offset j - i, index of its first coefficient, (first row, end row)) per diagonal,
    in ``banded_positions`` order."""
    first = 0
    for offset in range(-band, band + 1):
        start, stop = max(0, -offset), min(rank, rank - offset)
        yield offset, first, (start, stop)
        first += stop - start


class SingularUpdateLinear(torch.autograd.Function):
    """y = x (W0 + U M V^T)^T + b, SVFT's training step in one output write.

    ``fold`` (many rows, ``core.kernels.lora.folds``): W' = W0 + U (M V^T) is formed once
    (rank d_out d_in flops, independent of the rows) and y = x W'^T is one GEMM; else
    y = x W0^T + ((x V) M^T) U^T. The backward is the same either way: g = dy U and
    h = x V (d_out + d_in) rank flops per row give dM = g^T h on the pattern, and
    dx = dy W0 + (g M) V^T. Autograd of the folded form would instead make the (d_out,
    d_in) weight gradient dy^T x and project it, U^T (dy^T x) V: more flops and memory.
    Only x (and x V when not folded) is kept for the backward, not W'.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, u, vh, coeffs, pattern, fold):
        x2 = x.reshape(-1, x.shape[-1])
        if fold:
            y = F.linear(x2, torch.addmm(weight, u, pattern.left(coeffs, vh)), bias)
            h = None
        else:
            y = F.linear(x2, weight, bias)
            h = x2 @ vh.T
            y.addmm_(pattern.mix(coeffs, h), u.T)
        ctx.pattern = pattern
        ctx.save_for_backward(x, weight, u, vh, coeffs, h)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, weight, u, vh, coeffs, h = ctx.saved_tensors
        need_x, need_w, need_b, _, _, need_c = ctx.needs_input_grad[:6]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        g = dy2 @ u if (need_x or need_c) else None  # (m, rank)
        dx = dweight = dbias = dcoeffs = None
        if need_c:
            dcoeffs = ctx.pattern.grad(g, x2 @ vh.T if h is None else h)
        if need_x:
            dx = (dy2 @ weight).addmm_(ctx.pattern.mix_t(coeffs, g), vh).view(x.shape)
        if need_w:
            dweight = dy2.T @ x2
        if need_b:
            dbias = dy2.sum(0)
        return dx, dweight, dbias, None, None, dcoeffs, None, None


class SingularVectorAdapter(Adapter):
    """``y + U M V^T x`` with M sparse over the base's own singular vectors (SVFT, SVFit)."""

    def __init__(
        self, base: nn.Module, *, pattern: str, off_diag: int, rank: int | None, seed: int
    ):
        super().__init__()
        d_out, d_in = self.shape = matrix_shape(base)
        self.rank = min(d_out, d_in) if rank is None else min(rank, d_out, d_in)
        self.pattern = pattern
        band = 0 if pattern == "plain" else min(off_diag, self.rank - 1)
        # the band half-width when the positions are ``banded_positions`` (also "plain":
        # the diagonal), which ``CoefficientPattern`` computes by slices
        self.band = band if pattern in ("plain", "banded") else None
        count = band_count(self.rank, band)
        device = base.weight.device
        self.coeffs = nn.Parameter(torch.zeros(count, device=device, dtype=weight_dtype(base)))
        positions = self._initial_positions(band, count, seed).to(device)
        self.register_buffer("positions", positions, persistent=pattern in SAVED_PATTERNS)
        self.register_buffer("U", None, persistent=False)  # set in on_attach
        self.register_buffer("Vh", None, persistent=False)
        # The base output and the update in one pass (``SingularUpdateLinear``) when the
        # base weight is in the adapter's dtype; else the update is added in ``post``.
        self.replaces_base = base.weight.dtype == self.coeffs.dtype

    def _initial_positions(self, band: int, count: int, seed: int) -> torch.Tensor:
        if self.pattern == "random":
            return random_positions(self.rank, count, seed)
        if self.pattern == "top_k":  # needs U, V: filled in on_attach
            return torch.zeros(2, count, dtype=torch.long)
        return banded_positions(self.rank, band)

    def on_attach(self, base: nn.Module) -> None:
        dtype = self.coeffs.dtype
        if base.weight.is_meta:
            self.U = shape_only(self.shape[0], self.rank, dtype=dtype)
            self.Vh = shape_only(self.rank, self.shape[1], dtype=dtype)
            return
        with torch.no_grad():
            u, vh = thin_svd(weight_matrix(base), self.rank)
            self.U, self.Vh = u.to(dtype), vh.to(dtype)
            if self.pattern == "top_k":
                self.positions.copy_(top_alignment_positions(u, vh, self.coeffs.numel()))

    def coefficient_matrix(self) -> torch.Tensor:
        """M as a dense rank x rank matrix."""
        return self.coefficient_pattern().matrix(self.coeffs)

    def coefficient_pattern(self) -> CoefficientPattern:
        return CoefficientPattern(self.positions, self.rank, self.band)

    def run_base(self, x: torch.Tensor, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        weight = weight_matrix(base)
        if args or kwargs or not hand_written_step_fits(x, weight, self.coeffs):
            return self.add_update(x, base(x, *args, **kwargs))
        pattern = self.coefficient_pattern()
        rows = x.numel() // x.shape[-1]
        return SingularUpdateLinear.apply(
            x, weight, base.bias, self.U, self.Vh, self.coeffs, pattern, folds(rows, weight)
        )

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return y if self.replaces_base else self.add_update(x, y)

    def add_update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + U M V^T x by the plain formula (any dtype, autocast, extra call arguments)."""
        h = F.linear(x.to(self.coeffs.dtype), self.Vh)  # V^T x, (..., rank)
        mixed = self.coefficient_pattern().mix(self.coeffs, h)
        return y + F.linear(mixed, self.U).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.U @ self.coefficient_matrix() @ self.Vh

    def merge(self, base: nn.Module) -> None:
        add_to_weight(base, self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        add_to_weight(base, -self.delta_weight())


# --- SODA -------------------------------------------------------------------------------------

SODA_DECOMPOSITIONS = ("svd", "lq")
ORTHOGONAL_MAPS = ("cayley", "exp", "stiefel")


def kronecker_sizes(n: int, factors: int) -> tuple[int, ...]:
    """Split n into at most ``factors`` sizes whose product is n, as equal as divisibility
    allows; sizes of 1 (identity factors) are dropped."""
    sizes, rest = [], n
    for left in range(factors, 1, -1):
        target = int(rest ** (1 / left) + 1e-9)
        size = max(d for d in range(1, target + 1) if rest % d == 0)
        sizes.append(size)
        rest //= size
    sizes.append(rest)
    return tuple(sorted(s for s in sizes if s > 1))


def skew_symmetric(vector: torch.Tensor, size: int) -> torch.Tensor:
    """The size x size matrix A = T - T^T with T's strict upper triangle = ``vector``."""
    rows, cols = torch.triu_indices(size, size, 1, device=vector.device)
    upper = vector.new_zeros(size, size).index_put((rows, cols), vector)
    return upper - upper.T


def orthogonal_factor(vector: torch.Tensor, size: int, how: str) -> torch.Tensor:
    """An exactly orthogonal matrix from a skew-symmetric A: Cayley (I - A)^-1 (I + A), or
    exp(A). Both are the identity at A = 0."""
    a = skew_symmetric(vector, size)
    if how == "exp":
        return torch.linalg.matrix_exp(a)
    eye = torch.eye(size, dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - a, eye + a)


def rotate(matrix: torch.Tensor, factors: list[torch.Tensor], inverse: bool = False):
    """``matrix @ (R_1 kron R_2 kron ...)`` (or its transpose) without forming the product.

    Each step contracts the leading factor axis of the (d_out, f_i, rest) reshaped matrix
    with R_i and puts the rotated axis last, (d_out, rest, f_i): one matrix product per
    factor and no permute copies; after all factors the axes are back in order.
    """
    d_out = matrix.shape[0]
    t = matrix
    for factor in factors:
        step = factor.T if inverse else factor
        t = torch.matmul(t.reshape(d_out, factor.shape[0], -1).transpose(1, 2), step)
    return t.reshape(d_out, -1)


@register("soda", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class SODA(AdapterConfig):
    """SODA config (Zhang et al., WACV 2025, "Spectrum-Aware Parameter Efficient
    Fine-Tuning for Diffusion Models").

    The pretrained weight is split into spectrum and basis, W0 = W_spec W_basis (W_basis has
    orthonormal rows); the spectrum gets a trainable shift Delta S and the basis a trainable
    rotation R = R_1 kron R_2 kron ... (each R_i exactly orthogonal):

        W = (W_spec + Delta S) W_basis R

    * "svd": W0 = U S V^T, W_spec = U S, W_basis = V^T, W = U (S + diag(Delta s)) V^T R.
    * "lq":  W0 = L Q (the QR of W0^T), W_spec = L lower-triangular, W_basis = Q; Delta s
      shifts the diagonal of L: W = (L + diag(Delta s)) Q R.

    R rotates the input-side basis. For a convolution the weight is the (out, in * k * k)
    matrix, so R rotates the basis of the flattened receptive field. Delta s = 0 and R = I
    at the start, so the model starts as the frozen one.

    How each R_i stays orthogonal (``orthogonal``):

    * "stiefel", as the paper: R_i is a plain f_i x f_i parameter initialised at the
      identity and kept on the Stiefel manifold by the optimiser, ``core.optim.StiefelAdam``
      (momentum Stiefel Adam, Kong et al., ICLR 2023), which the adapter declares its factors
      to through ``stiefel_parameters()``; ``core.optim.stiefel_adam_for(model, ...)``
      builds it with AdamW for the spectral shift. A plain optimiser would let R_i drift
      off the manifold. Trainable count: min(d_out, d_in) + sum_i f_i^2.
    * "cayley" / "exp": R_i = Cayley(A_i) or expm(A_i) of a skew-symmetric A_i, exactly
      orthogonal under any optimiser. Count: min(d_out, d_in) + sum_i f_i (f_i - 1) / 2.

    The factor sizes f_i (product d_in) come from ``factor_sizes`` when it lists a
    factorisation of d_in, else ``kronecker_sizes(d_in, kron_factors)``.

    Args:
        decomposition: "svd" or "lq" (the paper's SODA-SVD and SODA-QR).
        kron_factors: number of Kronecker factors of R (sizes as equal as d_in allows).
        orthogonal: "stiefel", "cayley" or "exp", how each factor stays orthogonal.
        factor_sizes: explicit factorisations to use for the in-features they multiply to,
            e.g. SDXL's ``[[8, 8, 10], [6, 8, 16], [4, 16, 20], [4, 8, 64]]`` for 640, 768,
            1280 and 2048 (at most one per product).
        spectrum_relu: the authors' SDXL code's W = U diag(relu(s + Delta s)) V^T: the
            shifted spectrum s (singular values, or diag(L) with "lq") is clipped at 0, so
            training cannot flip a direction's sign. Off: W = U diag(s + Delta s) V^T.
        shift_init: the initial Delta s (the authors' code: 1e-3; 0 starts as the frozen
            model).
    """

    decomposition: str = "svd"
    kron_factors: int = 2
    orthogonal: str = "cayley"
    factor_sizes: tuple[tuple[int, ...], ...] = ()
    spectrum_relu: bool = False
    shift_init: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "decomposition", SODA_DECOMPOSITIONS)
        check_int(self, "kron_factors")
        check_choice(self, "orthogonal", ORTHOGONAL_MAPS)
        object.__setattr__(self, "factor_sizes", self._checked_factor_sizes())
        check_float(self, "shift_init")
        if not isinstance(self.spectrum_relu, bool):
            raise ConfigError(
                f"SODA.spectrum_relu must be True or False, got {self.spectrum_relu!r}."
            )

    def _checked_factor_sizes(self) -> tuple[tuple[int, ...], ...]:
        sizes, products = [], set()
        for entry in self.factor_sizes or ():
            ok = isinstance(entry, list | tuple) and entry
            ok = ok and all(isinstance(f, int) and not isinstance(f, bool) for f in entry)
            if not ok or min(entry) < 1:
                raise ConfigError(
                    f"SODA.factor_sizes entries must be lists of positive ints such as "
                    f"[8, 8, 10], got {entry!r}."
                )
            product = math.prod(entry)
            if product in products:
                raise ConfigError(
                    f"SODA.factor_sizes lists two factorisations of {product}; keep one."
                )
            products.add(product)
            sizes.append(tuple(entry))
        return tuple(sizes)

    def sizes_for(self, d_in: int) -> tuple[int, ...]:
        """The Kronecker factor sizes of R for ``d_in`` in-features (identities dropped)."""
        for entry in self.factor_sizes:
            if math.prod(entry) == d_in:
                return tuple(f for f in entry if f > 1)
        return kronecker_sizes(d_in, self.kron_factors)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if is_linear_like(module):
            return None
        if isinstance(module, CONV_TYPES):
            if module.padding_mode != "zeros":
                return "SODA on convolutions needs padding_mode='zeros'"
            return None
        return f"SODA wraps {LINEAR_LAYERS} and nn.Conv1d/2d/3d"

    def build(self, module: nn.Module, path: str) -> SODAAdapter:
        return SODAAdapter(
            module,
            decomposition=self.decomposition,
            sizes=self.sizes_for(matrix_shape(module)[1]),
            orthogonal=self.orthogonal,
            spectrum_relu=self.spectrum_relu,
            shift_init=self.shift_init,
        )


class SODAAdapter(Adapter):
    """Runs the base layer with W = (W0 + spectral shift) R; see ``SODA``."""

    replaces_base = True

    def __init__(
        self,
        base: nn.Module,
        *,
        decomposition: str,
        sizes: tuple[int, ...],
        orthogonal: str,
        spectrum_relu: bool = False,
        shift_init: float = 0.0,
    ):
        super().__init__()
        d_out, d_in = self.shape = matrix_shape(base)
        self.rank = min(d_out, d_in)
        self.decomposition, self.orthogonal = decomposition, orthogonal
        self.sizes, self.spectrum_relu = tuple(sizes), spectrum_relu
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        self.shift = nn.Parameter(torch.full((self.rank,), float(shift_init), **opts))
        if orthogonal == "stiefel":  # the factors themselves, kept orthogonal by StiefelAdam
            self.factors = nn.ParameterList(nn.Parameter(torch.eye(f, **opts)) for f in self.sizes)
        else:
            self.skew = nn.ParameterList(
                nn.Parameter(torch.zeros(f * (f - 1) // 2, **opts)) for f in self.sizes
            )
        self.register_buffer("U", None, persistent=False)  # svd only; set in on_attach
        self.register_buffer("basis", None, persistent=False)  # V^T or Q: (rank, d_in)
        self.register_buffer("spectrum", None, persistent=False)  # s: S or diag(L)

    def on_attach(self, base: nn.Module) -> None:
        dtype = self.shift.dtype
        (d_out, d_in), svd = self.shape, self.decomposition == "svd"
        if base.weight.is_meta:
            self.basis = shape_only(self.rank, d_in, dtype=dtype)
            self.U = shape_only(d_out, self.rank, dtype=dtype) if svd else None
            self.spectrum = shape_only(self.rank, dtype=dtype)
            return
        with torch.no_grad():
            matrix = weight_matrix(base).float()
            if svd:
                u, vh = thin_svd(matrix, self.rank)
                self.U, self.basis = u.to(dtype), vh.to(dtype)
                left = u
            else:
                vh = thin_lq(matrix)
                self.basis = vh.to(dtype)
                left = torch.eye(d_out, self.rank, dtype=vh.dtype, device=vh.device)
            # s_i = u_i^T W v_i: the singular values, or diag(L) of W = L Q
            self.spectrum = (left * (matrix @ vh.T)).sum(0).to(dtype)

    # -- the pieces of W = (W_spec + Delta S) W_basis R ----------------------------------

    def spectrum_delta(self) -> torch.Tensor:
        """The change of the spectrum: Delta s, or relu(s + Delta s) - s (``spectrum_relu``)."""
        if not self.spectrum_relu:
            return self.shift
        return F.relu(self.spectrum + self.shift) - self.spectrum

    def spectral_shift(self) -> torch.Tensor:
        """Delta S W_basis as (d_out, d_in): U diag(Delta s) V^T, or diag(Delta s) Q padded
        to d_out rows (the shift sits on the diagonal of L)."""
        shifted = self.spectrum_delta()[:, None] * self.basis
        if self.U is not None:
            return self.U @ shifted
        return F.pad(shifted, (0, 0, 0, self.shape[0] - self.rank))

    def shifted_weight(self, base: nn.Module) -> torch.Tensor:
        """W0 + Delta S W_basis; with "svd" one addmm, W0 + U (diag(Delta s) V^T)."""
        w0 = weight_matrix(base).to(self.shift.dtype)
        if self.U is None:
            return w0 + self.spectral_shift()
        return torch.addmm(w0, self.U, self.spectrum_delta()[:, None] * self.basis)

    def stiefel_parameters(self) -> list[nn.Parameter]:
        """Parameters an optimiser must keep orthogonal (``core.optim.stiefel_parameters``)."""
        return list(self.factors) if self.orthogonal == "stiefel" else []

    def rotation_factors(self) -> list[torch.Tensor]:
        if self.orthogonal == "stiefel":
            return list(self.factors)
        return [
            orthogonal_factor(v, f, self.orthogonal)
            for v, f in zip(self.skew, self.sizes, strict=True)
        ]

    def rotation(self) -> torch.Tensor:
        """R as a dense d_in x d_in matrix (for inspection; the forward never forms it)."""
        eye = torch.ones(1, 1, dtype=self.shift.dtype, device=self.shift.device)
        return functools.reduce(torch.kron, self.rotation_factors(), eye)

    def adapted_matrix(self, base: nn.Module) -> torch.Tensor:
        return rotate(self.shifted_weight(base), self.rotation_factors())

    # -- forward and merge -------------------------------------------------------------

    def run_base(self, x: torch.Tensor, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        matrix = self.adapted_matrix(base).to(x.dtype)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        if is_linear_like(base):
            return F.linear(x, matrix, bias)
        y = conv_forward(base, x, matrix.reshape(base.weight.shape))
        return y if bias is None else y + bias.view(1, -1, *[1] * (y.dim() - 2))

    def merge(self, base: nn.Module) -> None:
        base.weight.data.copy_(in_weight_layout(base, self.adapted_matrix(base)))

    def unmerge(self, base: nn.Module) -> None:
        merged = weight_matrix(base).to(self.shift.dtype)
        w0 = rotate(merged, self.rotation_factors(), inverse=True) - self.spectral_shift()
        base.weight.data.copy_(in_weight_layout(base, w0))


# --- HF PEFT spelling (FourierFT only: PEFT has no SVFT, SVFit or SODA) ------------------


def _fourierft_from_peft(pc: dict) -> FourierFT:
    seed = pc.get("random_loc_seed", 777)
    if seed is None:
        raise CheckpointError(
            "this PEFT FourierFT adapter has random_loc_seed=None, so its frequency positions "
            "cannot be re-derived; save it from PEFT with an integer random_loc_seed."
        )
    return FourierFT(
        targets=pc["target_modules"],
        exclude=pc.get("exclude_modules") or None,
        modules_to_save=pc.get("modules_to_save") or None,
        n_frequency=int(pc.get("n_frequency", 1000)),
        scaling=float(pc.get("scaling", 150.0)),
        random_loc_seed=int(seed),
        init="zeros" if pc.get("init_weights") else "gaussian",
        n_frequency_pattern=dict(pc.get("n_frequency_pattern") or {}),
        store_positions=False,  # a PEFT folder defines the positions by the seed alone
    )


def _fourierft_to_peft(cfg: FourierFT, adapters: dict[str, FourierFTAdapter]) -> dict:
    patterns = {}
    for path, adapter in adapters.items():
        n = adapter.spectrum.numel()
        seeded = frequency_positions(*adapter.shape, n, cfg.random_loc_seed)
        if not torch.equal(adapter.indices.cpu(), seeded):
            raise CheckpointError(
                f"{path}: this adapter's frequency positions are not the ones PEFT derives from "
                f"random_loc_seed={cfg.random_loc_seed} (they came from a checkpoint made with "
                "another seed), and a PEFT folder can only carry the seed; export the adapter "
                "from a model whose config has the seed it was trained with."
            )
        if n != cfg.n_frequency:
            patterns[path] = n  # PEFT falls back to an exact full-name lookup
    return {
        "n_frequency": cfg.n_frequency,
        "scaling": cfg.scaling,
        "random_loc_seed": cfg.random_loc_seed,
        "n_frequency_pattern": patterns,
        "fan_in_fan_out": any(a.fan_in_fan_out for a in adapters.values()),
        "init_weights": cfg.init == "zeros",
        "bias": "none",
        "layers_to_transform": None,
        "layers_pattern": None,
    }


register_peft_format(
    PeftFormat(
        peft_type="FOURIERFT",
        method="fourierft",
        tensor_names={"fourierft_spectrum": "spectrum"},
        config_from_peft=_fourierft_from_peft,
        config_to_peft=_fourierft_to_peft,
        # PEFT FourierFT options omnipeft does not reproduce: refused, never ignored.
        neutral={"bias": "none", "layers_to_transform": None, "layers_pattern": None},
    )
)
