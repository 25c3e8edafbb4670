"""AdaLoRA, IncreLoRA, dynamic-rank DoRA, TriAdaptLoRA and DiffoRA: equations, counts,
identity, merge, checkpoints, and AdaLoRA's parity with HF PEFT (forward both ways, and the
rank pattern its allocator reaches on a fixed gradient sequence)."""

import copy
import math

import peft
import pytest
import torch
import torch.nn as nn

import core
from conftest import adapters_of, llama_input, make_llama, make_vit, run_llama, run_vit
from core.controllers import controllers_for
from core.errors import ConfigError, TargetError
from core.methods.adaptive_rank import (
    AdaLoRA,
    DiffoRA,
    DynamicDoRA,
    IncreLoRA,
    TriAdaptLoRA,
    block_ids,
)

VIT_TARGETS = ["qkv", "proj", "fc1"]  # "proj" also hits the Conv2d patch_embed.proj

STEPS = 8  # a short run in which every controller acts
METHODS = {
    "adalora": lambda t: AdaLoRA(init_r=4, target_r=2, total_step=STEPS, tinit=1, targets=t),
    "increlora": lambda t: IncreLoRA(
        init_r=1, target_r=3, add_rank=2, init_warmup=1, incre_interval=2, targets=t
    ),
    "dora_dynamic": lambda t: DynamicDoRA(r=2, prune_interval=2, total_step=STEPS, targets=t),
    "triadaptlora": lambda t: TriAdaptLoRA(
        r=3, init_r=1, add_rank=2, incre_interval=2, total_step=STEPS, targets=t
    ),
    "diffora": lambda t: DiffoRA(r=2, search_steps=4, targets=t),
}


def train(model, x, steps, total=STEPS, lr=2e-2):
    """A short real run: AdamW on a squared-output loss, controllers called every step."""
    controllers = controllers_for(model, total_steps=total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(1, steps + 1):
        loss = model(x).square().mean()
        extra = core.aux_loss(model)
        (loss if extra is None else loss + extra).backward()
        controllers.after_backward(model, step)
        opt.step()
        controllers.after_step(model, step)
        opt.zero_grad()
    model.eval()
    return controllers


def vit_input():
    return torch.randn(1, 3, 32, 32)


# --- configs ------------------------------------------------------------------------------


def test_configs_build_from_targets_alone_with_the_papers_defaults():
    ada = AdaLoRA(targets=["q"])
    assert (ada.init_r, ada.target_r, ada.beta1, ada.beta2, ada.orth_reg_weight) == (
        12, 8, 0.85, 0.85, 0.5,
    )  # fmt: skip
    incre = IncreLoRA(targets=["q"])
    assert (incre.init_r, incre.target_r, incre.step_rank, incre.top_h) == (1, 2, 1, 2)
    dyn = DynamicDoRA(targets=["q"])
    assert (dyn.r, dyn.components, dyn.prune_start, dyn.prune_end, dyn.beta) == (
        8, 12, 0.15, 0.5, 0.9,
    )  # fmt: skip
    tri = TriAdaptLoRA(targets=["q"])
    assert (tri.r, tri.init_r, tri.step_rank, tri.growth) == (8, 1, 4, "linear")
    assert (tri.capacity - tri.init_r) % tri.step_rank == 0 and tri.capacity >= 4 * tri.r
    diff = DiffoRA(targets=["q"])
    assert (diff.r, diff.keep_ratio, diff.group) == (8, 0.5, "layer")
    for cfg in (ada, incre, dyn, tri, diff):
        assert cfg.mergeable is True
    assert [c.method for c in (ada, incre, dyn, tri, diff)] == [
        "adalora", "increlora", "dora_dynamic", "triadaptlora", "diffora",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "cls, kwargs, fragment",
    [
        (AdaLoRA, {"target_r": 20}, "must not exceed init_r"),
        (AdaLoRA, {"total_step": 5, "tinit": 3, "tfinal": 2}, "no budget phase"),
        (AdaLoRA, {"beta1": 1.0}, "beta1 must lie in"),
        (AdaLoRA, {"rank_pattern": {"q": [True]}}, "list of 12 booleans"),
        (IncreLoRA, {"max_rank": 1}, "no room to grow"),
        (IncreLoRA, {"advance_learn": 1}, "True or False"),
        (DynamicDoRA, {"init_r": 4}, "must be at least r"),
        (DynamicDoRA, {"prune_start": 0.6, "prune_end": 0.5}, "must not precede"),
        (TriAdaptLoRA, {"max_rank": 6}, "positive multiple of add_rank"),
        (TriAdaptLoRA, {"growth": "cubic"}, "growth must be one of"),
        (DiffoRA, {"keep_ratio": 0.0}, "keep_ratio must lie in"),
        (DiffoRA, {"group": "block"}, "group must be one of"),
    ],
)
def test_bad_fields_are_refused_with_a_clear_message(cls, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        cls(targets=["q"], **kwargs)


def test_unsupported_layers_are_refused_with_the_reason():
    model = nn.Sequential(nn.Embedding(10, 4))
    for make in METHODS.values():
        with pytest.raises(TargetError, match="wraps nn.Linear"):
            core.inject(model, make(["0"]))


# --- identity, merge, checkpoints ----------------------------------------------------------


STRUCTURE = ("rank_mask", "keep", "rank", "reserve", "selected", "fixed")


def structure_changed(adapter) -> bool:
    """Did the controller prune, grow or select anything in this adapter?"""
    buffers = adapter._buffers
    for key in ("rank_mask", "keep"):
        if key in buffers and int(buffers[key].sum()) < adapter.r:
            return True
    if "rank" in buffers and int(buffers["rank"]) > 1:
        return True
    return "fixed" in buffers and bool(buffers["fixed"])


@pytest.mark.parametrize("method", METHODS)
def test_identity_training_checkpoint_and_merge(tmp_path, method):
    """Starts as the frozen model; a short run changes the structure; the saved adapter
    reloads that structure and its outputs; merge equals the unmerged forward and unmerge
    restores the base weights."""
    model = make_vit()
    pristine = copy.deepcopy(model)
    x = vit_input()
    with torch.no_grad():
        frozen = model(x)
    core.inject(model, METHODS[method](VIT_TARGETS))
    with torch.no_grad():
        torch.testing.assert_close(model(x), frozen)
    train(model, x, steps=STEPS)
    assert any(structure_changed(a) for a in adapters_of(model).values())
    with torch.no_grad():
        adapted = model(x)
    assert (adapted - frozen).abs().max() > 1e-4

    core.save_adapter(model, tmp_path)
    core.load_adapter(pristine, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pristine(x), adapted, atol=1e-6, rtol=1e-6)
    for path, adapter in adapters_of(model).items():
        again = adapters_of(pristine)[path]
        for key in STRUCTURE:
            if key in adapter._buffers:
                assert torch.equal(again.get_buffer(key), adapter.get_buffer(key)), (path, key)

    base = {k: v.clone() for k, v in model.state_dict().items() if ".base_layer." in k}
    with torch.no_grad():
        core.merge(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        core.unmerge(model)
    for key, value in model.state_dict().items():
        if key in base:
            torch.testing.assert_close(value, base[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_injects_on_the_meta_device_and_counts(method):
    with torch.device("meta"):
        model = make_llama()
    core.inject(model, METHODS[method](["q_proj", "v_proj"]))
    report = core.param_report(model)
    params = sum(sum(p.numel() for p in a.parameters()) for a in adapters_of(model).values())
    assert report.by_adapter["default"]["params"] == params > 0
    assert all(p.is_meta for p in model.parameters())


# --- parameter counts by formula ------------------------------------------------------------

# q_proj: 64 -> 64, v_proj: 64 -> 32 (2 key-value heads of 16) in the tiny LLaMA.
SHAPES = {"q_proj": (64, 64), "v_proj": (64, 32)}


def per_layer_counts(cfg):
    model = make_llama()
    core.inject(model, cfg)
    return {
        path.rsplit(".", 1)[-1]: (sum(p.numel() for p in a.parameters()), a)
        for path, a in adapters_of(model).items()
        if ".layers.0." in path
    }


def test_adalora_and_dynamic_dora_counts_follow_the_formulas():
    ada = per_layer_counts(AdaLoRA(init_r=6, target_r=3, targets=["q_proj", "v_proj"]))
    for name, (count, _) in ada.items():
        d_in, d_out = SHAPES[name]
        assert count == 6 * (d_in + d_out + 1)  # P, Q and the singular values
    dyn = per_layer_counts(DynamicDoRA(r=4, targets=["q_proj", "v_proj"]))
    for name, (count, _) in dyn.items():
        d_in, d_out = SHAPES[name]
        assert count == 6 * (d_in + d_out + 1)  # r' = 1.5 r components c_i B_i A_i
    conv = make_vit()
    core.inject(conv, AdaLoRA(init_r=3, target_r=2, targets=["patch_embed.proj"]))
    adapter = adapters_of(conv)["patch_embed.proj"]
    assert sum(p.numel() for p in adapter.parameters()) == 3 * (3 * 8 * 8 + 64 + 1)


def test_growing_methods_count_allocated_and_live_parameters():
    incre = per_layer_counts(IncreLoRA(init_r=1, target_r=2, max_rank=8, targets=["q_proj"]))
    count, adapter = incre["q_proj"]
    assert count == 8 * (64 + 64 + 1)  # capacity
    assert adapter.active_parameter_count() == 1 * (64 + 64 + 1)
    with torch.no_grad():
        adapter.rank.fill_(3)
    assert adapter.active_parameter_count() == 3 * (64 + 64 + 1)

    tri = per_layer_counts(TriAdaptLoRA(r=2, init_r=1, add_rank=2, max_rank=5, targets=["v_proj"]))
    count, adapter = tri["v_proj"]
    assert count == 5 * (64 + 32) + 2 * 5 * 5  # A, B, L, U allocated
    assert adapter.active_parameter_count() == 1 * (64 + 32) + 2 * 1
    with torch.no_grad():
        adapter.rank.fill_(5)  # blocks of 1, 2, 2 ending at ranks 1, 3, 5
    assert adapter.active_parameter_count() == 5 * (64 + 32) + 2 * (1 * 1 + 2 * 3 + 2 * 5)

    diff = per_layer_counts(DiffoRA(r=4, targets=["q_proj", "v_proj"]))
    for name, (count, _) in diff.items():
        d_in, d_out = SHAPES[name]
        assert count == 4 * (d_in + d_out) + 1  # LoRA plus one DAM entry


# --- the equations ------------------------------------------------------------------------


def linear_model(d_in=6, d_out=5):
    return nn.Sequential(nn.Linear(d_in, d_out))


def test_adalora_forward_is_the_svd_form():
    model = linear_model()
    core.inject(model, AdaLoRA(init_r=3, target_r=2, alpha=6, targets=["0"]))
    adapter = adapters_of(model)["0"]
    with torch.no_grad():
        adapter.E.normal_()
    x = torch.randn(4, 6)
    base = model[0].base_layer
    expected = base(x) + (6 / 3) * x @ (adapter.A * adapter.E[:, None]).T @ adapter.B.T
    torch.testing.assert_close(model(x), expected)


def test_increlora_scales_by_the_current_rank_and_runs_reserves_at_1e_5():
    model = linear_model()
    core.inject(model, IncreLoRA(init_r=2, target_r=4, alpha=4, targets=["0"]))
    adapter = adapters_of(model)["0"]
    with torch.no_grad():
        adapter.E.normal_()
        adapter.rank.fill_(3)
        adapter.reserve.fill_(2)
    x = torch.randn(4, 6)
    w = torch.cat([adapter.E[:3], torch.full((2,), 1e-5)])
    update = x @ (adapter.A[:5] * w[:, None]).T @ adapter.B[:, :5].T
    torch.testing.assert_close(model(x), model[0].base_layer(x) + (4 / 3) * update)


def test_increlora_tracked_step_is_one_gemm_with_w_plus_dw_and_records_its_importance():
    model = linear_model(13, 11)
    core.inject(model, IncreLoRA(init_r=2, target_r=4, alpha=4, targets=["0"]))
    adapter = adapters_of(model)["0"]
    with torch.no_grad():
        adapter.E.normal_()
        adapter.rank.fill_(3)
        adapter.reserve.fill_(2)
    model.train()
    assert not adapter.replaces_base  # not tracking: LoRA's fused path
    adapter.track_importance = True
    assert adapter.replaces_base
    base = model[0].base_layer
    x = torch.randn(2, 5, 13, requires_grad=True)
    upstream = torch.randn(2, 5, 11)
    params = [x, adapter.A, adapter.B, adapter.E]
    w = torch.cat([adapter.E[:3], torch.full((2,), 1e-5)])
    dw = (4 / 3) * adapter.B[:, :5] @ (adapter.A[:5] * w[:, None])
    want = base(x) + x @ dw.T
    got = model(x)
    torch.testing.assert_close(got, want)
    for g, h in zip(
        torch.autograd.grad(got, params, upstream),
        torch.autograd.grad(want, params, upstream),
        strict=True,
    ):
        torch.testing.assert_close(g, h)
    grad_dw = torch.einsum("bto,bti->oi", upstream, x)  # dL/d(dW)
    importance = (dw * grad_dw).abs().sum() / math.sqrt(dw.numel())
    torch.testing.assert_close(adapter.take_importance(), importance.detach())


def test_dynamic_dora_scores_are_component_norms_over_the_update_norm():
    model = linear_model(8, 7)
    core.inject(model, DynamicDoRA(r=2, init_r=3, targets=["0"]))
    adapter = adapters_of(model)["0"]
    with torch.no_grad():
        adapter.c.normal_()
    parts = [adapter.c[i] * torch.outer(adapter.B[:, i], adapter.A[i]) for i in range(3)]
    total = torch.linalg.matrix_norm(sum(parts))
    want = torch.stack([torch.linalg.matrix_norm(p) for p in parts]) / (total + 1e-8)
    torch.testing.assert_close(adapter.component_scores(1e-8), want.detach())


def test_triadaptlora_split_is_block_triangular_and_growth_keeps_the_old_update():
    assert block_ids(7, 1, 2).tolist() == [0, 1, 1, 2, 2, 3, 3]
    model = linear_model(8, 7)
    cfg = TriAdaptLoRA(r=3, init_r=1, add_rank=2, max_rank=5, alpha=2, total_step=4, targets=["0"])
    core.inject(model, cfg)
    adapter = adapters_of(model)["0"]
    with torch.no_grad():
        adapter.L.normal_()
        adapter.U.normal_()
        adapter.rank.fill_(3)
    c = adapter.transform()
    lower = adapter.L[:3, :3] * torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 1.0]])
    upper = adapter.U[:3, :3] * torch.tensor([[1, 1, 1], [0, 1, 1], [0, 1, 1.0]])
    torch.testing.assert_close(c, lower + upper)
    x = torch.randn(4, 8)
    expected = model[0].base_layer(x) + (2 / 3) * x @ (c @ adapter.A[:3]).T @ adapter.B[:, :3].T
    torch.testing.assert_close(model(x), expected)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    controller = controllers_for(model).controllers["default"]
    with torch.no_grad():
        controller.add_block(adapter)
        grown = adapter.transform()
    assert int(adapter.rank) == 5
    torch.testing.assert_close(grown[:3, :3], c)  # old entries in place
    assert not grown[3:].any() and not grown[:, 3:].any()  # new rows/columns start at 0
    torch.testing.assert_close(adapter.A[:3], before["A"][:3])
    new_update = model(x) - model[0].base_layer(x)
    torch.testing.assert_close(new_update, (expected - model[0].base_layer(x)) * 3 / 5)


def test_diffora_discretisation_keeps_outputs_of_selected_modules_and_drops_the_rest():
    model = make_vit()
    core.inject(model, DiffoRA(r=2, keep_ratio=0.5, search_steps=1, targets=["qkv", "fc1"]))
    adapters = adapters_of(model)
    selected = {p for p in adapters if p.endswith("fc1")}  # the larger gamma in each block
    with torch.no_grad():
        for path, adapter in adapters.items():
            adapter.B.normal_()
            adapter.gate.fill_(1.0 if path in selected else -1.0)
    x = vit_input()
    reference = copy.deepcopy(model)  # relaxed model with the losers' gates at exactly 0
    for path, adapter in adapters_of(reference).items():
        if path not in selected:
            adapter.gate.data.fill_(-float("inf"))
    controllers_for(model).after_step(model, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-6)
    for path, adapter in adapters.items():
        assert bool(adapter.fixed) and not adapter.gate.requires_grad
        assert bool(adapter.selected) == (path in selected)
        assert adapter.idle() == (path not in selected)
        assert adapter.A.requires_grad == (path in selected)


# --- AdaLoRA and HF PEFT -------------------------------------------------------------------


PEFT_CASES = {
    "vit": (make_vit, VIT_TARGETS + ["fc2"], run_vit, vit_input),
    "llama": (make_llama, ["q_proj", "v_proj", "o_proj", "gate_proj"], run_llama, llama_input),
}


def peft_param(model, path, key):
    return dict(model.named_parameters())[f"base_model.model.{path}.lora_{key}.default"]


def allocate_in_peft(model, steps=12):
    """Random weights, then PEFT's own allocator on random gradients: a realistic pattern."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    for step in range(1, steps + 1):
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.grad = torch.randn_like(p)
        model.base_model.update_and_allocate(step)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_adalora_parity_with_peft_both_ways(tmp_path, case):
    build, targets, run, make_x = PEFT_CASES[case]
    base = build()
    ours, pristine = copy.deepcopy(base), copy.deepcopy(base)
    config = peft.AdaLoraConfig(
        init_r=6, target_r=3, lora_alpha=4, total_step=12, tinit=2, tfinal=3, target_modules=targets
    )
    theirs = peft.get_peft_model(base, config)
    allocate_in_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    core.interop.load_peft(ours, tmp_path / "peft")
    x = make_x()
    with torch.no_grad():
        want = run(theirs, x)
        torch.testing.assert_close(run(ours, x), want, atol=1e-5, rtol=1e-5)
    pattern = theirs.peft_config["default"].rank_pattern
    assert 0 < sum(sum(v) for v in pattern.values()) < 6 * len(pattern)  # some were pruned
    kept = 0  # r_kept (in + out + 1) per module: only the kept triplets are imported
    for key, mask in pattern.items():
        path = key.removesuffix(".lora_E")
        a, b = peft_param(theirs, path, "A"), peft_param(theirs, path, "B")
        kept += sum(mask) * (a.shape[1] + b.shape[0] + 1)
    assert core.param_report(ours).by_adapter["default"]["params"] == kept
    core.interop.save_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(pristine, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(run(back, x), want, atol=1e-5, rtol=1e-5)


def test_adalora_trained_here_exports_to_peft_with_its_pattern(tmp_path):
    model = make_vit()
    pristine = copy.deepcopy(model)
    x = vit_input()
    core.inject(model, AdaLoRA(init_r=4, target_r=2, total_step=STEPS, targets=["qkv", "fc1"]))
    train(model, x, steps=STEPS)
    core.interop.save_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    pattern = theirs.peft_config["default"].rank_pattern
    for path, adapter in adapters_of(model).items():
        assert pattern[f"{path}.lora_E"] == adapter.rank_mask.tolist()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("delta_t, lr", [(1, 0.05), (3, 0.0)])
def test_adalora_rank_pattern_matches_peft_on_a_fixed_gradient_sequence(delta_t, lr):
    """Same weights, same gradients, same SGD step, same schedule: PEFT's RankAllocator and
    our controller keep the same triplets at every step, bit for bit."""
    base = make_vit()
    ours = copy.deepcopy(base)
    schedule = dict(init_r=6, target_r=3, total_step=14, tinit=2, tfinal=3)
    targets = ["qkv", "fc1", "fc2"]
    theirs = peft.get_peft_model(
        base, peft.AdaLoraConfig(**schedule, deltaT=delta_t, target_modules=targets)
    )
    core.inject(ours, AdaLoRA(**schedule, delta_t=delta_t, targets=targets))
    adapters = adapters_of(ours)
    with torch.no_grad():
        for path, adapter in adapters.items():
            peft_param(theirs, path, "E").normal_()
            for key in "AEB":
                getattr(adapter, key).copy_(
                    peft_param(theirs, path, key).view_as(getattr(adapter, key))
                )
    controllers = controllers_for(ours)
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for step in range(1, 15):
        for path, adapter in adapters.items():
            for key in "AEB":
                mine, peft_p = getattr(adapter, key), peft_param(theirs, path, key)
                grad = torch.randn(peft_p.shape, generator=gen)
                peft_p.grad, mine.grad = grad.clone(), grad.clone().view_as(mine)
                with torch.no_grad():
                    peft_p.sub_(lr * grad)
                    mine.sub_(lr * grad.view_as(mine))
        theirs.base_model.update_and_allocate(step)
        controllers.after_step(ours, step)
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            for path, adapter in adapters.items():
                assert pattern[f"{path}.lora_E.default"] == adapter.rank_mask.tolist(), step
                assert torch.equal(peft_param(theirs, path, "E").view(-1), adapter.E), step
            seen.add(sum(sum(v) for v in pattern.values()))
    assert min(seen) == 3 * len(adapters) and len(seen) >= 3  # the budget really moved


def test_adalora_orthogonal_regulariser_is_the_mean_over_matrices():
    model = make_vit()
    cfg = AdaLoRA(init_r=4, target_r=2, orth_reg_weight=0.3, total_step=10, targets=["qkv"])
    core.inject(model, cfg)
    controllers_for(model)
    adapters = adapters_of(model)
    want = 0
    for adapter in adapters.values():
        a, b = adapter.A, adapter.B
        want = want + torch.linalg.matrix_norm(a @ a.T - torch.eye(4))
        want = want + torch.linalg.matrix_norm(b.T @ b - torch.eye(4))
    torch.testing.assert_close(core.aux_loss(model), 0.3 * want / (2 * len(adapters)))


def test_dynamic_dora_name_is_distinct_from_weight_decomposed_dora():
    assert DynamicDoRA.method == "dora_dynamic"
    assert core.METHODS["dora_dynamic"] is DynamicDoRA
    assert "dora" not in core.METHODS or core.METHODS["dora"] is not DynamicDoRA
    assert math.isclose(DynamicDoRA(r=4, targets=["q"]).components, 6)


# --- LLaMA-2-7B on the meta device, and the shipped configs ---------------------------------


def test_llama_2_7b_counts_on_the_meta_device_follow_the_formulas():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    qv = ["q_proj", "v_proj"]
    cap = 1 + 4 * 8  # TriAdaptLoRA's default capacity for r = 8: whole blocks of 4, >= 4 r
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cases = [
        (AdaLoRA(init_r=12, target_r=8, targets=qv), 64 * 12 * (4096 + 4096 + 1)),
        (IncreLoRA(target_r=8, max_rank=32, targets=qv), 64 * 32 * (4096 + 4096 + 1)),
        (DynamicDoRA(r=8, targets=qv), 64 * 12 * (4096 + 4096 + 1)),
        (TriAdaptLoRA(r=8, targets=qv), 64 * (cap * 8192 + 2 * cap**2)),
        (DiffoRA(r=8, targets=every), 32 * (4 * 8 * 8192 + 3 * 8 * (4096 + 11008) + 7)),
    ]
    for cfg, want in cases:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        core.inject(model, cfg)
        assert core.param_report(model).by_adapter["default"]["params"] == want, cfg.method


CONFIG_CLASSES = {
    "adalora": AdaLoRA,
    "increlora": IncreLoRA,
    "dora_dynamic": DynamicDoRA,
    "triadaptlora": TriAdaptLoRA,
    "diffora": DiffoRA,
}


@pytest.mark.parametrize("domain", ["vision", "nlp"])
@pytest.mark.parametrize("name", CONFIG_CLASSES)
def test_shipped_configs_build_their_method(domain, name):
    from pathlib import Path

    import yaml

    from core.lightning import method_from_spec

    path = Path(__file__).parents[2] / "configs" / domain / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text())["model"]["method"]
    cfg = method_from_spec(spec)
    assert type(cfg) is CONFIG_CLASSES[name] and cfg.method == name
