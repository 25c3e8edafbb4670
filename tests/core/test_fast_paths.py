"""The CPU fast paths (the kernels' torch twins and the wrappers' fused LoRA path) equal
the plain formulas they replace, forward and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import core
from core.kernels import (
    LoRALinearFunction,
    block_apply_torch,
    butterfly_apply,
    cayley_torch,
    lora_linear,
    scale_shift_torch,
    sgmv_lora_torch,
)
from core.kernels import lora as lora_kernels
from core.kernels.dispatch import autocast_on, hand_written_step_fits
from core.kernels.orthogonal import grid_linear, grid_linear_plain, skew_from_upper
from core.methods import orthogonal
from core.methods.lora import LoRA
from core.methods.orthogonal import BOFT, OFT, QGOFT
from core.methods.scaling import IA3


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 7) -> list[torch.Tensor]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, inputs, upstream.to(out.dtype), allow_unused=True))


def leaves(*shapes: tuple[int, ...], dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def plain_lora(x, w, bias, a, b, scale, h=None):
    return F.linear(x, w, bias) + scale * F.linear(F.linear(x if h is None else h, a), b)


# --- fused LoRA -------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("rows", [13, 2], ids=["folded", "factored"])
def test_fused_lora_function_equals_the_formula_with_every_gradient(with_bias, rows):
    assert lora_kernels.folds(rows, torch.zeros(7, 10)) == (rows == 13)
    x, w, bias, a, b = leaves((rows, 10), (7, 10), (7,), (3, 10), (7, 3))
    bias = bias if with_bias else None
    inputs = [t for t in (x, w, bias, a, b) if t is not None]
    fused = LoRALinearFunction.apply(x, None, w, bias, a, b, 0.6)
    plain = plain_lora(x, w, bias, a, b, 0.6)
    torch.testing.assert_close(fused, plain)
    for got, want in zip(grads(fused, inputs), grads(plain, inputs), strict=True):
        torch.testing.assert_close(got, want)


def test_fused_lora_with_a_separate_adapter_input_routes_gradients_through_both():
    x, w, bias, a, b = leaves((9, 6), (5, 6), (5,), (2, 6), (5, 2))
    mask = (torch.rand(9, 6, generator=torch.Generator().manual_seed(1)) > 0.3).double()
    fused = LoRALinearFunction.apply(x, x * mask / 0.7, w, bias, a, b, 2.0)  # h: dropout(x)
    plain = plain_lora(x, w, bias, a, b, 2.0, h=x * mask / 0.7)
    torch.testing.assert_close(fused, plain)
    inputs = [x, w, bias, a, b]
    for got, want in zip(grads(fused, inputs), grads(plain, inputs), strict=True):
        torch.testing.assert_close(got, want)


def test_inference_folds_the_update_into_a_temporary_weight_when_rows_are_many():
    w = torch.randn(16, 24)
    assert lora_kernels.should_fold(10, w, grad=False)  # 10 * 40 >= 16 * 24
    assert not lora_kernels.should_fold(9, w, grad=False)  # few rows: factored form
    assert not lora_kernels.should_fold(10, w, grad=True)  # training never folds
    assert not lora_kernels.should_fold(10, w.bfloat16(), grad=False)  # would round away
    x, bias, a, b = torch.randn(4, 5, 24), torch.randn(16), torch.randn(3, 24), torch.randn(16, 3)
    before = w.clone()
    with torch.no_grad():
        torch.testing.assert_close(
            lora_linear(x, w, bias, a, b, 0.5), plain_lora(x, w, bias, a, b, 0.5)
        )
        few = x[:1, :2]
        torch.testing.assert_close(
            lora_linear(few, w, bias, a, b, 0.5), plain_lora(few, w, bias, a, b, 0.5)
        )
    assert torch.equal(w, before)  # the base weight is never written


def lora_linear_model(adapters: int = 1, **overrides) -> nn.Module:
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6))
    for i in range(adapters):
        cfg = LoRA(r=3 + i, alpha=4.0 + i, targets=["0", "2"], **overrides)
        core.inject(model, cfg, name=f"a{i}")
    core.set_active(model, [f"a{i}" for i in range(adapters)])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.normal_(std=0.3)
    return model


def reference_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's function spelled out: base + sum of s B A x per active adapter."""
    h = x
    for layer in model:
        if isinstance(layer, core.layers.AdaptedModule):
            base = layer.base_layer
            out = F.linear(h, base.weight, base.bias)
            for adapter in layer.running():
                out = out + adapter.scale * F.linear(F.linear(h, adapter.A), adapter.B)
            h = out
        else:
            h = layer(h)
    return h


@pytest.mark.parametrize("adapters", [1, 2])
@pytest.mark.parametrize("grad", [True, False])
def test_wrapped_linear_takes_the_fused_path_and_equals_the_formula(adapters, grad, monkeypatch):
    model = lora_linear_model(adapters)
    calls = []
    monkeypatch.setattr(
        core.layers, "lora_linear", lambda *a: calls.append(1) or lora_linear(*a), raising=True
    )
    x = torch.randn(4, 5, 12, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = model(x)
    assert len(calls) == 2  # both linear layers
    torch.testing.assert_close(out, reference_forward(model, x))
    if grad:
        params = [p for p in model.parameters() if p.requires_grad] + [x]
        for got, want in zip(grads(out, params), grads(reference_forward(model, x), params)):
            torch.testing.assert_close(got, want)


def test_dropout_in_training_uses_one_mask_for_the_adapter_path_only():
    model = lora_linear_model(1, dropout=0.5).train()
    x = torch.randn(6, 12)
    torch.manual_seed(3)
    out = model[0](x)
    torch.manual_seed(3)
    adapter = model[0].adapters["a0"]
    h = F.dropout(x, 0.5, training=True)
    base = model[0].base_layer
    torch.testing.assert_close(
        out, plain_lora(x, base.weight, base.bias, adapter.A, adapter.B, adapter.scale, h=h)
    )


def test_lora_stacked_with_another_method_runs_the_addmm_post_path():
    model = nn.Sequential(nn.Linear(8, 8))
    core.inject(model, LoRA(r=2, alpha=2, targets=["0"]), name="lora")
    core.inject(model, IA3(targets=["0"]), name="ia3")
    core.set_active(model, ["lora", "ia3"])
    model[0].adapters["lora"].requires_grad_(True)  # inject trains only the newest adapter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.normal_(std=0.5)
    lora, ia3, base = model[0].adapters["lora"], model[0].adapters["ia3"], model[0].base_layer
    x = torch.randn(3, 4, 8, requires_grad=True)

    def formula():
        y = plain_lora(x, base.weight, base.bias, lora.A, lora.B, lora.scale)
        return y * ia3.scale.flatten()

    with torch.no_grad():  # in place into the base output
        torch.testing.assert_close(model(x), formula())
    out = model(x)
    torch.testing.assert_close(out, formula())
    params = [lora.A, lora.B, ia3.scale, x]
    for got, want in zip(grads(out, params), grads(formula(), params), strict=True):
        torch.testing.assert_close(got, want)


def test_hooks_on_the_base_layer_disable_the_fused_path_but_still_run():
    model = lora_linear_model(1)
    seen = []
    model[0].base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 12)
    torch.testing.assert_close(model(x), reference_forward(model, x))
    assert seen == [(2, 10)]


def test_gpt2_conv1d_takes_the_fused_path():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(10, 6))
    core.inject(model, LoRA(r=2, alpha=3, targets=["0"]))
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.B.normal_()
    x = torch.randn(4, 6, requires_grad=True)
    out = model(x)
    base = model[0].base_layer
    want = x @ base.weight + base.bias + 1.5 * x @ adapter.A.T @ adapter.B.T
    torch.testing.assert_close(out, want)
    for got, exp in zip(
        grads(out, [x, adapter.A, adapter.B]), grads(want, [x, adapter.A, adapter.B])
    ):
        torch.testing.assert_close(got, exp)


def test_autocast_runs_the_fused_path_in_the_autocast_dtype():
    model = lora_linear_model(1)
    x = torch.randn(5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model[0](x)
        adapter, base = model[0].adapters["a0"], model[0].base_layer
        want = plain_lora(x, base.weight, base.bias, adapter.A, adapter.B, adapter.scale)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), atol=0.05, rtol=0.02)


# --- multi-adapter LoRA (SGMV twin) -------------------------------------------------------------


@pytest.mark.parametrize(
    "starts, which",
    [([0, 4, 8, 12], [1, 0, 1]), ([0, 2, 3, 9, 12], [2, 0, 2, 1])],
    ids=["uniform-batched", "ragged-grouped"],
)
def test_sgmv_twin_equals_per_segment_formula_with_gradients(starts, which):
    x, y0, a, b = leaves((12, 7), (12, 5), (3, 2, 7), (3, 5, 2))
    scales = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    out = sgmv_lora_torch(x, y0 * 1, a, b, scales, starts, which)
    pieces = []
    for s, adapter in enumerate(which):
        rows = slice(starts[s], starts[s + 1])
        update = scales[adapter] * x[rows] @ a[adapter].T @ b[adapter].T
        pieces.append(y0[rows] + update)
    want = torch.cat(pieces)
    torch.testing.assert_close(out, want)
    inputs = [x, y0, a, b]
    for got, exp in zip(grads(out, inputs), grads(want, inputs), strict=True):
        torch.testing.assert_close(got, exp)


# --- orthogonal transforms --------------------------------------------------------------------


@pytest.mark.parametrize("b, n", [(4, 16), (6, 3), (32, 2)], ids=["packed", "odd", "wide"])
def test_block_apply_twin_equals_the_dense_block_diagonal(b, n):
    x, blocks = leaves((5, n * b), (n, b, b))
    gather = torch.randperm(n * b)
    out = block_apply_torch(x, blocks, gather)
    want = x[:, gather] @ torch.block_diag(*blocks).T
    torch.testing.assert_close(out, want)
    for got, exp in zip(grads(out, [x, blocks]), grads(want, [x, blocks]), strict=True):
        torch.testing.assert_close(got, exp)


def test_butterfly_apply_chains_gathers_and_factors():
    (x,) = leaves((3, 16))
    factors = [torch.randn(4, 4, 4, dtype=torch.float64) for _ in range(2)]
    gathers = [None, torch.randperm(16), torch.randperm(16)]
    want = x @ torch.block_diag(*factors[0]).T
    want = want[:, gathers[1]] @ torch.block_diag(*factors[1]).T
    torch.testing.assert_close(butterfly_apply(x, factors, gathers), want[:, gathers[2]])


def test_cayley_twin_has_the_closed_form_gradient_of_the_solve():
    upper = 0.4 * torch.randn(3, 2, 10, dtype=torch.float64)  # b = 5
    upper.requires_grad_(True)
    skew = skew_from_upper(upper, 5)
    eye = torch.eye(5, dtype=torch.float64)
    want = (eye - skew) @ torch.linalg.inv(eye + skew)
    out = cayley_torch(upper, 5)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out @ out.transpose(-1, -2), eye.expand_as(out))
    torch.testing.assert_close(grads(out, [upper])[0], grads(want, [upper])[0])
    assert torch.autograd.gradcheck(lambda u: cayley_torch(u, 5), (upper,))


def perturbed(model: nn.Module, std: float = 0.2) -> nn.Module:
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(std * torch.randn_like(p))
    return adapter


def count_recomputed_weights(monkeypatch) -> list[int]:
    """Calls of the weight side's training function (it keeps no W' for the backward)."""
    calls: list[int] = []
    real = orthogonal.LinearWithRecomputedWeight.apply
    monkeypatch.setattr(
        orthogonal.LinearWithRecomputedWeight, "apply", lambda *a: calls.append(1) or real(*a)
    )
    return calls


@pytest.mark.parametrize(
    "method, tokens, weight_side",
    [("oft", 15, False), ("boft", 15, False), ("boft", 100, True)],
    ids=["oft", "boft_activation_side", "boft_weight_side"],
)
def test_orthogonal_training_paths_equal_the_transformed_weight_formula(
    method, tokens, weight_side, monkeypatch
):
    """OFT trains on the activations (y = W R^T x). BOFT does too while the activation W h
    its scale's gradient keeps is no larger than what HF PEFT keeps per layer
    (tokens * out <= 2 out d + 2 d^2 = 896 here), else it keeps the weight side and
    recomputes W' in the backward. Every path equals F.linear with W' = diag(s) W T^T,
    T built factor by factor."""
    lin = nn.Linear(16, 12).double()
    cfg = (
        OFT(block_size=4, targets=["0"])
        if method == "oft"
        else BOFT(block_size=4, butterfly_factors=2, targets=["0"])
    )
    model = core.inject(nn.Sequential(lin), cfg)
    adapter = perturbed(model)
    recomputed = count_recomputed_weights(monkeypatch)
    x = torch.randn(tokens, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert len(recomputed) == weight_side
    if method == "oft":
        want = F.linear(x, adapter.transformed_rows(lin), lin.bias)
    else:
        rows = adapter.rotate_factors(lin.weight) * adapter.scale[:, None]
        want = F.linear(x, rows, lin.bias)
    torch.testing.assert_close(out, want)
    params = [x, *adapter.parameters()]
    for got, exp in zip(grads(out, params), grads(want, params), strict=True):
        torch.testing.assert_close(got, exp)


def dense_grid(kind: str, blocks: torch.Tensor) -> torch.Tensor:
    """The (H K) x (H K) matrix of one grid op, coordinate i = h K + l."""
    if kind == "low":
        return torch.block_diag(*blocks)
    k, h = blocks.shape[0], blocks.shape[1]
    dense = blocks.new_zeros(h * k, h * k)
    idx = torch.arange(h * k).view(h, k)
    for col in range(k):
        rows = idx[:, col]
        dense = dense.index_put((rows[:, None], rows[None, :]), blocks[col])
    return dense


@pytest.mark.parametrize("with_scale", [True, False], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("d", [10, 12], ids=["padded", "exact"])
@pytest.mark.parametrize("rows", [7, 20], ids=["few_rows", "many_rows"])
@pytest.mark.parametrize("chain", ["mixed", "low_only"])
def test_grid_linear_equals_dense_products_with_every_gradient(with_scale, d, rows, chain):
    """y = s * (W (C_3 C_2 C_1 x)) + b with C_i block-diagonal along the rows (low) or the
    columns (high) of a 3 x 4 coordinate grid; d = 10 leaves the last two zero-padded.
    With more rows than d the backward scales W instead of dy; a chain of low ops only
    runs on token rows instead of token columns."""
    h, k = 3, 4
    high_shape = (k, h, h) if chain == "mixed" else (h, k, k)
    x, w, bias, scale, low, high, low2 = leaves(
        (rows, d), (5, d), (5,), (5,), (h, k, k), high_shape, (h, k, k)
    )
    scale = scale if with_scale else None
    ops = [("high" if chain == "mixed" else "low", high), ("low", low), ("low", low2)]

    def plain_formula(rows: torch.Tensor) -> torch.Tensor:
        total = torch.eye(h * k, dtype=torch.float64)
        for kind, blocks in ops:
            total = dense_grid(kind, blocks) @ total
        mixed = (F.pad(rows, (0, h * k - d)) @ total.T)[:, :d]
        out = F.linear(mixed, w, bias if scale is None else None)
        return out if scale is None else out * scale + bias

    fused, plain = grid_linear(x, w, bias, scale, ops), plain_formula(x)
    torch.testing.assert_close(fused, plain)
    inputs = [t for t in (x, w, bias, scale, low, high, low2) if t is not None]
    for got, want in zip(grads(fused, inputs), grads(plain, inputs), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(grid_linear_plain(x, w, bias, scale, ops), plain)
    frozen, plain = grid_linear(x.detach(), w, bias, scale, ops), plain_formula(x.detach())
    for got, want in zip(grads(frozen, inputs[1:]), grads(plain, inputs[1:]), strict=True):
        torch.testing.assert_close(got, want)  # no d(x) asked: the other grads unchanged


def count_grid_calls(monkeypatch) -> list[int]:
    """Calls of the activation side's grid path (``grid_linear``) from the adapters."""
    calls: list[int] = []
    real = orthogonal.grid_linear
    monkeypatch.setattr(orthogonal, "grid_linear", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("d", [12, 33, 64], ids=["12", "odd", "power_of_two"])
def test_qgoft_grid_equals_the_givens_stages_forward_and_gradients(d, monkeypatch):
    """qGOFT's stages run as a few grid ops on the activations; they equal T = N G_L ... G_1
    applied stage by stage (``rotate_stages``) to the weight, W' = W T^T, for y and for the
    gradients of x, the angles, the relative angles and the norm."""
    lin = nn.Linear(d, 9).double()
    model = core.inject(nn.Sequential(lin), QGOFT(targets=["0"]))
    adapter = perturbed(model, std=0.4)
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    out = model(x)
    want = F.linear(x, adapter.rotate_stages(lin.weight), lin.bias)
    torch.testing.assert_close(out, want)
    params = [x, adapter.theta, adapter.phi, adapter.norm]
    for got, exp in zip(grads(out, params), grads(want, params), strict=True):
        torch.testing.assert_close(got, exp)
    rows = torch.randn(4, d, dtype=torch.float64)
    torch.testing.assert_close(adapter.rotate(rows), adapter.rotate_stages(rows))
    with torch.no_grad():  # fewer tokens than the 9 outputs: the activation side, else weights
        for tokens, on_inputs in ((3, True), (40, False)):
            z = torch.randn(tokens, d, dtype=torch.float64)
            calls = count_grid_calls(monkeypatch)
            torch.testing.assert_close(
                model(z), F.linear(z, adapter.rotate_stages(lin.weight), lin.bias)
            )
            assert len(calls) == on_inputs, tokens


@pytest.mark.parametrize("method", ["boft", "qgoft"])
def test_grid_path_takes_strided_inputs_and_runs_under_autocast(method):
    """A transposed (non-contiguous) input gives the same output and d(x); under CPU
    autocast the plain composition runs in bfloat16 and stays close to float32."""
    cfg = BOFT(block_size=4, targets=["0"]) if method == "boft" else QGOFT(targets=["0"])
    model = core.inject(nn.Sequential(nn.Linear(48, 12)), cfg)  # BOFT: 3 blocks of 16
    perturbed(model)
    x = torch.randn(48, 6).t().requires_grad_(True)  # (6, 48), strides (1, 6)
    dense = x.detach().contiguous().requires_grad_(True)
    out, want = model(x), model(dense)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(grads(out, [x])[0], grads(want, [dense])[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(dense)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), want, atol=0.05, rtol=0.05)


def test_boft_factors_multiply_out_to_one_block_op(monkeypatch):
    """BOFT's m factors are one block-diagonal op of b 2^(m-1) (widened to 32 where d
    allows); over 256 the factor chain stays."""
    assert orthogonal.boft_grid_block(768, 8, 2) == 32
    assert orthogonal.boft_grid_block(48, 4, 3) == 16
    assert orthogonal.boft_grid_block(15, 5, 1) == 5
    assert orthogonal.boft_grid_block(4096, 64, 4) is None
    lin = nn.Linear(48, 6).double()
    model = core.inject(nn.Sequential(lin), BOFT(block_size=4, butterfly_factors=3, targets=["0"]))
    adapter = perturbed(model)
    rows = torch.randn(5, 48, dtype=torch.float64)
    torch.testing.assert_close(adapter.rotate(rows), adapter.rotate_factors(rows))
    [(kind, blocks)] = adapter.grid_ops()
    assert kind == "low" and blocks.shape == (3, 16, 16)
    with torch.no_grad():  # fewer tokens than the 6 outputs: the activation side, else weights
        for tokens, on_inputs in ((4, True), (20, False)):
            z = torch.randn(tokens, 48, dtype=torch.float64)
            calls = count_grid_calls(monkeypatch)
            want = F.linear(z, adapter.rotate_factors(lin.weight) * adapter.scale[:, None])
            torch.testing.assert_close(model(z), want + lin.bias)
            assert len(calls) == on_inputs, tokens


# --- scale and shift --------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 1])
def test_scale_shift_twin_equals_the_formula_and_keeps_the_input_dtype(axis):
    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    features = 4 if axis is None else 3
    scale, shift = torch.randn(features), torch.randn(features)
    out = scale_shift_torch(x, scale, shift, axis)
    view = (1, features, 1) if axis == 1 else (features,)
    want = (x.float() * scale.reshape(view) + shift.reshape(view)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)


# --- hand-written training steps: where they may run ------------------------------------------


def test_hand_written_step_fits_only_one_dtype_outside_autocast_and_off_meta():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    assert hand_written_step_fits(x, w, None)
    assert not hand_written_step_fits(x, w.double())
    assert not hand_written_step_fits(x.to("meta"), w.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not hand_written_step_fits(x, w)
        assert autocast_on(x) and not autocast_on(x.to("meta"))  # meta: never (no error)


META_METHODS = {
    "fourierft": lambda: core.FourierFT(n_frequency=20, targets=["0"]),
    "svft": lambda: core.SVFT(targets=["0"]),
    "lokr": lambda: core.LoKr(r=8, targets=["0"]),
    "boft": lambda: BOFT(block_size=4, targets=["0"]),
    "qgoft": lambda: QGOFT(targets=["0"]),
    "l4q": lambda: core.L4Q(targets=["0"]),
}


@pytest.mark.parametrize("method", META_METHODS)
def test_methods_with_their_own_training_step_run_a_meta_forward(method):
    """Meta tensors carry shapes only (model planning, counting): the training forward
    must give the output's shape there as the plain formula does, not ask autocast about
    the meta device or index by values."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(128, 96))
    core.inject(model, META_METHODS[method]())
    model.train()
    y = model(torch.randn(2, 4, 128, device="meta"))
    assert y.is_meta and y.shape == (2, 4, 96)
