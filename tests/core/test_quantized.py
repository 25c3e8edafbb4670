"""L4Q: the LoRA update merged before an LSQ quantiser; exported integers dequantise to
exactly the weight the training forward used; LSQ gradients; merge = quantise."""

import copy

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import core
from conftest import make_llama
from core.errors import ConfigError, TargetError
from core.methods.quantized import (
    L4Q,
    dequantize_groups,
    export_quantized,
    quantized_state_dict,
)


def l4q_model(bits=4, group_size=8, r=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 6))
    core.inject(model, L4Q(bits=bits, group_size=group_size, r=r, alpha=4, targets=["0"]))
    return model


def randomise(model, std=0.05):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".A", ".B")):
                p.normal_(std=std)


def reference_quantised_weight(weight, a, b, step, offset, scale, bits, group):
    """The paper's equations with autograd (straight-through round), as a check."""
    merged = weight + scale * b @ a
    grouped = merged.unflatten(1, (-1, group))
    v = (grouped - offset[..., None]) / step[..., None]
    clamped = torch.clamp(v, 0, 2**bits - 1)
    q = clamped + (torch.round(clamped) - clamped).detach()
    return (q * step[..., None] + offset[..., None]).flatten(1)


def test_config_defaults_and_validation():
    cfg = L4Q(targets=["q"])
    assert (cfg.bits, cfg.group_size, cfg.r, cfg.alpha) == (4, 128, 8, 16.0)
    assert L4Q.method == "l4q" and L4Q.mergeable
    with pytest.raises(ConfigError, match="bits must be one of 2, 3, 4, 8"):
        L4Q(bits=5, targets=["q"])
    with pytest.raises(ConfigError, match="group_size must be >= 1"):
        L4Q(group_size=0, targets=["q"])
    with pytest.raises(TargetError, match="does not divide d_in=16"):
        core.inject(nn.Sequential(nn.Linear(16, 4)), L4Q(group_size=5, targets=["0"]))
    narrow = nn.Sequential(nn.Linear(16, 4))  # a group wider than the row is the whole row
    core.inject(narrow, L4Q(group_size=128, targets=["0"]))
    assert narrow[0].adapters["default"].step.shape == (4, 1)
    with pytest.raises(TargetError, match="L4Q wraps nn.Linear"):
        core.inject(nn.Sequential(nn.Conv2d(2, 2, 1)), L4Q(targets=["0"]))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_forward_is_the_quantised_merged_weight_and_starts_at_quantised_w0(bits):
    model = l4q_model(bits=bits)
    layer, adapter = model[0], model[0].adapters["default"]
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    # At start B = 0: the layer is the min-max quantised W0 (not the identity, as the paper).
    quantised_w0 = reference_quantised_weight(
        w0, adapter.A, adapter.B, adapter.step, adapter.offset, 2.0, bits, 8
    )
    torch.testing.assert_close(layer(x), x @ quantised_w0.T + layer.base_layer.bias)
    levels = {len(row.unique()) for row in quantised_w0.detach().unflatten(1, (2, 8))[:, 0]}
    assert max(levels) <= 2**bits
    assert (quantised_w0 - w0).abs().max() <= adapter.step.max() / 2 + 1e-6
    randomise(model)
    want = reference_quantised_weight(
        w0, adapter.A, adapter.B, adapter.step, adapter.offset, 2.0, bits, 8
    )
    torch.testing.assert_close(layer(x), x @ want.T + layer.base_layer.bias)
    per_layer = 2 * (16 + 12) + 2 * 12 * (16 // 8)  # r (d_in + d_out) + 2 d_out d_in / g
    assert core.param_report(model).by_adapter["default"]["params"] == per_layer


def test_custom_backward_matches_autograd_of_the_equations():
    model = l4q_model(bits=3)
    randomise(model, std=0.2)
    layer, adapter = model[0], model[0].adapters["default"]
    with torch.no_grad():  # push some entries outside the range: both LSQ branches run
        adapter.offset.add_(0.05 * torch.randn_like(adapter.offset))
        adapter.step.mul_(0.7)
    x = torch.randn(3, 4, 16, requires_grad=True)
    grad = torch.randn(3, 4, 12)
    (layer(x) * grad).sum().backward()
    ours = {n: p.grad.clone() for n, p in adapter.named_parameters()} | {"x": x.grad.clone()}
    x.grad = None
    for p in adapter.parameters():
        p.grad = None
    w0 = layer.base_layer.weight
    w_hat = reference_quantised_weight(
        w0, adapter.A, adapter.B, adapter.step, adapter.offset, 2.0, 3, 8
    )
    ((x @ w_hat.T) * grad).sum().backward()
    for name, p in adapter.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["x"], x.grad, atol=1e-5, rtol=1e-4)
    assert all(ours[n].abs().sum() > 0 for n in ("A", "B", "step", "offset"))
    assert layer.base_layer.weight.grad is None


def test_exported_integers_dequantise_to_exactly_the_training_weight(tmp_path):
    model = l4q_model(bits=3)
    randomise(model)
    layer, adapter = model[0], model[0].adapters["default"]
    exported = export_quantized(model)
    qw = exported["0"]
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 7
    assert qw.step.shape == (12, 2) and (qw.bits, qw.group_size) == (3, 8)
    with torch.no_grad():
        training_weight = adapter.quantized_weight(layer.base_layer)
    assert torch.equal(qw.dequantize(), training_weight)  # bit for bit
    path = tmp_path / "int.safetensors"
    safetensors.torch.save_file(quantized_state_dict(exported), str(path))
    loaded = safetensors.torch.load_file(str(path))
    q = loaded["0.qweight"].float().unflatten(1, (2, 8))
    assert torch.equal(dequantize_groups(q, loaded["0.step"], loaded["0.offset"]), training_weight)
    x = torch.randn(4, 16)
    with torch.no_grad():
        deployed = x @ qw.dequantize().T + layer.base_layer.bias
        torch.testing.assert_close(layer(x), deployed)


def test_merge_is_quantisation_and_unmerge_restores_w0(tmp_path):
    model = l4q_model()
    randomise(model)
    original = model[0].base_layer.weight.detach().clone()
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = model(x)
        exported = export_quantized(model)["0"].dequantize()
        core.merge(model)
        assert torch.equal(model[0].base_layer.weight, exported)
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
        with pytest.raises(core.MergeError, match="unmerge"):
            export_quantized(model)
        core.unmerge(model)
    assert torch.equal(model[0].base_layer.weight, original)
    pristine = nn.Sequential(copy.deepcopy(model[0].base_layer), nn.GELU(), model[2])
    core.save_adapter(model, tmp_path)
    core.load_adapter(pristine, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pristine(x), before)


def test_trains_a_llama_and_counts_on_the_meta_device():
    model = make_llama()
    core.inject(model, L4Q(bits=2, group_size=32, r=4, targets=["q_proj", "down_proj"]))
    ids = torch.randint(0, 128, (2, 5))
    model(input_ids=ids).logits.sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    with torch.device("meta"):
        meta = make_llama()
    core.inject(meta, L4Q(bits=2, group_size=32, r=4, targets=["q_proj", "down_proj"]))
    q_proj = 4 * (64 + 64) + 2 * 64 * (64 // 32)
    down_proj = 4 * (128 + 64) + 2 * 64 * (128 // 32)
    assert core.param_report(meta).by_adapter["default"]["params"] == 2 * (q_proj + down_proj)


# --- the fast training layer against autograd of the paper's equations ------------------------


def fast_and_reference_grads(layer, x, grad, bias_trains):
    """Output and gradients (adapter tensors, x if it requires grad, bias if it trains) of the
    layer's own Function and of autograd through ``reference_quantised_weight``."""
    adapter, base = layer.adapters["default"], layer.base_layer
    base.bias.requires_grad_(bias_trains)
    tensors = dict(adapter.named_parameters())
    if bias_trains:
        tensors["bias"] = base.bias
    if x.requires_grad:
        tensors["x"] = x
    results = []
    for run in ("fast", "reference"):
        for t in tensors.values():
            t.grad = None
        if run == "fast":
            y = layer(x)
        else:
            w_hat = reference_quantised_weight(
                base.weight, adapter.A, adapter.B, adapter.step, adapter.offset,
                adapter.scale, adapter.bits, adapter.group_size,
            )  # fmt: skip
            y = x @ w_hat.T + base.bias
        (y * grad).sum().backward()
        results.append((y.detach(), {n: t.grad.clone() for n, t in tensors.items()}))
    base.bias.requires_grad_(False)
    return results


@pytest.mark.parametrize("x_grad, bias_trains", [(True, False), (False, True)])
def test_fast_layer_equals_the_equations_on_odd_shapes(x_grad, bias_trains):
    """Forward and every gradient (A, B, s, beta, x; the bias when it trains) at 18 inputs in
    3 groups of 6, 7 outputs, a (2, 5, 18) input, both LSQ branches; without x's gradient
    (the first adapted layer) the backward skips W_hat and must still give the rest."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(18, 7))
    core.inject(model, L4Q(bits=3, group_size=6, r=3, alpha=5, targets=["0"]))
    randomise(model, std=0.2)
    adapter = model[0].adapters["default"]
    with torch.no_grad():  # push entries out of range on both sides
        adapter.offset.add_(0.1 * torch.randn_like(adapter.offset))
        adapter.step.mul_(0.6)
    x = torch.randn(2, 5, 18, requires_grad=x_grad)
    grad = torch.randn(2, 5, 7)
    (y, ours), (want_y, want) = fast_and_reference_grads(model[0], x, grad, bias_trains)
    torch.testing.assert_close(y, want_y)
    assert set(ours) == set(want) == {"A", "B", "step", "offset"} | ({"x"} if x_grad else {"bias"})
    for name in want:
        torch.testing.assert_close(ours[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
        assert ours[name].abs().sum() > 0, name
    v = adapter.quantized_weight(model[0].base_layer) - adapter.offset.repeat_interleave(6, 1)
    codes = (v / adapter.step.repeat_interleave(6, 1)).round()
    assert (codes == 0).any() and (codes == 7).any()  # both clamps were exercised


def test_entries_exactly_at_a_bound_take_the_clamped_branch():
    """Entries whose v is exactly 0 or 2^bits - 1 (as each group's minimum at the min-max
    start; here A = 0 so W' = W0 bit for bit) take LSQ's clamped branch (its range is strict,
    as clamp's gradient): no gradient to W', all of it to beta."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 5, bias=True))
    with torch.no_grad():  # steps and offsets that are powers of two: v hits 0 and 15 exactly
        levels = torch.randint(0, 16, (5, 10)).float()
        levels[:, 0], levels[:, 5] = 0.0, 15.0
        model[0].weight.copy_(0.25 * levels - 1.0)
    core.inject(model, L4Q(bits=4, group_size=5, r=2, alpha=2, targets=["0"]))
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.A.zero_()
        adapter.B.normal_()
        adapter.step.fill_(0.25)
        adapter.offset.fill_(-1.0)
    x = torch.randn(6, 10, requires_grad=True)
    grad = torch.randn(6, 5)
    (y, ours), (want_y, want) = fast_and_reference_grads(model[0], x, grad, False)
    torch.testing.assert_close(y, want_y)
    for name in ("A", "step", "offset", "x"):
        torch.testing.assert_close(ours[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    at_bound = (levels == 0) | (levels == 15)
    assert (ours["A"][:, at_bound.all(0)] == 0).all()  # columns 0 and 5: clamped in every row
    assert (ours["A"][:, ~at_bound.any(0)] != 0).all()
    g = grad.T @ x.detach()  # dL/dW_hat; beta collects it exactly at the bounds
    expected_offset = (g * at_bound).unflatten(1, (2, 5)).sum(-1)
    torch.testing.assert_close(ours["offset"], expected_offset, atol=1e-5, rtol=1e-5)


def test_cpu_autocast_runs_the_fast_layer_in_bfloat16_forward_and_backward():
    """Under autocast the layer's GEMMs take bfloat16 x and W_hat (as autocast casts a linear);
    the backward then gets one dtype too (it used to mix a bfloat16 dy with a float32 x) and
    its gradients stay close to the float32 step's."""
    model = l4q_model()
    randomise(model, std=0.2)
    layer, adapter = model[0], model[0].adapters["default"]
    x = torch.randn(4, 16, requires_grad=True)
    grad = torch.randn(4, 12)
    params = [x, *adapter.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = layer(x)
    assert cast.dtype == torch.bfloat16
    w_hat = adapter.quantized_weight(layer.base_layer).detach()
    bias = layer.base_layer.bias.detach()
    want = F.linear(x.detach().bfloat16(), w_hat.bfloat16(), bias.bfloat16())
    torch.testing.assert_close(cast, want)
    cast_grads = torch.autograd.grad(cast.float(), params, grad)
    full_grads = torch.autograd.grad(layer(x), params, grad)
    assert cast_grads[0].dtype == torch.float32  # d(x) back in x's dtype
    for got, exact in zip(cast_grads, full_grads, strict=True):
        assert exact.abs().sum() > 0
        assert (got - exact).norm() < 0.03 * exact.norm()  # bfloat16 rounding only
