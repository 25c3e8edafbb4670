"""core.compose: adapter arithmetic, PEFT-equal merges, ComPEFT and run-time composition."""

import copy
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import core
from conftest import make_llama, make_vit, randomise
from core import compose
from core.compose import (
    AdapterFusion,
    AdapterState,
    Average,
    BatchSplit,
    Fuse,
    Parallel,
    Split,
    Stack,
)
from core.errors import CheckpointError, ConfigError, MergeError
from core.layers import Adapter

VIT_LORA = ["qkv", "proj", "fc1", "fc2"]  # "proj" also hits patch_embed.proj, a Conv2d
LLAMA_LORA = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids oversubscribing the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vit_x(n=2):
    return torch.randn(n, 3, 32, 32)


def run(model, x, names=None):
    if names is not None:
        core.set_active(model, names)
    with torch.no_grad():
        return model(x)


def run_in(model, module, x, names):
    """``module``'s output (a part of ``model``) with ``names`` active in the whole model."""
    core.set_active(model, names)
    with torch.no_grad():
        return module(x)


def adapters_named(model, name):
    return {
        p: w.adapters[name] for p, w in core.targeting.adapted_modules(model) if name in w.adapters
    }


def two_loras(targets_b=("qkv", "fc2")):
    model = make_vit()
    core.inject(model, core.LoRA(r=4, alpha=8, targets=["qkv", "fc1", "proj"]), "a")
    core.inject(model, core.LoRA(r=2, alpha=6, targets=list(targets_b)), "b")
    randomise(model, std=0.1)
    return model


# =========================================================================================
# Arithmetic
# =========================================================================================


def test_update_space_addition_is_the_exact_weighted_sum_of_updates():
    model = two_loras()
    compose.add(model, {"a": 0.7, "b": -1.3}, "sum")
    a, b, s = (adapters_named(model, n) for n in ("a", "b", "sum"))
    assert set(s) == set(a) | set(b)
    for path, adapter in s.items():
        want = torch.zeros_like(adapter.delta_weight())
        if path in a:
            want += 0.7 * a[path].delta_weight()
        if path in b:
            want -= 1.3 * b[path].delta_weight()
        torch.testing.assert_close(adapter.delta_weight(), want, atol=1e-6, rtol=1e-5)
        # parameter count by formula: rank r_a + r_b where both adapt, (r)(d_out + d_in)
        rank = 4 * (path in a) + 2 * (path in b)
        out_f, in_f = adapter.delta_weight().flatten(1).shape
        assert adapter.r == rank and adapter.scale == 1.0
        assert adapter.A.numel() + adapter.B.numel() == rank * (out_f + in_f)
    # weights (1, 1): the new adapter alone computes what both stacked compute
    compose.add(model, {"a": 1, "b": 1}, "both")
    x = vit_x()
    torch.testing.assert_close(
        run(model, x, ["both"]), run(model, x, ["a", "b"]), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "build, targets, x",
    [
        (make_vit, VIT_LORA, lambda: vit_x()),
        (make_llama, LLAMA_LORA, lambda: torch.randint(0, 128, (2, 7))),
    ],
)
def test_lora_negation_on_top_of_itself_gives_the_base_output(build, targets, x):
    model = build()
    inputs = x()
    base = run(model, inputs)
    core.inject(model, core.LoRA(r=4, alpha=8, targets=targets), "a")
    randomise(model, std=0.1)
    compose.negate(model, "a", "neg")
    neg = adapters_named(model, "neg")
    for path, adapter in adapters_named(model, "a").items():  # (A, -B): the product negated
        assert torch.equal(neg[path].A, adapter.A) and torch.equal(neg[path].B, -adapter.B)
    adapted = run(model, inputs, ["a"])
    logits = (lambda o: o.logits) if build is make_llama else (lambda o: o)
    assert (logits(adapted) - logits(base)).abs().max() > 1e-2
    torch.testing.assert_close(
        logits(run(model, inputs, ["a", "neg"])), logits(base), atol=1e-5, rtol=1e-5
    )


def ia3_model(names=("a", "b")):
    model = make_vit()
    for name in names:
        core.inject(model, core.IA3(targets=["qkv", "fc2"], feedforward_modules=["fc2"]), name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def test_ia3_arithmetic_is_linear_in_l_minus_one_and_negation_is_two_minus_l():
    model = ia3_model()
    compose.add(model, {"a": 0.5, "b": -2.0}, "sum")
    compose.negate(model, "a", "neg")
    a, b, s, n = (adapters_named(model, k) for k in ("a", "b", "sum", "neg"))
    for path in a:
        torch.testing.assert_close(
            s[path].scale, 1 + 0.5 * (a[path].scale - 1) - 2 * (b[path].scale - 1)
        )
        assert torch.equal(n[path].scale, 2 - a[path].scale)
        assert s[path].input_side == a[path].input_side == path.endswith("fc2")
    # the update l * y - y is linear in l, so the sum's update is the weighted sum of updates
    layer = model.blocks[0].attn.qkv
    h = torch.randn(3, 5, 64)
    outs = {k: run_in(model, layer, h, [k]) for k in ("a", "b", "sum")}
    plain = layer.base_layer(h)
    want = 0.5 * (outs["a"] - plain) - 2.0 * (outs["b"] - plain)
    torch.testing.assert_close(outs["sum"] - plain, want, atol=1e-5, rtol=1e-5)


def test_parameter_space_addition_is_the_papers_elementwise_sum():
    model = make_vit()
    for name in ("a", "b"):
        core.inject(model, core.LoRA(r=4, alpha=8, targets=["qkv"]), name)
    randomise(model, std=0.1)
    compose.add(model, {"a": 0.3, "b": 0.7}, "mix", space="parameters")
    a, b, m = (adapters_named(model, k) for k in ("a", "b", "mix"))
    for path in a:
        torch.testing.assert_close(m[path].A, 0.3 * a[path].A + 0.7 * b[path].A)
        want = 2.0 * (0.3 * a[path].B + 0.7 * b[path].B) @ (0.3 * a[path].A + 0.7 * b[path].A)
        torch.testing.assert_close(m[path].delta_weight(), want, atol=1e-6, rtol=1e-5)
        assert m[path].r == 4
    with pytest.raises(ConfigError, match="space='update'"):
        compose.add(two_loras(), {"a": 1, "b": 1}, "x", space="parameters")


def test_language_task_arithmetic_adds_the_language_difference():
    model = make_vit()
    for name in ("task", "de", "en"):
        core.inject(model, core.LoRA(r=2, targets=["qkv", "fc1"]), name)
    randomise(model, std=0.1)
    compose.language_task_arithmetic(
        model, "task", "de", "task_de", source_language="en", language_weight=0.8
    )
    mods = {k: adapters_named(model, k) for k in ("task", "de", "en", "task_de")}
    for path, adapter in mods["task_de"].items():
        want = mods["task"][path].delta_weight() + 0.8 * (
            mods["de"][path].delta_weight() - mods["en"][path].delta_weight()
        )
        torch.testing.assert_close(adapter.delta_weight(), want, atol=1e-6, rtol=1e-5)


def ext_sub_reference(plus, minus, lam):
    """Hu et al.'s Ext-Sub on dense rows, straight from the definition."""
    n1, n2 = F.normalize(plus, dim=-1), F.normalize(minus, dim=-1)
    c = F.normalize(n1 + n2, dim=-1)
    proj = (minus * c).sum(-1, keepdim=True) * c
    return plus - lam * (minus - proj)


def test_ext_sub_subtracts_only_what_the_anti_expert_does_not_share():
    model = two_loras(targets_b=("qkv", "fc1"))
    compose.ext_sub(model, "a", "b", "clean", weight=0.6)
    a, b, c = (adapters_named(model, k) for k in ("a", "b", "clean"))
    for path, adapter in c.items():
        plus = a[path].delta_weight().flatten(1) if path in a else None
        minus = b[path].delta_weight().flatten(1) if path in b else None
        if minus is None:  # nothing to subtract here
            want = plus
        else:
            want = ext_sub_reference(plus, minus, 0.6)
        torch.testing.assert_close(adapter.delta_weight().flatten(1), want, atol=1e-5, rtol=1e-4)
        assert adapter.r == 4 + 2 * (path in b) + (path not in b)  # exact: ranks add up
    # an anti-expert identical to the expert shares everything: nothing is subtracted
    compose.ext_sub(model, "a", "a", "same")
    for path, adapter in adapters_named(model, "same").items():
        torch.testing.assert_close(
            adapter.delta_weight(), a[path].delta_weight(), atol=1e-6, rtol=1e-5
        )
    # (IA)^3: the same rule on l - 1 (one vector per layer)
    ia3 = ia3_model()
    compose.ext_sub(ia3, "a", "b", "clean", weight=0.5)
    a, b, c = (adapters_named(ia3, k) for k in ("a", "b", "clean"))
    for path in a:
        want = ext_sub_reference(
            (a[path].scale - 1).reshape(1, -1), (b[path].scale - 1).reshape(1, -1), 0.5
        )
        torch.testing.assert_close((c[path].scale - 1).reshape(1, -1), want, atol=1e-6, rtol=1e-5)


def test_arithmetic_refuses_what_it_cannot_express():
    model = two_loras()
    core.inject(model, core.IA3(targets=["fc2"]), "ia3")
    with pytest.raises(ConfigError, match="one method"):
        compose.add(model, {"a": 1, "ia3": 1}, "x")
    core.inject(model, core.Bottleneck(targets=["mlp"]), "bn")
    with pytest.raises(ConfigError, match="run time"):
        compose.negate(model, "bn", "x")
    core.inject(model, core.LoRA(targets=["qkv"], modules_to_save=["head"]), "headed")
    with pytest.raises(ConfigError, match="modules_to_save"):
        compose.add(model, {"a": 1, "headed": 1}, "x")
    with pytest.raises(ConfigError, match="already has an adapter"):
        compose.add(model, {"a": 1}, "b")
    with pytest.raises(ConfigError, match="density"):
        compose.merge_adapters(model, {"a": 1, "b": 1}, "x", method="ties")
    with pytest.raises(ConfigError, match="same rank"):
        compose.merge_adapters(model, {"a": 1, "b": 1}, "x", method="linear")
    with pytest.raises(ConfigError, match="must be one of"):
        compose.merge_adapters(model, {"a": 1, "b": 1}, "x", method="average")
    assert "x" not in core.adapter_names(model)


# =========================================================================================
# Merging: equal to PEFT's add_weighted_adapter
# =========================================================================================


def peft_pair(build, targets, kind):
    """(omnipeft model, PEFT model) holding the same two adapters "a"/"b" ("default"/"other")."""
    base = build()
    ours = copy.deepcopy(base)
    if kind == "lora":
        first = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
        second = peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets[:2])
    else:
        first = peft.IA3Config(target_modules=targets, feedforward_modules=targets[-1:])
        second = first
    theirs = peft.get_peft_model(base, first)
    theirs.add_adapter("other", second)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
            if "ia3_l" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return ours, theirs


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    torch.manual_seed(0)
    ours, theirs = peft_pair(make_vit, VIT_LORA, "lora")
    folder = tmp_path_factory.mktemp("peft")
    theirs.save_pretrained(folder)
    core.interop.load_peft(ours, folder, name="a")
    core.interop.load_peft(ours, folder / "other", name="b")
    return ours, theirs


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    torch.manual_seed(1)
    ours, theirs = peft_pair(make_llama, LLAMA_LORA, "lora")
    folder = tmp_path_factory.mktemp("peft_llama")
    theirs.save_pretrained(folder)
    core.interop.load_peft(ours, folder, name="a")
    core.interop.load_peft(ours, folder / "other", name="b")
    return ours, theirs


def seeded_bernoulli(monkeypatch, seed):
    """torch.bernoulli drawing from a generator reseeded here: PEFT and omnipeft then see
    the same random drops (PEFT's add_weighted_adapter also draws initialisations from the
    global generator before it drops, which would shift a plain manual_seed)."""
    original = torch.bernoulli
    state = {"gen": torch.Generator().manual_seed(seed), "calls": 0}

    def draw(p, *args, generator=None, **kwargs):
        state["calls"] += 1
        return original(p, generator=state["gen"])

    monkeypatch.setattr(torch, "bernoulli", draw)

    def reseed():
        state["gen"] = torch.Generator().manual_seed(seed)

    return reseed, state


MERGES = [
    ("linear", {}, (0.7, 0.3)),
    ("linear", {}, (1.0, -0.6)),
    ("cat", {}, (0.7, -0.3)),
    ("svd", {"svd_rank": 3}, (0.7, 0.3)),
    ("svd", {"svd_rank": 4, "svd_clamp": 0.9}, (1.0, -0.5)),
    ("ties", {"density": 0.5}, (0.7, 0.3)),
    ("ties", {"density": 0.5, "majority_sign_method": "frequency"}, (1.0, -0.6)),
    ("magnitude_prune", {"density": 0.4}, (0.7, 0.3)),
    ("dare_linear", {"density": 0.6}, (0.7, 0.3)),
    ("dare_ties", {"density": 0.6}, (1.0, -0.6)),
    ("ties_svd", {"density": 0.5, "svd_rank": 5}, (0.7, 0.3)),
    ("dare_linear_svd", {"density": 0.5}, (0.7, 0.3)),
]


@pytest.mark.parametrize("case", ["vit", "llama"])
@pytest.mark.parametrize("method, options, weights", MERGES)
def test_merges_equal_peft_add_weighted_adapter(
    request, monkeypatch, case, method, options, weights
):
    ours, theirs = request.getfixturevalue(f"{case}_pair")
    name = f"m_{method}_{abs(hash((weights, tuple(options.items())))) % 10**8}"
    reseed, draws = seeded_bernoulli(monkeypatch, seed=123)
    theirs.add_weighted_adapter(
        ["default", "other"], list(weights), name, combination_type=method, **options
    )
    peft_draws = draws["calls"]
    reseed()
    compose.merge_adapters(ours, {"a": weights[0], "b": weights[1]}, name, method=method, **options)
    assert draws["calls"] == 2 * peft_draws  # the same number of random draws, same order
    theirs.set_adapter(name)
    x = vit_x() if case == "vit" else torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    if case == "llama":
        got, want = got.logits, want.logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_dare_parity_is_not_vacuous(vit_pair, monkeypatch):
    """Other random drops give another merge, so equal outputs above mean equal drops."""
    ours, _ = vit_pair
    x = vit_x()
    outs = []
    for seed in (1, 2):
        seeded_bernoulli(monkeypatch, seed)
        compose.merge_adapters(
            ours, {"a": 0.5, "b": 0.5}, f"dare{seed}", method="dare_linear", density=0.5
        )
        outs.append(run(ours, x))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_ia3_merges_equal_peft_when_weights_sum_to_one(tmp_path):
    ours, theirs = peft_pair(make_vit, ["qkv", "fc2"], "ia3")
    theirs.save_pretrained(tmp_path)
    core.interop.load_peft(ours, tmp_path, name="a")
    core.interop.load_peft(ours, tmp_path / "other", name="b")
    theirs.add_weighted_adapter(["default", "other"], [0.6, 0.4], "mix")
    theirs.set_adapter("mix")
    compose.merge_adapters(ours, {"a": 0.6, "b": 0.4}, "mix")
    x = vit_x()
    torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=1e-5)
    # TIES on the task vectors l - 1, which PEFT's (IA)^3 lacks: trimmed and sign-elected
    compose.merge_adapters(ours, {"a": 1.0, "b": 1.0}, "ties", method="ties", density=0.3)
    a, b, t = (adapters_named(ours, k) for k in ("a", "b", "ties"))
    for path in a:
        tau = torch.stack([a[path].scale - 1, b[path].scale - 1])
        kept = (t[path].scale - 1) != 0
        assert kept.sum() <= 2 * int(0.3 * tau[0].numel())
        sign = torch.where(torch.stack([keep_top(v, 0.3) for v in tau]).sum(0) >= 0, 1.0, -1.0)
        assert ((t[path].scale - 1)[kept].sign() == sign[kept]).all()


def keep_top(t, density):
    k = int(density * t.numel())
    mask = torch.zeros(t.numel())
    mask[t.abs().flatten().topk(k).indices] = 1
    return t * mask.view_as(t)


def test_svd_recompression_keeps_the_top_singular_directions():
    model = two_loras(targets_b=("qkv", "fc1"))
    compose.merge_adapters(model, {"a": 1.0, "b": 1.0}, "r3", method="svd", svd_rank=3)
    compose.merge_adapters(model, {"a": 1.0}, "a_again", method="svd", svd_rank=4)
    a, b, r3, again = (adapters_named(model, k) for k in ("a", "b", "r3", "a_again"))
    for path, adapter in r3.items():
        full = a[path].delta_weight() + (b[path].delta_weight() if path in b else 0)
        s_full = torch.linalg.svdvals(full.flatten(1))
        s_new = torch.linalg.svdvals(adapter.delta_weight().flatten(1))
        torch.testing.assert_close(s_new[:3], s_full[:3], atol=1e-5, rtol=1e-4)
        assert s_new[3:].abs().max() < 1e-5 and adapter.r == 3
        # rank 4 >= the adapter's own rank: re-compression reproduces it exactly
        torch.testing.assert_close(
            again[path].delta_weight(), a[path].delta_weight(), atol=1e-5, rtol=1e-4
        )


# =========================================================================================
# ComPEFT
# =========================================================================================


def payload_bytes(folder):
    """Bytes of tensor data in adapter.safetensors (file minus its JSON header)."""
    data = (folder / "adapter.safetensors").read_bytes()
    return len(data) - 8 - struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("density", [0.2, 0.02])
def test_compressed_checkpoint_size_and_error_follow_the_formula(tmp_path, density):
    model = make_vit()
    core.inject(model, core.LoRA(r=4, targets=VIT_LORA), "a")
    randomise(model, std=0.1)
    core.save_adapter(model, tmp_path / "a", name="a")
    out = compose.compress(tmp_path / "a", density=density)
    original = AdapterState.load(tmp_path / "a")
    meta = json.loads((out / "adapter.json").read_text())
    expected_bytes = 0
    for key, tensor in original.flat().items():
        n = tensor.numel()
        k = int(density * n)
        info = meta["encoding"]["tensors"][key]
        assert info["kept"] == k
        positions = min((n + 7) // 8, 4 * k)  # bitmask or int32 indices, whichever is smaller
        assert info["positions"] == ("mask" if positions == (n + 7) // 8 else "index")
        expected_bytes += positions + (k + 7) // 8 + 4
    assert payload_bytes(out) == expected_bytes
    assert payload_bytes(out) < payload_bytes(tmp_path / "a") * (0.2 if density == 0.2 else 0.05)
    # loads as a normal LoRA adapter; each tensor is its top-k signs times mean |kept|
    fresh = make_vit()
    core.load_adapter(fresh, out, name="c")
    for path, adapter in adapters_named(fresh, "c").items():
        for name in ("A", "B"):
            tau = original.modules[path][name].flatten()
            got = getattr(adapter, name).detach().flatten()
            k = int(density * tau.numel())
            kept = tau.abs().topk(k).values
            assert int((got != 0).sum()) == k
            assert torch.equal(got != 0, tau.abs() >= kept.min())
            assert torch.equal(got[got != 0].sign(), tau[got != 0].sign())
            # ||tau - tau~||^2 = ||tau||^2 - (sum |tau_kept|)^2 / k  for the least-squares scale
            predicted = tau.pow(2).sum() - kept.sum() ** 2 / k
            torch.testing.assert_close((tau - got).pow(2).sum(), predicted, atol=1e-5, rtol=1e-4)


def test_compress_with_the_papers_std_scale_and_rejects_bad_files(tmp_path):
    model = ia3_model(names=("a",))
    core.save_adapter(model, tmp_path / "a", name="a")
    out = compose.compress(tmp_path / "a", density=0.5, alpha=2.0, out=tmp_path / "c")
    original, packed = AdapterState.load(tmp_path / "a"), AdapterState.load(out)
    for path, tensors in original.modules.items():
        tau = tensors["scale"] - 1
        got = packed.modules[path]["scale"] - 1
        scale = got.abs().max()
        torch.testing.assert_close(scale, 2.0 * tau.std(correction=0), rtol=1e-5, atol=1e-7)
        assert int((got != 0).sum()) == int(0.5 * tau.numel())
    with pytest.raises(ConfigError):
        compose.compress(tmp_path / "a", density=1.5)
    meta = json.loads((out / "adapter.json").read_text())
    key = next(iter(meta["encoding"]["tensors"]))
    meta["encoding"]["tensors"][key]["kept"] += 1  # a corrupt count
    (out / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt"):
        core.load_adapter(make_vit(), out)


def test_compressed_trained_adapter_changes_outputs_in_the_original_direction(tmp_path):
    """ComPEFT keeps a trained adapter's effect when its task vector is compressible: the
    toy task changes a fifth of a small MLP's hidden features, and (IA)^3 learns it."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for layer, axis in ((teacher[0], 0), (teacher[2], 1)):
            idx = torch.randperm(128)[:26]
            factor = 1 + torch.empty(26).uniform_(0.4, 0.7) * torch.where(
                torch.rand(26) < 0.5, -1.0, 1.0
            )
            if axis == 0:
                layer.weight[idx] *= factor[:, None]
                layer.bias[idx] *= factor
            else:
                layer.weight[:, idx] *= factor
    student = copy.deepcopy(base)
    core.inject(student, core.IA3(targets=["0", "2"], feedforward_modules=["2"]))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(300):
        x = torch.randn(64, 32)
        loss = (student(x) - teacher(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    core.save_adapter(student, tmp_path / "trained")
    out = compose.compress(tmp_path / "trained", density=0.2)
    packed = copy.deepcopy(base)
    core.load_adapter(packed, out)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y0 = base(x)
        cos = F.cosine_similarity((student(x) - y0).flatten(), (packed(x) - y0).flatten(), dim=0)
    assert cos > 0.9
    assert (out / "adapter.safetensors").stat().st_size < (
        tmp_path / "trained" / "adapter.safetensors"
    ).stat().st_size


# =========================================================================================
# Run-time composition
# =========================================================================================


@pytest.fixture
def mixed():
    """A ViT with two LoRAs (weight space) and a bottleneck adapter (activation space)."""
    model = make_vit()
    core.inject(model, core.LoRA(r=4, targets=["qkv", "fc1"]), "a")
    core.inject(model, core.LoRA(r=2, targets=["qkv", "fc2"]), "b")
    core.inject(model, core.Bottleneck(targets=["mlp"]), "c")
    randomise(model, std=0.1)
    return model


def composed(model, block, x):
    with torch.no_grad(), compose.composed(model, block):
        return model(x)


def test_stack_runs_adapters_one_after_another(mixed):
    x = vit_x()
    torch.testing.assert_close(
        composed(mixed, Stack("a", "b", "c"), x), run(mixed, x, ["a", "b", "c"])
    )
    assert core.active_adapters(mixed) == ["a", "b", "c"]


def test_parallel_gives_one_output_per_adapter(mixed):
    x = vit_x(3)
    out = composed(mixed, Parallel("a", Stack("b", "c")), x)
    assert out.shape[0] == 6
    first, second = compose.parallel_outputs(out, 2)
    torch.testing.assert_close(first, run(mixed, x, ["a"]))
    torch.testing.assert_close(second, run(mixed, x, ["b", "c"]))
    # nested: a runs on every copy, then each copy its own child
    first, second = compose.parallel_outputs(composed(mixed, Stack("a", Parallel("b", "c")), x), 2)
    torch.testing.assert_close(first, run(mixed, x, ["a", "b"]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(second, run(mixed, x, ["a", "c"]), atol=1e-6, rtol=1e-5)


def test_batch_split_sends_parts_of_the_batch_through_different_adapters(mixed):
    x = vit_x(3)
    out = composed(mixed, BatchSplit("c", Stack("a", "b"), batch_sizes=[1, 2]), x)
    torch.testing.assert_close(out[:1], run(mixed, x[:1], ["c"]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1:], run(mixed, x[1:], ["a", "b"]), atol=1e-6, rtol=1e-5)


def test_batch_split_on_llama_splits_the_attention_mask_too():
    model = make_llama()
    core.inject(model, core.LoRA(r=4, targets=["q_proj", "v_proj"]), "a")
    core.inject(model, core.Bottleneck(targets=["mlp"]), "b")
    randomise(model, std=0.1)
    ids = torch.randint(0, 128, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad(), compose.composed(model, BatchSplit("a", "b", batch_sizes=[2, 1])):
        out = model(input_ids=ids, attention_mask=mask).logits
    core.set_active(model, ["a"])
    with torch.no_grad():
        want_a = model(input_ids=ids[:2], attention_mask=mask[:2]).logits
    core.set_active(model, ["b"])
    with torch.no_grad():
        want_b = model(input_ids=ids[2:], attention_mask=mask[2:]).logits
    torch.testing.assert_close(out[:2], want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], want_b, atol=1e-5, rtol=1e-5)


def test_average_of_loras_equals_their_averaged_update(mixed):
    x = vit_x()
    out = composed(mixed, Average("a", "b", weights=[3, 1]), x)
    compose.add(mixed, {"a": 0.75, "b": 0.25}, "avg")  # per layer the same: base + mean update
    torch.testing.assert_close(out, run(mixed, x, ["avg"]), atol=1e-5, rtol=1e-5)


def test_average_of_activation_space_adapters_averages_outputs(mixed):
    core.inject(mixed, core.Bottleneck(targets=["mlp"], reduction_factor=8), "d")
    randomise(mixed, std=0.1)
    mlp = mixed.blocks[1].mlp
    h = torch.randn(2, 5, 64)
    with torch.no_grad(), compose.composed(mixed, Average("c", "d")):
        out = mlp(h)
    want = 0.5 * (run_in(mixed, mlp, h, ["c"]) + run_in(mixed, mlp, h, ["d"]))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


def test_stack_then_average_acts_on_the_stacked_output():
    layer = nn.Sequential(nn.Linear(16, 16))
    for name in ("a", "b", "c"):
        core.inject(layer, core.LoRA(r=2, targets=["0"]), name)
    randomise(layer, std=0.1)
    x = torch.randn(4, 16)
    out = composed(layer, Stack("a", Average("b", "c")), x)
    w = {n: adapters_named(layer, n)["0"].delta_weight() for n in "abc"}
    want = layer[0].base_layer(x) + x @ (w["a"] + 0.5 * (w["b"] + w["c"])).T
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_split_gives_each_part_of_the_sequence_its_adapter(mixed):
    mlp = mixed.blocks[0].mlp  # holds c; its fc1 holds a and fc2 holds b
    h = torch.randn(2, 7, 64)
    with torch.no_grad(), compose.composed(mixed, Split("a", Stack("b", "c"), splits=3)):
        out = mlp(h)
    torch.testing.assert_close(
        out[:, :3], run_in(mixed, mlp, h, ["a"])[:, :3], atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(
        out[:, 3:], run_in(mixed, mlp, h, ["b", "c"])[:, 3:], atol=1e-6, rtol=1e-5
    )
    split = Split("a", "b", splits=[3, 3])
    with pytest.raises(ValueError, match="sequence of length 7"), compose.composed(mixed, split):
        mlp(h)


def test_fuse_attends_over_adapter_outputs_and_trains_only_the_fusion(mixed, tmp_path):
    fuse = Fuse("a", "b")
    compose.add_fusion(mixed, fuse)
    assert core.active_adapters(mixed) == ["c"]  # add_fusion leaves the active set alone
    report = core.param_report(mixed).by_adapter[fuse.fusion]
    dims = {"attn.qkv": 192, "mlp.fc1": 256, "mlp.fc2": 64}  # modules holding a or b
    assert report["params"] == 2 * sum(3 * d * d + 2 * d for d in dims.values())  # 2 blocks
    qkv = mixed.blocks[0].attn.qkv  # holds both a and b
    layer = qkv.adapters[fuse.fusion]
    with torch.no_grad():
        layer.value.weight.add_(0.05 * torch.randn_like(layer.value.weight))
    h = torch.randn(2, 5, 64)
    with torch.no_grad(), compose.composed(mixed, fuse):
        out = qkv(h)
    y = qkv.base_layer(h)
    z = torch.stack([run_in(mixed, qkv, h, [n]) - y for n in ("a", "b")], dim=-2)  # (2, 5, N, 192)
    with torch.no_grad():
        scores = (layer.key(z) * layer.query(y).unsqueeze(-2)).sum(-1)
        want = y + (scores.softmax(-1).unsqueeze(-1) * layer.value(z)).sum(-2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # training: gradients reach only the fusion layers; the regulariser is 0.01 ||V - I||^2
    with compose.composed(mixed, fuse):
        mixed(vit_x()).sum().backward()
        aux = core.aux_loss(mixed)
    grads = {n for n, p in mixed.named_parameters() if p.grad is not None}
    assert grads and all(f".{fuse.fusion}." in n for n in grads)
    values = [
        w.adapters[fuse.fusion].value.weight
        for _, w in core.targeting.adapted_modules(mixed)
        if fuse.fusion in w.adapters
    ]
    want_aux = sum(0.01 * (v - torch.eye(v.shape[0])).pow(2).sum() for v in values)
    torch.testing.assert_close(aux, want_aux)
    assert aux > 0
    # saved and loaded like any adapter
    core.save_adapter(mixed, tmp_path / "fusion", name=fuse.fusion)
    meta, tensors = core.checkpoint.read_checkpoint(tmp_path / "fusion")
    assert meta["method"] == "adapter_fusion" and len(tensors) == 5 * len(dims) * 2


def test_fusion_attention_equals_the_plain_formula_with_gradients():
    """fuse() moves the key map onto the query and mixes before the value map; output and
    every gradient must equal h + sum_n softmax_n(K(z_n) . Q(h) / T) V(z_n) by autograd."""
    from core.compose import FusionAdapter

    torch.manual_seed(3)
    d, n = 11, 3
    layer = FusionAdapter(d, AdapterFusion(targets=["x"], temperature=0.7), {})
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    h = torch.randn(2, 5, d, requires_grad=True)
    updates = [torch.randn(2, 5, d, requires_grad=True) for _ in range(n)]
    upstream = torch.randn(2, 5, d)

    def grads(out):
        inputs = [h, *updates, *layer.parameters()]
        return torch.autograd.grad((out * upstream).sum(), inputs)

    got = layer.fuse(h, updates)
    z = torch.stack(updates, dim=-2)
    scores = (layer.key(z) * layer.query(h).unsqueeze(-2)).sum(-1) / 0.7
    want = h + (scores.softmax(-1).unsqueeze(-1) * layer.value(z)).sum(-2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(got), grads(want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fusion_layer_counts_on_the_meta_device():
    with torch.device("meta"):
        model = make_vit()
    core.inject(model, core.LoRA(targets=["fc1"]), "a")
    compose.add_fusion(model, Fuse("a"))
    report = core.param_report(model).by_adapter["fuse_a"]
    assert report["params"] == 2 * (3 * 256 * 256 + 2 * 256)
    assert AdapterFusion(targets=["fc1"]).temperature == 1.0
    with pytest.raises(ConfigError, match="temperature"):
        AdapterFusion(targets=["fc1"], temperature=0)


class Lengthen(Adapter):
    """A test adapter that appends a token: its outputs cannot join other parts'."""

    def post(self, x, y, base):
        return torch.cat([y, y[:, :1]], dim=1)


def test_composition_errors_say_what_cannot_be_composed(mixed):
    x = vit_x()
    with pytest.raises(ConfigError, match="unknown adapter"):
        compose.activate(mixed, Stack("a", "zzz"))
    with pytest.raises(ConfigError, match="add_fusion"):
        compose.activate(mixed, Fuse("a", "b"))
    with pytest.raises(ConfigError, match="outermost"):
        compose.activate(mixed, BatchSplit(Parallel("a", "b"), "c", batch_sizes=[1, 1]))
    with pytest.raises(ConfigError, match="cannot contain"):
        compose.activate(mixed, Average(BatchSplit("a", "b", batch_sizes=[1, 1]), "c"))
    core.inject(mixed, core.OFT(targets=["fc2"]), "rot")
    with pytest.raises(ConfigError, match="transforms the layer's input"):
        composed(mixed, Stack("b", Average("rot", "c")), x)
    # at the top an input-side adapter is fine: each child runs the layer itself
    out = composed(mixed, Average("rot", "b"), x)
    assert out.shape == (2, 10)
    core.merge(mixed, ["a"])
    with pytest.raises(MergeError):
        compose.activate(mixed, "a")
    core.unmerge(mixed)
    wrapper = mixed.blocks[0].mlp.fc2
    wrapper.adapters["long"] = Lengthen()
    split = BatchSplit("b", "long", batch_sizes=[1, 1])
    with pytest.raises(RuntimeError, match="cannot be joined"), compose.composed(mixed, split):
        wrapper(torch.randn(2, 5, 256))
    with pytest.raises(ConfigError):
        Split("a", "b", splits=[2])
    with pytest.raises(ConfigError):
        BatchSplit("a", batch_sizes=[0])


def test_deactivate_restores_the_previous_active_adapters(mixed):
    core.set_active(mixed, ["b"])
    x = vit_x()
    before = run(mixed, x)
    compose.activate(mixed, Average("a", "c"))
    assert compose.active_composition(mixed) == Average("a", "c")
    assert not torch.allclose(run(mixed, x), before)
    compose.deactivate(mixed)
    assert core.active_adapters(mixed) == ["b"] and compose.active_composition(mixed) is None
    torch.testing.assert_close(run(mixed, x), before)


# =========================================================================================
# Folders and the command line
# =========================================================================================


def test_command_line_combines_saved_adapters_and_prints_sizes(tmp_path, capsys):
    model = two_loras()
    for name in ("a", "b"):
        core.save_adapter(model, tmp_path / name, name=name)
    assert (
        compose.main(
            ["add", str(tmp_path / "sum"), f"{tmp_path / 'a'}:0.5", f"{tmp_path / 'b'}:-1"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("before") == 2 and "after" in printed and "bytes" in printed
    fresh = core.unload(copy.deepcopy(model))  # the same base weights, no adapters
    compose.add(model, {"a": 0.5, "b": -1.0}, "in_memory")
    core.load_adapter(fresh, tmp_path / "sum")
    x = vit_x()
    torch.testing.assert_close(run(fresh, x), run(model, x, ["in_memory"]), atol=1e-5, rtol=1e-5)
    assert compose.main(["compress", str(tmp_path / "sum"), "--density", "0.1"]) == 0
    printed = capsys.readouterr().out
    ratio = float(printed.rsplit("(", 1)[1].split("x)")[0])
    assert ratio < 0.2  # tensor data shrinks ~30x; the file keeps its JSON header
    assert (
        compose.main(
            [
                "merge",
                str(tmp_path / "t"),
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--method",
                "ties",
            ]
        )
        == 2
    )
    assert "density" in capsys.readouterr().err
    args = [
        "merge",
        str(tmp_path / "s"),
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--method",
        "svd",
        "--svd-rank",
        "2",
    ]
    assert compose.main(args) == 0
    assert AdapterState.load(tmp_path / "s").config.r == 2
    assert math.isclose(AdapterState.load(tmp_path / "s").config.alpha, 2.0)


def test_python_dash_m_runs_the_command_line_once(tmp_path):
    """``python -m core.compose``: the package already imported the module; the entry point
    runs that copy (no second registration of its method, no runpy warning)."""
    model = two_loras()
    core.save_adapter(model, tmp_path / "a", name="a")
    proc = subprocess.run(
        [sys.executable, "-m", "core.compose", "negate", str(tmp_path / "n"), str(tmp_path / "a")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "after" in proc.stdout and "RuntimeWarning" not in proc.stderr
    negated = AdapterState.load(tmp_path / "n")
    for path, tensors in AdapterState.load(tmp_path / "a").modules.items():
        assert torch.equal(negated.modules[path]["B"], -tensors["B"])
