"""The spectral family: FourierFT, SVFT, SVFit and SODA."""

import copy

import peft
import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import core
import core.optim
from conftest import adapters_of, make_llama, randomise
from core.errors import CheckpointError, ConfigError, TargetError
from core.inject import adapter_config, trainable_parameters
from core.methods import spectral
from core.methods.spectral import SODA, SVFT, FourierFT, SVFit, kronecker_sizes

LINEAR_TARGETS = ["tall", "square", "wide", "gpt"]
ALL_TARGETS = LINEAR_TARGETS + ["conv", "pointwise", "grouped"]
# (d_out, d_in) of each Bank layer seen as a matrix; convolutions flatten (in, k, k).
SHAPES = {
    "tall": (20, 12),
    "square": (16, 16),
    "wide": (10, 24),
    "gpt": (18, 16),
    "conv": (6, 36),
    "pointwise": (8, 6),
    "grouped": (6, 18),
}


class Bank(nn.Module):
    """One layer of each supported kind, each fed its own input."""

    def __init__(self):
        super().__init__()
        self.tall = nn.Linear(12, 20)
        self.square = nn.Linear(16, 16)
        self.wide = nn.Linear(24, 10)
        self.gpt = Conv1D(18, 16)  # GPT-2 layout: weight stored (in=16, out=18)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.pointwise = nn.Conv2d(6, 8, 1)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)

    def forward(self, batch):
        return {name: getattr(self, name)(x) for name, x in batch.items()}


def make_batch():
    return {
        "tall": torch.randn(3, 12),
        "square": torch.randn(2, 3, 16),
        "wide": torch.randn(3, 24),
        "gpt": torch.randn(3, 16),
        "conv": torch.randn(2, 4, 7, 7),
        "pointwise": torch.randn(2, 6, 5, 5),
        "grouped": torch.randn(2, 4, 5, 5),
    }


def assert_outputs_close(got, want, atol=1e-5):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=atol, msg=key)


CASES = {
    "fourierft": lambda: FourierFT(n_frequency=20, targets=LINEAR_TARGETS),
    "svft_plain": lambda: SVFT(targets=LINEAR_TARGETS),
    "svft_banded": lambda: SVFT(pattern="banded", off_diag=2, targets=LINEAR_TARGETS),
    "svft_random": lambda: SVFT(pattern="random", off_diag=2, seed=3, targets=LINEAR_TARGETS),
    "svft_top_k": lambda: SVFT(pattern="top_k", off_diag=1, targets=["square"]),
    "svfit": lambda: SVFit(r=4, targets=LINEAR_TARGETS),
    "soda_svd": lambda: SODA(targets=ALL_TARGETS),
    "soda_lq": lambda: SODA(decomposition="lq", orthogonal="exp", targets=ALL_TARGETS),
}


def batch_for(cfg):
    batch = make_batch()
    return {k: v for k, v in batch.items() if k in cfg.targets}


# --- identity at start, merge, unmerge -----------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_starts_as_the_frozen_model(case):
    cfg = CASES[case]()
    if isinstance(cfg, FourierFT):  # the paper starts from N(0, 1) coefficients
        cfg = FourierFT(n_frequency=20, init="zeros", targets=LINEAR_TARGETS)
    model = Bank().eval()
    batch = batch_for(cfg)
    frozen = model(batch)
    core.inject(model, cfg)
    assert_outputs_close(model(batch), frozen, atol=1e-6)


def test_fourierft_default_starts_from_gaussian_coefficients():
    model = Bank()
    core.inject(model, FourierFT(n_frequency=200, targets=["tall"]))
    spectrum = model.tall.adapters["default"].spectrum
    assert spectrum.mean().abs() < 0.25 and 0.8 < spectrum.std() < 1.2


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_forward_and_unmerge_restores_weights(case):
    cfg = CASES[case]()
    model = Bank().eval()
    core.inject(model, cfg)
    randomise(model, std=0.1)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    batch = batch_for(cfg)
    adapted = model(batch)
    core.merge(model)
    assert_outputs_close(model(batch), adapted)
    core.unmerge(model)
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], atol=1e-5, rtol=0, msg=key)
    assert_outputs_close(model(batch), adapted)


@pytest.mark.parametrize("case", CASES)
def test_adapted_output_differs_from_frozen_once_trained(case):
    cfg = CASES[case]()
    model = Bank().eval()
    batch = batch_for(cfg)
    frozen = model(batch)
    core.inject(model, cfg)
    randomise(model, std=0.1)
    adapted = model(batch)
    for key in batch:
        assert not torch.allclose(adapted[key], frozen[key], atol=1e-4), key


@pytest.mark.parametrize("case", CASES)
def test_half_precision_base_trains_float32_adapters(case):
    cfg = CASES[case]()
    model = Bank().to(torch.bfloat16)
    core.inject(model, cfg)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(model))
    batch = {k: v.to(torch.bfloat16) for k, v in batch_for(cfg).items()}
    assert all(y.dtype == torch.bfloat16 for y in model(batch).values())


# --- parameter counts by formula -------------------------------------------------------------


def per_module_counts(model):
    return {p: sum(t.numel() for t in a.parameters()) for p, a in adapters_of(model).items()}


def band(r, d):
    d = min(d, r - 1)
    return r * (2 * d + 1) - d * (d + 1)


def test_fourierft_counts_n_per_matrix_with_patterns():
    model = Bank()
    cfg = FourierFT(n_frequency=20, n_frequency_pattern={"wide": 7}, targets=LINEAR_TARGETS)
    core.inject(model, cfg)
    assert per_module_counts(model) == {"tall": 20, "square": 20, "wide": 7, "gpt": 20}


@pytest.mark.parametrize(
    "cfg, formula",
    [
        (SVFT(targets=LINEAR_TARGETS), lambda r: r),
        (SVFT(pattern="banded", off_diag=2, targets=LINEAR_TARGETS), lambda r: band(r, 2)),
        (SVFT(pattern="random", off_diag=3, targets=LINEAR_TARGETS), lambda r: band(r, 3)),
        (SVFT(pattern="banded", off_diag=50, targets=LINEAR_TARGETS), lambda r: r * r),
        (SVFT(pattern="banded", rank=5, off_diag=1, targets=LINEAR_TARGETS), lambda r: 5 * 3 - 2),
        (SVFit(targets=LINEAR_TARGETS), lambda r: r),
        (SVFit(r=4, targets=LINEAR_TARGETS), lambda r: 4),
    ],
)
def test_singular_vector_counts_follow_the_formulas(cfg, formula):
    model = Bank()
    core.inject(model, cfg)
    expected = {name: formula(min(SHAPES[name])) for name in LINEAR_TARGETS}
    assert per_module_counts(model) == expected


def test_svft_top_k_count_follows_the_banded_budget():
    model = Bank()
    core.inject(model, SVFT(pattern="top_k", off_diag=2, targets=["square"]))
    assert per_module_counts(model) == {"square": 16 * 5 - 2 * 3}


@pytest.mark.parametrize(
    "factors, sizes",
    [
        (2, {"tall": (3, 4), "wide": (4, 6), "gpt": (4, 4), "conv": (6, 6), "grouped": (3, 6)}),
        (3, {"tall": (2, 2, 3), "square": (2, 2, 4), "wide": (2, 3, 4), "conv": (3, 3, 4)}),
    ],
)
def test_soda_counts_spectrum_plus_skew_factors(factors, sizes):
    model = Bank()
    core.inject(model, SODA(kron_factors=factors, targets=list(sizes)))
    counts = per_module_counts(model)
    for name, fs in sizes.items():
        adapter = adapters_of(model)[name]
        assert adapter.sizes == fs and torch.tensor(fs).prod() == SHAPES[name][1]
        assert counts[name] == min(SHAPES[name]) + sum(f * (f - 1) // 2 for f in fs)


def stiefel_soda_bank(**kwargs):
    model = Bank().eval()
    core.inject(model, SODA(orthogonal="stiefel", targets=ALL_TARGETS, **kwargs))
    return model


def test_soda_stiefel_factors_are_identity_matrices_sized_by_factor_sizes():
    model = Bank().eval()
    batch = make_batch()
    frozen = model(batch)
    core.inject(model, SODA(orthogonal="stiefel", factor_sizes=[[2, 2, 4]], targets=ALL_TARGETS))
    assert_outputs_close(model(batch), frozen, atol=1e-6)  # R = I at the start
    counts = per_module_counts(model)
    for name, adapter in adapters_of(model).items():
        d_out, d_in = SHAPES[name]
        expected = (2, 2, 4) if d_in == 16 else kronecker_sizes(d_in, 2)
        assert adapter.sizes == expected, name
        assert adapter.stiefel_parameters() == list(adapter.factors)
        assert all(torch.equal(f, torch.eye(len(f))) for f in adapter.factors)
        assert counts[name] == min(d_out, d_in) + sum(f * f for f in expected), name


def test_soda_stiefel_merge_equals_forward_and_unmerge_restores_weights():
    model = stiefel_soda_bank()
    randomise(model, std=0.1)
    with torch.no_grad():  # the factors on the manifold, as StiefelAdam keeps them
        for name, p in model.named_parameters():
            if ".factors." in name:
                p.copy_(core.optim.polar(p))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    batch = make_batch()
    adapted = model(batch)
    core.merge(model)
    assert_outputs_close(model(batch), adapted)
    core.unmerge(model)
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], atol=1e-5, rtol=0, msg=key)


# --- each method follows its paper's equation -------------------------------------------------


def test_fourierft_delta_is_the_scaled_real_inverse_dft():
    lin = nn.Linear(6, 5, bias=False)
    model = nn.Sequential(lin)
    core.inject(model, FourierFT(n_frequency=9, scaling=3.0, targets=["0"]))
    adapter = model[0].adapters["default"]
    rows, cols = adapter.indices
    c = adapter.spectrum.detach()
    j = torch.arange(5.0)[:, None, None]
    k = torch.arange(6.0)[None, :, None]
    phase = 2 * torch.pi * (rows * j / 5 + cols * k / 6)  # (5, 6, n)
    expected = 3.0 * (c * torch.cos(phase)).sum(-1) / (5 * 6)
    torch.testing.assert_close(adapter.delta_weight().detach(), expected, atol=1e-6, rtol=1e-5)
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), x @ (lin.weight + expected).T, atol=1e-5, rtol=1e-5)
    assert len({(int(r), int(c)) for r, c in adapter.indices.T}) == 9  # distinct frequencies


def test_svft_update_is_u_m_vt_on_the_weights_own_singular_vectors():
    lin = nn.Linear(8, 8)
    w0 = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    core.inject(model, SVFT(pattern="banded", off_diag=1, targets=["0"]))
    randomise(model, std=0.1)
    adapter = model[0].adapters["default"]
    u, vh = adapter.U, adapter.Vh
    s = torch.linalg.svdvals(w0)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, w0, atol=1e-5, rtol=1e-5)
    rows, cols = adapter.positions
    assert ((rows - cols).abs() <= 1).all() and rows.numel() == 8 * 3 - 2
    m = torch.zeros(8, 8)
    m[rows, cols] = adapter.coeffs.detach()
    x = torch.randn(3, 8)
    expected = x @ (w0 + u @ m @ vh).T + lin.bias
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_svft_top_k_picks_the_largest_singular_vector_alignments():
    model = Bank()
    core.inject(model, SVFT(pattern="top_k", off_diag=1, targets=["square"]))
    adapter = model.square.adapters["default"]
    alignment = (adapter.U.T @ adapter.Vh.T).abs()
    chosen = alignment[tuple(adapter.positions)]
    mask = torch.ones_like(alignment, dtype=torch.bool)
    mask[tuple(adapter.positions)] = False
    assert chosen.numel() == 16 * 3 - 2
    assert chosen.min() >= alignment[mask].max()


def test_svft_random_positions_are_distinct_and_seeded():
    def positions(seed):
        model = Bank()
        core.inject(model, SVFT(pattern="random", off_diag=2, seed=seed, targets=["square"]))
        return model.square.adapters["default"].positions

    first, again, other = positions(1), positions(1), positions(2)
    assert len({(int(r), int(c)) for r, c in first.T}) == first.shape[1] == band(16, 2)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_svfit_trains_the_top_r_singular_values():
    lin = nn.Linear(12, 16)
    w0 = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    core.inject(model, SVFit(r=3, targets=["0"]))
    delta = torch.tensor([0.5, -0.2, 0.1])
    with torch.no_grad():
        model[0].adapters["default"].coeffs.copy_(delta)
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    top = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    expected = u[:, :3] @ torch.diag(s[:3] + delta) @ vh[:3] + (w0 - top)
    core.merge(model)
    torch.testing.assert_close(lin.weight.detach(), expected, atol=1e-5, rtol=1e-5)


def soda_reference(w0, shift, rotation, decomposition):
    """(W_spec + Delta S) W_basis R, from torch's own decompositions."""
    if decomposition == "svd":
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        return u @ torch.diag(s + shift) @ vh @ rotation
    q, r = torch.linalg.qr(w0.T)
    signs = torch.sign(torch.diagonal(r))
    lower, basis = (signs[:, None] * r).T, signs[:, None] * q.T  # W0 = L Q, diag(L) >= 0
    rank = shift.numel()
    lower = lower + torch.diag(shift).new_zeros(lower.shape).index_put(
        (torch.arange(rank), torch.arange(rank)), shift
    )
    return lower @ basis @ rotation


@pytest.mark.parametrize("decomposition", ["svd", "lq"])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_soda_follows_the_spectrum_and_basis_update(decomposition, shape):
    d_out, d_in = shape
    lin = nn.Linear(d_in, d_out)
    w0 = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    core.inject(model, SODA(decomposition=decomposition, targets=["0"]))
    randomise(model, std=0.3)
    adapter = model[0].adapters["default"]
    rotation = adapter.rotation().detach()
    expected = soda_reference(w0, adapter.shift.detach(), rotation, decomposition)
    x = torch.randn(4, d_in)
    torch.testing.assert_close(model(x), x @ expected.T + lin.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decomposition", ["svd", "lq"])
def test_soda_spectrum_relu_clips_the_shifted_spectrum_at_zero(decomposition):
    lin = nn.Linear(10, 6)
    w0 = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    cfg = SODA(decomposition=decomposition, spectrum_relu=True, shift_init=1e-3, targets=["0"])
    core.inject(model, cfg)
    adapter = model[0].adapters["default"]
    if decomposition == "svd":
        torch.testing.assert_close(adapter.spectrum, torch.linalg.svdvals(w0))
    else:
        torch.testing.assert_close(adapter.spectrum, torch.linalg.qr(w0.T)[1].diagonal().abs())
    assert torch.equal(adapter.shift.detach(), torch.full((6,), 1e-3))  # the authors' init
    x = torch.randn(4, 10)
    shift = adapter.shift.detach()  # s + 1e-3 > 0: the relu is the identity here
    expected = soda_reference(w0, shift, torch.eye(10), decomposition)
    torch.testing.assert_close(model(x), x @ expected.T + lin.bias, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        adapter.shift.fill_(-1e3)  # every shifted value clips to 0
    clipped = soda_reference(w0, -adapter.spectrum, torch.eye(10), decomposition)
    torch.testing.assert_close(model(x), x @ clipped.T + lin.bias, atol=1e-5, rtol=1e-5)
    if decomposition == "svd":  # a zero spectrum is a zero weight
        torch.testing.assert_close(model(x), lin.bias.expand(4, 6), atol=1e-5, rtol=0)


def test_soda_on_a_kxk_convolution_rotates_the_flattened_receptive_field():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    w0 = conv.weight.detach().clone()
    model = nn.Sequential(conv)
    core.inject(model, SODA(targets=["0"]))
    randomise(model, std=0.3)
    adapter = model[0].adapters["default"]
    matrix = soda_reference(w0.flatten(1), adapter.shift.detach(), adapter.rotation(), "svd")
    x = torch.randn(2, 4, 5, 5)
    expected = nn.functional.conv2d(x, matrix.reshape(w0.shape), conv.bias, padding=1)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("orthogonal", ["cayley", "exp"])
def test_soda_rotation_stays_orthogonal_through_training(layer, orthogonal):
    if layer == "linear":
        model, x, n = nn.Sequential(nn.Linear(16, 12)), torch.randn(8, 16), 16
    else:
        model, x, n = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)), torch.randn(2, 4, 6, 6), 36
    core.inject(model, SODA(orthogonal=orthogonal, targets=["0"]))
    adapter = model[0].adapters["default"]
    randomise(model, std=0.3)
    target = torch.randn_like(model(x))
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=0.05)
    losses = []
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        rotation = adapter.rotation()
    assert rotation.shape == (n, n)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(n), atol=1e-5, rtol=0)
    assert (rotation - torch.eye(n)).abs().max() > 0.05  # it really rotates
    assert model[0].base_layer.weight.grad is None


# --- the training fast paths equal the plain formulas ------------------------------------------


def plain_fourier_delta(spectrum, indices, shape, scaling):
    """scaling * Re(IDFT2(F)) straight from the definition: a dense complex ifft2."""
    dense = torch.zeros(shape, dtype=spectrum.dtype).index_put(tuple(indices), spectrum)
    return torch.fft.ifft2(dense).real * scaling


def grads_of(output, tensors, seed=0):
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(output, tensors, upstream)


def assert_all_close(got, want, atol=1e-5, rtol=1e-4):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"tensor {i}")


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("shape, n", [((7, 9), 20), ((6, 8), 48), ((9, 6), 54), ((1, 5), 5)])
def test_fourierft_real_transform_delta_equals_the_complex_ifft2(shape, n):
    # n = every entry for the even shapes: zero and Nyquist rows/columns and their mirrors
    flat = torch.randperm(shape[0] * shape[1])[:n]
    indices = torch.stack([flat // shape[1], flat % shape[1]])
    spectrum = torch.randn(n, dtype=torch.float64)
    got = spectral.fourier_delta(spectrum, indices, shape, 2.5)
    torch.testing.assert_close(got, plain_fourier_delta(spectrum, indices, shape, 2.5))


@pytest.mark.parametrize("shape, n", [((7, 9), 20), ((6, 8), 48), ((10, 5), 13)])
def test_fourierft_fast_step_equals_the_plain_formula_with_gradients(shape, n):
    d_out, d_in = shape
    flat = torch.randperm(d_out * d_in)[:n]
    indices = torch.stack([flat // d_in, flat % d_in])
    x, weight, bias, spectrum = leaf(2, 5, d_in), leaf(d_out, d_in), leaf(d_out), leaf(n)
    inputs = (x, weight, bias, spectrum)
    fast = spectral.FourierLinear.apply(x, weight, bias, spectrum, indices, 3.0)
    delta = plain_fourier_delta(spectrum, indices, shape, 3.0)
    plain = nn.functional.linear(x, weight + delta, bias)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert_all_close(grads_of(fast, inputs), grads_of(plain, inputs))


@pytest.mark.parametrize("layer", ["tall", "gpt"])
def test_fourierft_adapter_trains_through_the_fast_step(layer):
    model = Bank()
    core.inject(model, FourierFT(n_frequency=30, scaling=5.0, targets=[layer]))
    adapter = adapters_of(model)[layer]
    x = make_batch()[layer].requires_grad_()
    y = model({layer: x})[layer]
    assert "FourierLinear" in type(y.grad_fn).__name__
    base = getattr(model, layer).base_layer
    w0 = spectral.weight_matrix(base)
    delta = plain_fourier_delta(adapter.spectrum, adapter.indices, adapter.shape, 5.0)
    plain = nn.functional.linear(x, w0 + delta, base.bias)
    torch.testing.assert_close(y, plain, atol=1e-5, rtol=1e-5)
    assert_all_close(grads_of(y, (x, adapter.spectrum)), grads_of(plain, (x, adapter.spectrum)))


def singular_bases(d_out, d_in, rank):
    u, _, vh = torch.linalg.svd(torch.randn(d_out, d_in), full_matrices=False)
    return u[:, :rank].contiguous(), vh[:rank].contiguous()


PATTERN_ROUTES = {  # (positions, band) taking each route of CoefficientPattern
    "diagonal": lambda r: (spectral.banded_positions(r, 0), 0),
    "band": lambda r: (spectral.banded_positions(r, 2), 2),
    "sparse": lambda r: (spectral.random_positions(r, r, 1), None),
    "dense": lambda r: (spectral.random_positions(r, 3 * r, 2), None),
}


@pytest.mark.parametrize("route", PATTERN_ROUTES)
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("shape, rank", [((9, 7), 7), ((7, 11), 5)])
def test_svft_fast_step_equals_the_plain_formula_with_gradients(route, fold, shape, rank):
    positions, band = PATTERN_ROUTES[route](rank)
    pattern = spectral.CoefficientPattern(positions, rank, band)
    assert pattern.route == ("band" if route == "diagonal" else route)
    u, vh = singular_bases(*shape, rank)
    x, weight, bias = leaf(3, 4, shape[1]), leaf(*shape), leaf(shape[0])
    coeffs = leaf(positions.shape[1])
    inputs = (x, weight, bias, coeffs)
    fast = spectral.SingularUpdateLinear.apply(x, weight, bias, u, vh, coeffs, pattern, fold)
    m = torch.zeros(rank, rank).index_put(tuple(positions), coeffs)
    plain = nn.functional.linear(x, weight + u @ m @ vh, bias)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert_all_close(grads_of(fast, inputs), grads_of(plain, inputs))


@pytest.mark.parametrize(
    "cfg",
    [
        SVFT(targets=["tall", "gpt"]),
        SVFT(pattern="random", off_diag=1, seed=2, targets=["tall", "gpt"]),
        SVFT(pattern="banded", off_diag=2, targets=["tall", "gpt"]),
        SVFit(r=3, targets=["tall", "gpt"]),
    ],
)
def test_singular_vector_adapters_train_through_the_fast_step(cfg):
    model = Bank()
    core.inject(model, cfg)
    randomise(model, std=0.3)
    for name, adapter in adapters_of(model).items():
        base = getattr(model, name).base_layer
        x = make_batch()[name].requires_grad_()
        y = model({name: x})[name]
        assert "SingularUpdateLinear" in type(y.grad_fn).__name__
        w = spectral.weight_matrix(base) + adapter.U @ adapter.coefficient_matrix() @ adapter.Vh
        plain = nn.functional.linear(x, w, base.bias)
        torch.testing.assert_close(y, plain, atol=1e-5, rtol=1e-5)
        inputs = (x, adapter.coeffs)
        assert_all_close(grads_of(y, inputs), grads_of(plain, inputs))


@pytest.mark.parametrize("case", ["fourierft", "svft_banded", "svfit"])
def test_autocast_runs_the_plain_formula_of_the_fast_step_methods(case):
    cfg = CASES[case]()
    model = Bank()
    core.inject(model, cfg)
    randomise(model, std=0.1)
    batch = batch_for(cfg)
    with torch.no_grad():
        full = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = model(batch)
    for key, y in cast.items():
        assert y.dtype == torch.bfloat16, key
        assert "FourierLinear" not in type(y.grad_fn).__name__, key
        assert "SingularUpdate" not in type(y.grad_fn).__name__, key
        torch.testing.assert_close(y.float(), full[key], atol=0.1, rtol=0.05, msg=key)
    sum(y.float().sum() for y in cast.values()).backward()
    assert all(p.grad is not None for p in trainable_parameters(model))


@pytest.mark.parametrize("sizes", [(3, 4), (2, 3, 2), (5,)])
@pytest.mark.parametrize("inverse", [False, True])
def test_soda_rotation_equals_the_dense_kronecker_product_with_gradients(sizes, inverse):
    d_in = int(torch.tensor(sizes).prod())
    matrix = leaf(5, d_in, dtype=torch.float64)
    factors = [leaf(f, f, dtype=torch.float64) for f in sizes]
    dense = factors[0]
    for factor in factors[1:]:
        dense = torch.kron(dense, factor)
    got = spectral.rotate(matrix, factors, inverse=inverse)
    want = matrix @ (dense.T if inverse else dense)
    torch.testing.assert_close(got, want)
    inputs = (matrix, *factors)
    assert_all_close(grads_of(got, inputs), grads_of(want, inputs), atol=1e-10, rtol=1e-10)


# --- save / load --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip_is_exact(tmp_path, case):
    cfg = CASES[case]()
    model = Bank().eval()
    fresh = copy.deepcopy(model)
    core.inject(model, cfg)
    randomise(model, std=0.1)
    core.save_adapter(model, tmp_path)
    core.load_adapter(fresh, tmp_path)
    batch = batch_for(cfg)
    assert_outputs_close(fresh(batch), model(batch), atol=1e-6)
    for path, adapter in adapters_of(fresh).items():
        for key, value in adapter.state_dict().items():
            assert torch.equal(value, adapters_of(model)[path].state_dict()[key]), (path, key)


def test_fourierft_positions_come_from_the_checkpoint_not_the_seed(tmp_path):
    model = Bank().eval()
    fresh = copy.deepcopy(model)
    core.inject(model, FourierFT(n_frequency=20, random_loc_seed=1, targets=LINEAR_TARGETS))
    core.save_adapter(model, tmp_path)
    core.inject(fresh, FourierFT(n_frequency=20, random_loc_seed=2, targets=LINEAR_TARGETS))
    saved, other = adapters_of(model)["tall"].indices, adapters_of(fresh)["tall"].indices
    assert not torch.equal(saved, other)
    core.load_adapter(fresh, tmp_path)  # replaces the values of the seed-2 adapter
    assert torch.equal(adapters_of(fresh)["tall"].indices, saved)
    assert adapter_config(fresh, "default").random_loc_seed == 2  # the config keeps its seed
    batch = batch_for(adapter_config(model, "default"))
    assert_outputs_close(fresh(batch), model(batch), atol=1e-6)
    with pytest.raises(CheckpointError, match="random_loc_seed=2"):
        core.interop.save_peft(fresh, tmp_path / "peft")


# --- HF PEFT parity --------------------------------------------------------------------------


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    return GPT2LMHeadModel(cfg).eval()


PEFT_CASES = {
    "llama": (make_llama, ["q_proj", "v_proj"], {"v_proj": 40}, 128),
    "gpt2": (make_gpt2, ["c_attn", "c_fc"], {"c_fc": 30}, 64),
}


def logits(model, vocab):
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_saved_fourierft_imports_with_identical_outputs(tmp_path, case):
    build, targets, pattern, vocab = PEFT_CASES[case]
    base = build()
    ours = copy.deepcopy(base)
    fresh = copy.deepcopy(base)
    cfg = peft.FourierFTConfig(
        n_frequency=100, scaling=40.0, random_loc_seed=11, target_modules=targets,
        n_frequency_pattern=pattern,
    )  # fmt: skip
    plain = logits(base, vocab)
    theirs = peft.get_peft_model(base, cfg)  # spectrum ~ N(0, 1): PEFT's default
    theirs.save_pretrained(tmp_path / "peft")
    core.interop.load_peft(ours, tmp_path / "peft")
    diff = (logits(ours, vocab) - logits(theirs, vocab)).abs().max()
    assert diff < 1e-5, diff
    assert (logits(ours, vocab) - plain).abs().max() > 1e-3  # the adapter does something
    assert core.param_report(ours).by_adapter["default"]["params"] == sum(
        p.numel() for n, p in theirs.named_parameters() if "fourierft_" in n
    )
    core.save_adapter(ours, tmp_path / "ours")  # positions re-derived from the seed on load
    core.load_adapter(fresh, tmp_path / "ours")
    torch.testing.assert_close(logits(fresh, vocab), logits(ours, vocab), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_exported_fourierft_loads_in_peft_with_identical_outputs(tmp_path, case):
    build, targets, pattern, vocab = PEFT_CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    cfg = FourierFT(
        n_frequency=100, scaling=25.0, random_loc_seed=5, n_frequency_pattern=pattern,
        targets=targets,
    )  # fmt: skip
    core.inject(base, cfg)
    randomise(base, std=1.0)
    core.interop.save_peft(base, tmp_path)
    plain = logits(pristine, vocab)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    diff = (logits(theirs, vocab) - logits(base, vocab)).abs().max()
    assert diff < 1e-5, diff
    assert (logits(base, vocab) - plain).abs().max() > 1e-3  # the adapter does something


def test_unsupported_peft_fourierft_options_are_refused(tmp_path):
    base = make_llama()
    cfg = peft.FourierFTConfig(n_frequency=10, target_modules=["q_proj"], bias="all")
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="bias"):
        core.interop.load_peft(base, tmp_path)
    assert core.adapter_names(base) == []


# --- meta device ---------------------------------------------------------------------------------


def test_fourierft_on_a_llama2_7b_shaped_model_on_meta_trains_64000_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig())
    core.inject(model, FourierFT(n_frequency=1000, targets=["q_proj", "v_proj"]))
    report = core.param_report(model)
    assert report.by_adapter["default"]["params"] == 64_000
    assert report.by_adapter["default"]["modules"] == 64
    assert report.trainable == 64_000


@pytest.mark.parametrize("case", CASES)
def test_meta_device_injection_counts_like_real_weights(case):
    real = Bank()
    core.inject(real, CASES[case]())
    with torch.device("meta"):
        meta = Bank()
    core.inject(meta, CASES[case]())
    assert per_module_counts(meta) == per_module_counts(real)
    assert all(p.is_meta for p in meta.parameters())


# --- bad configs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FourierFT(n_frequency=0, targets=["x"]), "n_frequency must be >= 1"),
        (lambda: FourierFT(scaling=0, targets=["x"]), r"scaling must lie in \(0.0, inf\]"),
        (lambda: FourierFT(init="uniform", targets=["x"]), "init must be one of"),
        (lambda: FourierFT(random_loc_seed=-1, targets=["x"]), "random_loc_seed must be >= 0"),
        (lambda: FourierFT(n_frequency_pattern={"q": 0}, targets=["x"]), "n_frequency_pattern"),
        (lambda: SVFT(pattern="diag", targets=["x"]), "pattern must be one of"),
        (lambda: SVFT(pattern="plain", off_diag=2, targets=["x"]), "off_diag must be 0"),
        (lambda: SVFT(pattern="banded", off_diag=-1, targets=["x"]), "off_diag must be >= 0"),
        (lambda: SVFT(rank=0, targets=["x"]), "rank must be >= 1"),
        (lambda: SVFit(r=0, targets=["x"]), "r must be >= 1"),
        (lambda: SVFit(r=2.5, targets=["x"]), "r must be an int"),
        (lambda: SODA(decomposition="eig", targets=["x"]), "decomposition must be one of"),
        (lambda: SODA(kron_factors=0, targets=["x"]), "kron_factors must be >= 1"),
        (lambda: SODA(orthogonal="householder", targets=["x"]), "orthogonal must be one of"),
        (lambda: SODA(factor_sizes=[[0, 4]], targets=["x"]), "lists of positive ints"),
        (lambda: SODA(spectrum_relu="yes", targets=["x"]), "spectrum_relu must be True or"),
        (lambda: SODA(factor_sizes=[[2, 8], [4, 4]], targets=["x"]), "two factorisations of 16"),
    ],
)
def test_bad_configs_are_refused_with_clear_messages(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    "cfg, error, message",
    [
        (FourierFT(targets=["conv"]), TargetError, "FourierFT wraps nn.Linear"),
        (SVFT(targets=["conv"]), TargetError, "SVFT wraps"),
        (SVFit(targets=["pointwise"]), TargetError, "SVFit wraps"),
        (SVFT(pattern="top_k", targets=["tall"]), TargetError, "square weights"),
        (SODA(targets=["pool"]), TargetError, "SODA wraps"),
        (FourierFT(n_frequency=500, targets=["wide"]), ConfigError, "exceeds the 10x24"),
    ],
)
def test_unsupported_targets_are_refused_and_model_unchanged(cfg, error, message):
    model = Bank()
    model.pool = nn.AvgPool2d(2)
    with pytest.raises(error, match=message):
        core.inject(model, cfg)
    assert core.adapter_names(model) == []


def test_methods_declare_themselves_mergeable_in_the_registry():
    for cls, name in ((FourierFT, "fourierft"), (SVFT, "svft"), (SVFit, "svfit"), (SODA, "soda")):
        assert core.METHODS[name] is cls and cls.mergeable
