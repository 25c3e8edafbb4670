"""DoRA, VeRA, DyLoRA, MELoRA, ShareLoRA and CapaBoost: equations, counts by formula (and
the papers' counts on LLaMA-2-7B on the meta device), exact merges, checkpoints and HF PEFT
parity both ways."""

import copy
import math
import warnings

import peft
import pytest
import safetensors.torch
import torch
import torch.nn as nn

import core
from conftest import (
    adapters_of,
    assert_identity_merge_and_checkpoint,
    assert_merge_exact,
    llama_input,
    make_llama,
    make_vit,
    model_cases,
    own_params,
    randomise,
    run_llama,
    vit_input,
)
from core.errors import CheckpointError, ConfigError, TargetError
from core.inject import adapter_config
from core.methods.lora import LoRA
from core.methods.lora_variants import (
    CapaBoost,
    DoRA,
    DyLoRA,
    MELoRA,
    ShareLoRA,
    VeRA,
    check_vera_projections,
    set_dylora_rank,
    vera_projections,
)
from core.peft_format import format_for_method, format_for_peft

pytestmark = pytest.mark.filterwarnings("ignore")


CASES = model_cases()
# "proj" also hits the ViT's patch_embed.proj (a Conv2d); embed_tokens is an Embedding.
DORA_TARGETS = {"vit": ["qkv", "proj", "fc1"], "llama": ["q_proj", "v_proj", "embed_tokens"]}
LINEAR_TARGETS = {"vit": ["qkv", "fc1", "fc2"], "llama": ["q_proj", "v_proj", "down_proj"]}


# --- configs ---------------------------------------------------------------------------------


def test_configs_construct_from_targets_alone_with_the_papers_defaults():
    dora, vera, dylora = DoRA(targets=["q"]), VeRA(targets=["q"]), DyLoRA(targets=["q"])
    melora, share, capa = MELoRA(targets=["q"]), ShareLoRA(targets=["q"]), CapaBoost(targets=["q"])
    assert (dora.r, dora.alpha) == (8, 8.0)
    assert (vera.r, vera.d_initial, vera.projection_prng_key) == (256, 0.1, 0)
    assert (dylora.r, dylora.r_min, dylora.frozen, dylora.eval_rank) == (8, 1, False, None)
    assert (melora.r, melora.n, melora.alpha) == (1, 8, 16.0)
    assert share.share == "A"
    assert (capa.r, capa.alpha, capa.copies, capa.density) == (8, 16.0, 2, 0.5)
    names = {c.method for c in (dora, vera, dylora, melora, share, capa)}
    assert names == {"dora", "vera", "dylora", "melora", "sharelora", "capaboost"}
    assert all(type(c).mergeable for c in (dora, vera, dylora, melora, share, capa))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DoRA(init="pissa", targets=["q"]), "init='pissa'"),
        (lambda: VeRA(r=0, targets=["q"]), "VeRA.r must be >= 1"),
        (lambda: VeRA(dropout=1.0, targets=["q"]), "dropout must lie in"),
        (lambda: DyLoRA(r=4, r_min=5, targets=["q"]), r"r_min \(5\) must be <= r \(4\)"),
        (lambda: DyLoRA(r=4, eval_rank=6, targets=["q"]), r"eval_rank \(6\) must be <= r"),
        (lambda: DyLoRA(frozen=1, targets=["q"]), "frozen must be True or False"),
        (lambda: DyLoRA(rank_pattern={"q": 2}, targets=["q"]), "leave rank_pattern"),
        (lambda: MELoRA(n=0, targets=["q"]), "MELoRA.n must be >= 1"),
        (lambda: ShareLoRA(share="C", targets=["q"]), "share must be one of 'A', 'B', 'AB'"),
        (lambda: CapaBoost(density=0.0, targets=["q"]), r"density must lie in \(0.0, 1.0\]"),
        (lambda: CapaBoost(copies=0, targets=["q"]), "copies must be >= 1"),
    ],
)
def test_invalid_fields_are_refused_with_a_clear_message(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_unsupported_layers_are_refused_with_the_reason():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(12, 10))
    for cfg in (VeRA(targets=["0"]), DyLoRA(targets=["0"]), CapaBoost(targets=["0"])):
        with pytest.raises(TargetError, match="wraps nn.Linear or transformers Conv1D"):
            core.inject(net, cfg)
    with pytest.raises(TargetError, match="not both divisible by 8"):
        core.inject(net, MELoRA(targets=["1"]))
    assert core.adapter_names(net) == []


# --- DoRA ------------------------------------------------------------------------------------


def test_dora_follows_the_weight_decomposition_equation():
    lin = nn.Linear(6, 5)
    model = nn.Sequential(lin)
    x = torch.randn(4, 6)
    before = model(x)
    core.inject(model, DoRA(r=2, alpha=4, targets=["0"]))
    adapter = model[0].adapters["default"]
    torch.testing.assert_close(adapter.magnitude, lin.weight.norm(dim=1))
    torch.testing.assert_close(model(x), before)  # identity at start
    randomise(model)
    a, b, m = adapter.A, adapter.B, adapter.magnitude
    merged = lin.weight + 2.0 * b @ a
    expected = x @ (m[:, None] * merged / merged.norm(dim=1, keepdim=True)).T + lin.bias
    torch.testing.assert_close(model(x), expected)
    assert own_params(adapter) == 2 * (6 + 5) + 5  # r (d_in + d_out) + d_out
    # sec. 4.3: the norm is a constant for backpropagation, only m carries through g
    g = adapter.magnitude_scale(lin)
    assert torch.autograd.grad(g.sum(), a, allow_unused=True)[0] is None


@pytest.mark.parametrize("bias", [True, False])
def test_dora_output_and_gradients_equal_the_formula_with_a_detached_norm(bias):
    """y = m / sg(||W0 + s B A||_c) (W0 + s B A) x + b: the output and the gradients of
    m, A, B, the input and a trainable bias."""
    torch.manual_seed(5)
    lin = nn.Linear(7, 5, bias=bias)
    model = nn.Sequential(lin)
    core.inject(model, DoRA(r=3, alpha=6, targets=["0"]))
    adapter = model[0].adapters["default"]
    randomise(model)
    if bias:
        lin.bias.requires_grad_(True)
    x = torch.randn(2, 4, 7, requires_grad=True)
    upstream = torch.randn(2, 4, 5)
    trained = [adapter.magnitude, adapter.A, adapter.B] + ([lin.bias] if bias else [])
    got = model(x)
    got_grads = torch.autograd.grad((got * upstream).sum(), [x, *trained])

    weight = lin.weight + 2.0 * adapter.B @ adapter.A
    norm = weight.norm(dim=1, keepdim=True).detach()
    want = x @ (adapter.magnitude[:, None] * weight / norm).T
    want = want + lin.bias if bias else want
    want_grads = torch.autograd.grad((want * upstream).sum(), [x, *trained])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_dora_peft_folder_imports_and_exports_with_identical_outputs(tmp_path, case):
    build, make_x, run = CASES[case]
    base = build()
    ours, pristine, plain = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=DORA_TARGETS[case], use_dora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3},
    )  # fmt: skip
    theirs = peft.get_peft_model(base, cfg)
    randomise(theirs, "lora_")
    theirs.save_pretrained(tmp_path / "peft")
    core.interop.load_peft(ours, tmp_path / "peft")
    assert adapter_config(ours, "default").method == "dora"
    x = make_x()
    with torch.no_grad():
        want = run(theirs, x)
        assert not torch.allclose(want, run(plain, x), atol=1e-3)
        torch.testing.assert_close(run(ours, x), want, atol=1e-5, rtol=1e-5)
    assert core.param_report(ours).by_adapter["default"]["params"] == sum(
        p.numel() for n, p in theirs.named_parameters() if "lora_" in n
    )
    core.interop.save_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(pristine, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(run(back, x), want, atol=1e-5, rtol=1e-5)
    assert_merge_exact(ours, x, run)


def test_lora_folders_without_dora_still_load_as_plain_lora(tmp_path):
    theirs = peft.get_peft_model(make_vit(), peft.LoraConfig(r=2, target_modules=["qkv"]))
    theirs.save_pretrained(tmp_path)
    model = make_vit()
    core.interop.load_peft(model, tmp_path)
    assert adapter_config(model, "default").method == "lora"


def test_dora_on_conv_and_embedding_starts_as_identity_and_merges_exactly():
    net = nn.Sequential(nn.Embedding(20, 8), nn.Conv1d(7, 5, 3, padding=1))
    ids = torch.randint(0, 20, (2, 7))
    before = net(ids)
    core.inject(net, DoRA(r=2, targets=["0", "1"]))
    torch.testing.assert_close(net(ids), before)
    adapters = adapters_of(net)
    assert own_params(adapters["0"]) == 2 * (20 + 8) + 8  # magnitude per embedding dim
    assert own_params(adapters["1"]) == 2 * 7 * 3 + 5 * 2 + 5
    randomise(net)
    assert_merge_exact(net, ids, lambda m, x: m(x))


# --- VeRA ------------------------------------------------------------------------------------


def test_vera_follows_its_equation_and_shares_one_random_pair():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10))
    x = torch.randn(3, 8)
    before = model(x)
    core.inject(model, VeRA(r=4, targets=["0", "2"]))
    torch.testing.assert_close(model(x), before)  # b = 0 at start
    first, second = adapters_of(model).values()
    assert own_params(first) == 6 + 4 and own_params(second) == 10 + 4  # d_out + r
    assert first.vera_A.shape == (4, 8) and first.vera_B.shape == (10, 4)  # max d_in, d_out
    assert "vera_A" not in second._buffers  # the second layer reads the owner's pair
    assert all("vera" not in k for k in first.state_dict())  # regenerated, never saved
    randomise(model)
    a, b = first.projections()
    h0 = model[0].base_layer(x)
    expected = h0 + first.lambda_b * ((first.lambda_d * (x @ a.T)) @ b.T)
    torch.testing.assert_close(model[0](x), expected)
    assert_merge_exact(model, x, lambda m, x: m(x))


@pytest.mark.parametrize("case", CASES)
def test_vera_peft_parity_both_ways(tmp_path, case):
    build, make_x, run = CASES[case]
    base = build()
    ours, pristine = copy.deepcopy(base), copy.deepcopy(base)
    targets = LINEAR_TARGETS[case]
    theirs = peft.get_peft_model(base, peft.VeraConfig(r=8, target_modules=targets))
    randomise(theirs, "vera_lambda")
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    # Their folder holds the shared pair (save_projection=True, PEFT's default): it is
    # exactly the pair omnipeft regenerates from the key.
    raw = safetensors.torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    shared = {k: v for k, v in raw.items() if k in ("base_model.vera_A", "base_model.vera_B")}
    assert len(shared) == 2
    bases = {p.removeprefix("base_model.model."): m.base_layer for p, m in theirs.named_modules()
             if hasattr(m, "vera_lambda_b")}  # fmt: skip
    check_vera_projections(VeRA(r=8, targets=targets), shared, bases)
    with pytest.raises(CheckpointError, match="regenerates it rather than storing it"):
        check_vera_projections(VeRA(r=8, targets=targets, projection_prng_key=1), shared, bases)
    # Through core.interop: a folder without the pair (save_projection=False) loads as is.
    theirs.peft_config["default"].save_projection = False
    theirs.save_pretrained(tmp_path / "lean")
    core.interop.load_peft(ours, tmp_path / "lean")
    owner = next(a for a in adapters_of(ours).values() if not a._owner)
    assert torch.equal(owner.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(owner.vera_B, theirs.base_model.vera_B["default"])
    x = make_x()
    with torch.no_grad():
        want = run(theirs, x)
        torch.testing.assert_close(run(ours, x), want, atol=1e-5, rtol=1e-5)
    core.interop.save_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(pristine, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(run(back, x), want, atol=1e-5, rtol=1e-5)


def test_vera_planned_on_meta_regenerates_its_pair_once_materialised():
    with torch.device("meta"):
        model = make_llama()
    core.inject(model, VeRA(r=8, targets=["q_proj", "down_proj"]))
    model.to_empty(device="cpu")
    owner = next(a for a in adapters_of(model).values() if not a._owner)
    down = adapters_of(model)["model.layers.1.mlp.down_proj"]  # 128 inputs, 64 outputs
    want_a, want_b = vera_projections(8, 128, 64, 0)
    a, b = down.projections()
    assert torch.equal(a, want_a[:, :128]) and torch.equal(b, want_b[:64])
    assert torch.equal(owner.vera_A, want_a)


def test_peft_formats_dispatch_lora_folders_by_their_options():
    assert format_for_peft({"peft_type": "LORA", "use_dora": True}).method == "dora"
    assert format_for_peft({"peft_type": "LORA", "use_dora": False}).method == "lora"
    assert format_for_peft({"peft_type": "VERA"}).method == "vera"
    assert format_for_peft({"peft_type": "NOPE"}) is None
    for method in ("dylora", "melora", "sharelora", "capaboost"):  # written as plain LoRA
        assert format_for_method(method).peft_type == "LORA"


def test_vera_checkpoint_round_trip_regenerates_the_pair(tmp_path):
    model = make_llama()
    pristine = copy.deepcopy(model)
    core.inject(model, VeRA(r=16, targets=LINEAR_TARGETS["llama"]))
    randomise(model)
    core.save_adapter(model, tmp_path)
    core.load_adapter(pristine, tmp_path)
    x = llama_input()
    with torch.no_grad():
        torch.testing.assert_close(run_llama(pristine, x), run_llama(model, x))


# --- the papers' counts on LLaMA-2-7B, on the meta device -----------------------------------


@pytest.fixture(scope="module")
def llama7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig())  # the LLaMA-2-7B shapes


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_papers_parameter_counts_on_llama2_7b(llama7b):
    def count(cfg, name):
        core.inject(llama7b, cfg, name=name)
        return core.param_report(llama7b).by_adapter[name]["params"]

    # VeRA, |theta| = L_tuned (d_model + r): r = 256 on q, v ...
    assert count(VeRA(r=256, targets=["q_proj", "v_proj"]), "vera_qv") == 32 * 2 * (4096 + 256)
    # ... and on every linear layer, the paper's "1.4M" for instruction tuning LLaMA-2-7B.
    per_block = 5 * (4096 + 256) + 2 * (11008 + 256)
    assert count(VeRA(r=256, targets=ALL_LINEAR), "vera_all") == 32 * per_block == 1_417_216
    # MELoRA at the authors' LLaMA-2 setting (q, v; n = 8 minis of rank 1) vs their LoRA r=64.
    melora = count(MELoRA(r=1, n=8, targets=["q_proj", "v_proj"]), "melora")
    lora = count(LoRA(r=64, targets=["q_proj", "v_proj"]), "lora64")
    assert melora == 64 * 1 * (4096 + 4096) == 524_288 and lora == 64 * melora
    # ShareLoRA at QLoRA's setting (r = 64 on every linear layer): ShareA keeps one A per
    # module type, the paper's lower bound of a 44% reduction against LoRA.
    lora_all = count(LoRA(r=64, targets=ALL_LINEAR), "lora_all")
    share_a = count(ShareLoRA(r=64, share="A", targets=ALL_LINEAR), "share_a")
    assert lora_all == 32 * 64 * (4 * 8192 + 3 * (4096 + 11008)) == 159_907_840
    shared_a = 64 * (6 * 4096 + 11008)
    per_layer_b = 64 * (4 * 4096 + 2 * 11008 + 4096)
    assert share_a == shared_a + 32 * per_layer_b == 89_309_184
    assert round(100 * (1 - share_a / lora_all)) == 44
    share_ab = count(ShareLoRA(r=64, share="AB", targets=ALL_LINEAR), "share_ab")
    assert share_ab == shared_a + per_layer_b
    assert len({id(p) for p in llama7b.parameters()}) == len(list(llama7b.parameters()))


# --- DyLoRA ----------------------------------------------------------------------------------


def test_dylora_at_every_rank_equals_the_plain_lora_of_its_truncated_factors():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 10)).eval()
    core.inject(model, DyLoRA(r=6, alpha=12, targets=["0"]))
    randomise(model)
    dy = model[0].adapters["default"]
    x = torch.randn(5, 12)
    for b in range(1, 7):
        set_dylora_rank(model, b)
        plain = copy.deepcopy(model[0].base_layer)
        reference = nn.Sequential(plain)
        core.inject(reference, LoRA(r=b, alpha=12, targets=["0"]))
        with torch.no_grad():
            reference[0].adapters["default"].A.copy_(dy.A[:b])
            reference[0].adapters["default"].B.copy_(dy.B[:, :b])
            torch.testing.assert_close(model(x), reference(x))
            assert_merge_exact(model, x, lambda m, x: m(x))
    with pytest.raises(ConfigError, match=r"rank must lie in \[1, 6\]"):
        set_dylora_rank(model, 7)


def test_dylora_samples_ranks_in_training_and_frozen_mode_trains_one_rank():
    model = nn.Sequential(nn.Linear(8, 8))
    core.inject(model, DyLoRA(r=4, r_min=2, frozen=True, targets=["0"]))
    randomise(model)
    model.train()
    dy = model[0].adapters["default"]
    seen = set()
    for _ in range(40):
        model(torch.randn(2, 8)).sum().backward()
        seen.add(dy.last_rank)
        b = dy.last_rank - 1
        rows = dy.A.grad.abs().sum(1).nonzero().flatten().tolist()
        cols = dy.B.grad.abs().sum(0).nonzero().flatten().tolist()
        assert rows == [b] and cols == [b]
        dy.zero_grad()
    assert seen == {2, 3, 4}


def test_dylora_exports_to_peft_at_the_chosen_rank(tmp_path):
    model = make_vit()
    pristine = copy.deepcopy(model)
    core.inject(model, DyLoRA(r=8, alpha=16, targets=["qkv", "fc1"]))
    randomise(model)
    set_dylora_rank(model, 3)
    core.interop.save_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    assert theirs.peft_config["default"].r == 3
    x = vit_input()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)


# --- MELoRA ----------------------------------------------------------------------------------


def test_melora_is_block_diagonal_with_rank_n_r_for_the_cost_of_rank_r():
    model = nn.Sequential(nn.Linear(16, 24))
    x = torch.randn(3, 16)
    before = model(x)
    core.inject(model, MELoRA(r=2, n=4, alpha=4, targets=["0"]))
    torch.testing.assert_close(model(x), before)
    adapter = model[0].adapters["default"]
    assert own_params(adapter) == 2 * (16 + 24)
    randomise(model)
    delta = adapter.delta_weight()
    for i in range(4):  # only the diagonal blocks B_i A_i (scaled by alpha / r) are non-zero
        block = delta[6 * i : 6 * (i + 1), 4 * i : 4 * (i + 1)]
        torch.testing.assert_close(block, 2.0 * adapter.B[i] @ adapter.A[i])
        block.zero_()
    assert delta.abs().max() == 0
    assert torch.linalg.matrix_rank(adapter.delta_weight()) == 8  # n r
    torch.testing.assert_close(model(x), before + x @ adapter.delta_weight().T)
    assert_merge_exact(model, x, lambda m, x: m(x))


def test_melora_exports_to_peft_as_a_block_diagonal_lora(tmp_path):
    model = make_llama()
    pristine = copy.deepcopy(model)
    core.inject(model, MELoRA(r=2, n=4, targets=["q_proj", "v_proj"]))
    randomise(model)
    core.interop.save_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    x = llama_input()
    with torch.no_grad():
        torch.testing.assert_close(run_llama(theirs, x), run_llama(model, x), atol=1e-5, rtol=1e-5)


# --- ShareLoRA -------------------------------------------------------------------------------


@pytest.mark.parametrize("share", ["A", "B", "AB"])
def test_sharelora_shares_factors_per_module_type(tmp_path, share):
    model = make_llama()
    pristine = copy.deepcopy(model)
    core.inject(model, ShareLoRA(r=4, share=share, targets=["q_proj", "v_proj", "down_proj"]))
    adapters = adapters_of(model)
    q0, q1 = (
        adapters["model.layers.0.self_attn.q_proj"],
        adapters["model.layers.1.self_attn.q_proj"],
    )
    v0 = adapters["model.layers.0.self_attn.v_proj"]
    for factor in "AB":
        assert (getattr(q0, factor) is getattr(q1, factor)) == (factor in share)
    assert q0.A is not v0.A  # another module type has its own
    dims = {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (128, 64)}  # (in, out)
    per_type = {"A": lambda i, o: 4 * i, "B": lambda i, o: 4 * o}
    expected = sum(
        (1 if f in share else 2) * per_type[f](*io) for io in dims.values() for f in "AB"
    )
    assert core.param_report(model).by_adapter["default"]["params"] == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    randomise(model)
    x = llama_input()
    run_llama(model, x).sum().backward()  # both layers' gradients reach the shared factor
    shared = getattr(q0, share[0])
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    with torch.no_grad():
        want = run_llama(model, x)
        core.save_adapter(model, tmp_path / "ckpt")
        fresh = copy.deepcopy(pristine)
        core.load_adapter(fresh, tmp_path / "ckpt")
        torch.testing.assert_close(run_llama(fresh, x), want)
        twin = copy.deepcopy(model)  # a deep copy keeps one shared tensor, not two
        twin_q = adapters_of(twin)
        name0, name1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
        assert getattr(twin_q[name0], share[0]) is getattr(twin_q[name1], share[0])
    assert_merge_exact(model, x, run_llama)
    core.interop.save_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(run_llama(theirs, x), want, atol=1e-5, rtol=1e-5)


def test_sharelora_same_config_twice_shares_nothing_between_injections():
    cfg = ShareLoRA(r=2, targets=["q_proj"])
    first, second = make_llama(), make_llama()
    core.inject(first, cfg)
    core.inject(second, cfg)
    core.inject(first, cfg, name="other")
    a = adapters_of(first)["model.layers.0.self_attn.q_proj"].A
    assert a is not adapters_of(second)["model.layers.0.self_attn.q_proj"].A
    assert a is not adapters_of(first, "other")["model.layers.0.self_attn.q_proj"].A


# --- CapaBoost -------------------------------------------------------------------------------


def test_capaboost_sums_masked_copies_of_one_pair(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 16))
    x = torch.randn(4, 20)
    before = model(x)
    core.inject(model, CapaBoost(r=2, alpha=4, copies=3, density=0.5, targets=["0"]))
    torch.testing.assert_close(model(x), before)
    adapter = model[0].adapters["default"]
    assert own_params(adapter) == 2 * (20 + 16)
    assert adapter.mask_A.shape == (3, 2, 20) and adapter.mask_B.shape == (3, 16, 2)
    assert adapter.mask_A.flatten(1).sum(1).tolist() == [20] * 3  # floor(0.5 * 40) each
    randomise(model)
    a, b = adapter.A, adapter.B
    delta = sum((b * mb) @ (a * ma) for ma, mb in zip(adapter.mask_A, adapter.mask_B))
    torch.testing.assert_close(model(x), before + 2.0 * x @ delta.T)
    assert torch.linalg.matrix_rank(delta) == 6  # d r, above the rank r of the pair
    model(x).sum().backward()  # entries outside every mask never act, so never train
    outside_a, outside_b = ~adapter.mask_A.any(0), ~adapter.mask_B.any(0)
    assert a.grad[outside_a].abs().max() == 0 and b.grad[outside_b].abs().max() == 0
    union = int(adapter.mask_A.any(0).sum() + adapter.mask_B.any(0).sum())
    assert adapter.effective_parameters() == union < own_params(adapter)
    assert_merge_exact(model, x, lambda m, x: m(x))
    pristine = nn.Sequential(copy.deepcopy(model[0].base_layer))
    core.save_adapter(model, tmp_path)  # the masks define the adapter: they are saved
    core.load_adapter(pristine, tmp_path)
    loaded = pristine[0].adapters["default"]
    assert torch.equal(loaded.mask_A, adapter.mask_A) and torch.equal(loaded.mask_B, adapter.mask_B)
    with torch.no_grad():
        torch.testing.assert_close(pristine(x), model(x))


# --- the fused low-rank path against each paper's formula ---------------------------------------


def assert_fused_path_equals(model, adapters, plain, x_shape, monkeypatch):
    """``model`` (a callable whose ``adapters`` must take the wrapper's fused path: their
    ``post`` may not run) against ``plain(x, *tensors)``, the paper's formula written out with
    fresh copies of the adapters' trainable tensors: output and gradients of each tensor and
    of x, fp32."""

    def refuse(*args, **kwargs):
        raise AssertionError("the fused low-rank path was not taken")

    for adapter in adapters:
        monkeypatch.setattr(type(adapter), "post", refuse)
    trainable = list(dict.fromkeys(p for a in adapters for p in a.parameters()))
    x = torch.randn(*x_shape, requires_grad=True)
    y = model(x)
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    copies = [p.detach().clone().requires_grad_() for p in trainable]
    x_copy = x.detach().clone().requires_grad_()
    want = plain(x_copy, *copies)
    (want * grad).sum().backward()
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(x.grad, x_copy.grad)
    for p, copy_ in zip(trainable, copies, strict=True):
        torch.testing.assert_close(p.grad, copy_.grad)
        assert p.grad.abs().sum() > 0


def frozen_linear(d_in, d_out):
    return nn.Linear(d_in, d_out).requires_grad_(False)


# Few rows keep the factored update; many rows fold B A into the weight (core.kernels.lora).
ROWS = [(1, 3), (3, 7)]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("training", [True, False])
def test_dylora_fused_path_equals_its_truncated_formula(rows, training, monkeypatch):
    torch.manual_seed(6)
    model = nn.Sequential(frozen_linear(13, 11)).train(training)
    core.inject(model, DyLoRA(r=5, r_min=2, alpha=7, targets=["0"]))
    randomise(model)
    adapter, base = model[0].adapters["default"], model[0].base_layer
    set_dylora_rank(model, 4)

    def plain(x, a, b):  # eq. 4: (alpha / b) B[:, :b] A[:b] x at the rank this forward used
        rank = adapter.last_rank if training else 4
        return base(x) + 7.0 / rank * x @ a[:rank].T @ b[:, :rank].T

    assert_fused_path_equals(model, [adapter], plain, (*rows, 13), monkeypatch)


@pytest.mark.parametrize("rows", ROWS)
def test_melora_fused_path_equals_its_mini_lora_formula(rows, monkeypatch):
    torch.manual_seed(7)
    model = nn.Sequential(frozen_linear(15, 9))
    core.inject(model, MELoRA(r=2, n=3, alpha=6, targets=["0"]))
    randomise(model)
    adapter, base = model[0].adapters["default"], model[0].base_layer

    def plain(x, a, b):  # eq. 4: slice i of the output gets (alpha / r) B_i A_i x_i
        slices = zip(x.split(5, -1), a, b, strict=True)
        return base(x) + 3.0 * torch.cat([xi @ ai.T @ bi.T for xi, ai, bi in slices], -1)

    assert_fused_path_equals(model, [adapter], plain, (*rows, 15), monkeypatch)


@pytest.mark.parametrize("rows", ROWS)
def test_sharelora_fused_path_equals_two_layers_with_one_shared_a(rows, monkeypatch):
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.ModuleDict({"proj": frozen_linear(13, 13)}),
        nn.ModuleDict({"proj": frozen_linear(13, 13)}),
    )
    core.inject(model, ShareLoRA(r=3, alpha=6, share="A", targets=["proj"]))
    randomise(model)
    first, second = (model[i]["proj"].adapters["default"] for i in (0, 1))
    assert first.A is second.A
    base0, base1 = model[0]["proj"].base_layer, model[1]["proj"].base_layer

    def run(x):
        return model[1]["proj"](model[0]["proj"](x))

    def plain(x, a, b0, b1):  # Delta W_l = B_l A with A shared, scale alpha / r
        h = base0(x) + 2.0 * x @ a.T @ b0.T
        return base1(h) + 2.0 * h @ a.T @ b1.T

    assert_fused_path_equals(run, [first, second], plain, (*rows, 13), monkeypatch)


@pytest.mark.parametrize("rows", ROWS)
def test_capaboost_fused_path_equals_its_sum_of_masked_copies(rows, monkeypatch):
    torch.manual_seed(9)
    model = nn.Sequential(frozen_linear(13, 11))
    core.inject(model, CapaBoost(r=3, alpha=6, copies=3, density=0.6, targets=["0"]))
    randomise(model)
    adapter, base = model[0].adapters["default"], model[0].base_layer
    masks = list(zip(adapter.mask_A, adapter.mask_B, strict=True))

    def plain(x, a, b):  # eq. 3: sum_i (B o M^B_i)(A o M^A_i), scale alpha / r
        return base(x) + 2.0 * sum(x @ (a * ma).T @ (b * mb).T for ma, mb in masks)

    assert_fused_path_equals(model, [adapter], plain, (*rows, 13), monkeypatch)


def test_lora_shaped_variants_mix_in_one_batch_through_their_low_rank_factors():
    """MELoRA, DyLoRA and CapaBoost give ``lowrank_factors``, so a mixed batch routes them
    through the SGMV path: each sample equals itself run alone with its adapter."""
    model = make_vit()
    core.inject(model, MELoRA(r=2, n=4, targets=["qkv", "fc1"]), name="melora")
    core.inject(model, DyLoRA(r=4, targets=["qkv", "fc1"]), name="dylora")
    core.inject(model, CapaBoost(r=2, targets=["qkv", "fc1"]), name="capaboost")
    randomise(model)
    model.eval()
    x = vit_input(5)
    names = ["melora", None, "capaboost", "dylora", "melora"]
    with torch.no_grad():
        with core.batch_adapters(model, names):
            mixed = model(x)
        alone = []
        for i, name in enumerate(names):
            core.set_active(model, [] if name is None else [name])
            alone.append(model(x[i : i + 1]))
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=1e-5)


# --- every method: meta device, checkpoints --------------------------------------------------

EVERY = {
    "dora": lambda t: DoRA(r=2, targets=t),
    "vera": lambda t: VeRA(r=4, targets=t),
    "dylora": lambda t: DyLoRA(r=4, targets=t),
    "melora": lambda t: MELoRA(r=2, n=4, targets=t),
    "sharelora": lambda t: ShareLoRA(r=2, targets=t),
    "capaboost": lambda t: CapaBoost(r=2, targets=t),
}


@pytest.mark.parametrize("method", EVERY)
def test_identity_merge_and_checkpoint_for_every_method(tmp_path, method):
    assert_identity_merge_and_checkpoint(tmp_path, EVERY[method](["qkv", "fc2"]))


@pytest.mark.parametrize("method", EVERY)
def test_every_method_plans_and_counts_on_the_meta_device(method):
    with torch.device("meta"):
        model = make_llama(hidden_size=128, intermediate_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no data-dependent work on meta tensors
        core.inject(model, EVERY[method](["q_proj", "down_proj"]))
    report = core.param_report(model)
    r = {"dora": 2, "vera": 4, "dylora": 4, "melora": 2, "sharelora": 2, "capaboost": 2}[method]
    lora_like = 2 * r * ((128 + 128) + (256 + 128))
    expected = {
        "dora": lora_like + 2 * (128 + 128),
        "vera": 2 * (128 + r) + 2 * (128 + r),
        "melora": lora_like,
        "sharelora": r * (128 + 256) + 2 * r * (128 + 128),
        "dylora": lora_like,
        "capaboost": lora_like,
    }[method]
    assert report.by_adapter["default"]["params"] == expected
    assert math.isclose(report.trainable, expected)
