import math

import pytest
import torch
import torch.nn as nn

import core
from conftest import randomise
from core.layers import AdaptedModule


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.lin = nn.Linear(8, 12)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, ids, img, vol):
        h = self.emb(ids)  # (B, T, 8)
        h = self.lin(h)
        seq = self.c1(h[..., :8].transpose(1, 2))
        return h.sum() + seq.sum(), self.c2(img), self.c3(vol), h, seq


def inputs():
    return (
        torch.randint(0, 20, (2, 7)),
        torch.randn(2, 3, 9, 9),
        torch.randn(1, 2, 3, 6, 6),
    )


def test_forward_follows_the_equation_on_linear():
    lin = nn.Linear(6, 5)
    model = nn.Sequential(lin)
    core.inject(model, core.LoRA(r=3, alpha=6, targets=["0"]))
    randomise(model, std=0.1)
    a, b = model[0].adapters["default"].A, model[0].adapters["default"].B
    x = torch.randn(4, 6)
    expected = x @ lin.weight.T + lin.bias + (6 / 3) * x @ a.T @ b.T
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_unmerge_exact_on_every_layer_type(use_rslora):
    net = Net().eval()
    core.inject(
        net,
        core.LoRA(r=2, alpha=3, use_rslora=use_rslora, targets=["emb", "lin", "c1", "c2", "c3"]),
    )
    randomise(net, std=0.1)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "base_layer" in k}
    x = inputs()
    adapted = net(*x)
    core.merge(net)
    merged = net(*x)
    for got, want in zip(merged, adapted, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    core.unmerge(net)
    for k, v in net.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)
    for got, want in zip(net(*x), adapted, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_parameter_counts_follow_the_formulas():
    net = Net()
    core.inject(net, core.LoRA(r=2, targets=["emb", "lin", "c1", "c2", "c3"]))
    per = {
        p: sum(t.numel() for t in w.adapters["default"].parameters())
        for p, w in core.targeting.adapted_modules(net)
    }
    assert per["lin"] == 2 * (8 + 12)
    assert per["emb"] == 2 * (20 + 8)
    assert per["c1"] == 2 * 8 * 3 + 6 * 2
    assert per["c2"] == 2 * 3 * 3 * 3 + 5 * 2
    assert per["c3"] == 2 * 2 * 1 * 3 * 3 + 4 * 2


def test_gradients_reach_only_the_adapter():
    net = Net()
    core.inject(net, core.LoRA(r=2, targets=["lin", "c2"]))
    out = net(*inputs())
    (out[0] + out[1].sum()).backward()
    for name, p in net.named_parameters():
        if ".adapters." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0 or name.endswith(".A")
        else:
            assert p.grad is None, name


def test_dropout_acts_in_training_only():
    model = nn.Sequential(nn.Linear(16, 16))
    core.inject(model, core.LoRA(r=4, dropout=0.5, targets=["0"]))
    randomise(model, std=0.1)
    x = torch.randn(8, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_half_precision_base_trains_float32_adapter():
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))
    core.inject(model, core.LoRA(r=2, targets=["0"]))
    adapter = model[0].adapters["default"]
    assert adapter.A.dtype == torch.float32
    out = model(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_transformers_conv1d_gpt2_layout():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(10, 6))  # weight stored (in=6, out=10)
    x = torch.randn(3, 6)
    core.inject(model, core.LoRA(r=2, alpha=2, targets=["0"]))
    randomise(model, std=0.1)
    a, b = model[0].adapters["default"].A, model[0].adapters["default"].B
    torch.testing.assert_close(model(x), x @ model[0].weight + model[0].bias + x @ a.T @ b.T)
    before = model(x)
    core.merge(model)
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)


def test_init_choices():
    for init in ("kaiming", "gaussian"):
        model = nn.Sequential(nn.Linear(64, 32))
        core.inject(model, core.LoRA(r=8, init=init, targets=["0"]))
        adapter = model[0].adapters["default"]
        assert torch.count_nonzero(adapter.B) == 0
        if init == "gaussian":
            assert adapter.A.std().item() == pytest.approx(1 / 8, rel=0.15)
        else:  # kaiming uniform with a=sqrt(5): bound 1/sqrt(fan_in)
            assert adapter.A.abs().max() <= 1 / math.sqrt(64) + 1e-6


def test_pissa_moves_the_principal_part_into_the_adapter():
    lin = nn.Linear(24, 16)
    original = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    x = torch.randn(5, 24)
    before = model(x)
    core.inject(model, core.LoRA(r=4, alpha=8, init="pissa", targets=["0"]))
    adapter = model[0].adapters["default"]
    # output unchanged at start; the residual has the top-4 directions removed
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    s_orig = torch.linalg.svdvals(original)
    s_res = torch.linalg.svdvals(lin.weight.detach())
    torch.testing.assert_close(s_res[:12], s_orig[4:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        2.0 * adapter.B @ adapter.A, original - lin.weight, atol=1e-5, rtol=1e-4
    )
    core.delete_adapter(model, "default")
    torch.testing.assert_close(model[0].weight, original, atol=1e-6, rtol=0)


def test_pissa_refused_on_conv():
    with pytest.raises(core.TargetError, match="pissa"):
        core.inject(Net(), core.LoRA(init="pissa", targets=["c2"]))


def test_wrapper_exposes_base_attributes(vit):
    core.inject(vit, core.LoRA(targets=["qkv"]))
    wrapper = vit.blocks[0].attn.qkv
    assert isinstance(wrapper, AdaptedModule)
    assert wrapper.in_features == 64 and wrapper.weight is wrapper.base_layer.weight
