"""LoHa, LoKr, KAdaptation and SURM: equations, counts by formula, exact merges,
checkpoints, the meta device, and HF PEFT parity both ways for LoHa and LoKr."""

import copy
import math
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization

import core
from conftest import (
    adapters_of,
    assert_identity_merge_and_checkpoint,
    assert_merge_exact,
    make_llama,
    make_vit,
    model_cases,
    own_params,
    randomise,
    vit_input,
)
from core import layers
from core.errors import ConfigError, TargetError
from core.methods.kronecker import (
    SURM,
    KAdaptation,
    KronLinearFunction,
    LoHa,
    LoKr,
    circulant_matrix,
    factorization,
    hadamard_lowrank_pays,
    kron_apply_pays,
    skew_circulant_matrix,
)

pytestmark = pytest.mark.filterwarnings("ignore")


# "proj" also hits patch_embed.proj, a Conv2d with an 8 x 8 kernel
CASES = model_cases(["qkv", "proj", "fc1"], ["q_proj", "v_proj", "down_proj"])


# --- configs ---------------------------------------------------------------------------------


def test_configs_construct_from_targets_alone_with_defaults():
    loha, lokr, kad, surm = (
        LoHa(targets=["q"]),
        LoKr(targets=["q"]),
        KAdaptation(targets=["q"]),
        SURM(targets=["q"]),
    )
    assert (loha.r, loha.alpha, loha.use_effective_conv2d) == (8, 8.0, False)
    assert (lokr.decompose_both, lokr.decompose_factor, lokr.init) == (False, -1, "default")
    assert (kad.n, kad.r, kad.alpha) == (4, 1, 1.0)
    assert (surm.structure, surm.displacement_rank, surm.alpha) == ("circulant", 1, 1.0)
    assert {c.method for c in (loha, lokr, kad, surm)} == {"loha", "lokr", "kadaptation", "surm"}
    assert all(type(c).mergeable for c in (loha, lokr, kad, surm))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LoHa(r=0, targets=["q"]), "LoHa.r must be >= 1"),
        (lambda: LoHa(rank_dropout=1.0, targets=["q"]), "rank_dropout must lie in"),
        (lambda: LoHa(rank_pattern={"q": 0}, targets=["q"]), r"rank_pattern\['q'\] must be"),
        (lambda: LoKr(decompose_factor=0, targets=["q"]), "decompose_factor must be -1"),
        (lambda: LoKr(init="zeros", targets=["q"]), "init must be one of"),
        (lambda: LoKr(use_effective_conv2d=1, targets=["q"]), "must be True or False"),
        (lambda: KAdaptation(n=1, targets=["q"]), "KAdaptation.n must be >= 2"),
        (lambda: SURM(structure="banded", targets=["q"]), "structure must be one of"),
        (lambda: SURM(displacement_rank=0, targets=["q"]), "displacement_rank must be >= 1"),
    ],
)
def test_invalid_fields_are_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_unsupported_layers_are_refused_with_the_reason():
    net = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10), nn.Conv2d(2, 2, 1))
    for cfg in (LoHa(targets=["0"]), LoKr(targets=["0"])):
        with pytest.raises(TargetError, match="wraps nn.Linear, nn.Conv1d and nn.Conv2d"):
            core.inject(net, cfg)
    with pytest.raises(TargetError, match=r"n=4 blocks; choose n dividing both"):
        core.inject(net, KAdaptation(targets=["1"]))
    with pytest.raises(TargetError, match="SURM wraps nn.Linear"):
        core.inject(net, SURM(targets=["2"]))
    assert core.adapter_names(net) == []


def test_factorization_matches_lycoris():
    for dim in range(1, 200):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


# --- LoHa and LoKr ---------------------------------------------------------------------------


def test_loha_follows_the_hadamard_equation_and_exceeds_rank_r():
    lin = nn.Linear(10, 9)
    model = nn.Sequential(lin)
    x = torch.randn(3, 10)
    before = model(x)
    core.inject(model, LoHa(r=2, alpha=6, targets=["0"]))
    torch.testing.assert_close(model(x), before)  # W2b = 0
    randomise(model)
    a = model[0].adapters["default"]
    delta = 3.0 * (a.w1_a @ a.w1_b) * (a.w2_a @ a.w2_b)
    torch.testing.assert_close(model(x), before + x @ delta.T)
    assert own_params(a) == 2 * 2 * (9 + 10)
    assert torch.linalg.matrix_rank(delta) == 4  # r^2 from two rank-r factors


def test_lokr_follows_the_kronecker_equation_with_each_factor_form():
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(16, 12))
    core.inject(model, LoKr(r=1, alpha=2, targets=["0"]))
    core.inject(model, LoKr(r=1, alpha=2, decompose_both=True, targets=["1"]), name="both")
    core.set_active(model, ["default", "both"])
    randomise(model)
    x = torch.randn(3, 16)
    low = model[0].adapters["default"]  # 12 = 3 x 4, 16 = 4 x 4: W1 3 x 4, W2 = W2a W2b (4 x 4)
    assert low.w1.shape == (3, 4) and low.w2_a.shape == (4, 1) and low.w2_b.shape == (1, 4)
    delta = 2.0 * torch.kron(low.w1, low.w2_a @ low.w2_b)
    torch.testing.assert_close(model[0](x), model[0].base_layer(x) + x @ delta.T)
    assert own_params(low) == 3 * 4 + 1 * (4 + 4)
    both = model[1].adapters["both"]  # r = 1 < max(3, 4) / 2: W1 low-rank too
    assert own_params(both) == 1 * (3 + 4) + 1 * (4 + 4)
    full = LoKr(r=4, targets=["q"]).build(nn.Linear(16, 12), "q")  # r >= max(4, 4) / 2
    assert full.w2.shape == (4, 4) and own_params(full) == 3 * 4 + 4 * 4


LYCORIS = {
    "loha": (peft.LoHaConfig, {"r": 4, "alpha": 8}, "hada_"),
    "loha_cp": (peft.LoHaConfig, {"r": 4, "alpha": 8, "use_effective_conv2d": True}, "hada_"),
    "lokr": (peft.LoKrConfig, {"r": 4, "alpha": 8}, "lokr_"),
    "lokr_both_cp": (
        peft.LoKrConfig,
        {"r": 2, "alpha": 8, "decompose_both": True, "use_effective_conv2d": True},
        "lokr_",
    ),
    "lokr_full": (peft.LoKrConfig, {"r": 40, "alpha": 3, "decompose_factor": 4}, "lokr_"),
}


# The CP (effective conv) and full-W2 forms only differ on the ViT (it has a Conv2d);
# the LLaMA runs the two plain forms.
PARITY = [(v, "vit") for v in LYCORIS] + [("loha", "llama"), ("lokr", "llama")]


@pytest.mark.parametrize(("variant", "case"), PARITY)
def test_peft_parity_both_ways(tmp_path, case, variant):
    build, make_x, run, targets = CASES[case]
    peft_cls, fields, key = LYCORIS[variant]
    base = build()
    ours, pristine, plain = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    cfg = peft_cls(
        target_modules=targets, rank_pattern={"fc1": 2}, alpha_pattern={"v_proj": 5}, **fields
    )
    theirs = peft.get_peft_model(base, cfg)
    randomise(theirs, key)
    theirs.save_pretrained(tmp_path / "peft")
    core.interop.load_peft(ours, tmp_path / "peft")
    x = make_x()
    with torch.no_grad():
        want = run(theirs, x)
        assert not torch.allclose(want, run(plain, x), atol=1e-3)
        torch.testing.assert_close(run(ours, x), want, atol=1e-5, rtol=1e-5)
    assert core.param_report(ours).by_adapter["default"]["params"] == sum(
        p.numel() for n, p in theirs.named_parameters() if key in n
    )
    core.interop.save_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(pristine, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(run(back, x), want, atol=1e-5, rtol=1e-5)
    assert_merge_exact(ours, x, run)


def test_rank_and_module_dropout_act_in_training_only():
    model = nn.Sequential(nn.Linear(8, 8))
    core.inject(model, LoHa(r=2, rank_dropout=0.5, module_dropout=0.3, targets=["0"]))
    randomise(model)
    x = torch.randn(4, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    outs = {tuple(model(x)[0].tolist()) for _ in range(12)}
    assert len(outs) > 2


def test_lokr_on_conv1d_and_lycoris_init():
    net = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1))
    x = torch.randn(2, 4, 7)
    before = net(x)
    core.inject(net, LoKr(r=1, init="lycoris", use_effective_conv2d=True, targets=["0"]))
    adapter = net[0].adapters["default"]
    assert adapter.w2_b.abs().max() == 0 and adapter.w1.abs().max() > 0
    torch.testing.assert_close(net(x), before)
    randomise(net)
    assert_merge_exact(net, x, lambda m, x: m(x))


# --- KAdaptation -----------------------------------------------------------------------------


def test_kadaptation_sums_kronecker_products_with_shared_slow_weights(tmp_path):
    model = make_vit()
    pristine = copy.deepcopy(model)
    x = vit_input()
    with torch.no_grad():
        before = model(x)
    core.inject(model, KAdaptation(n=4, r=2, alpha=4, targets=["qkv", "fc1"]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    adapters = adapters_of(model)
    owners = [a for a in adapters.values() if not a._home]
    assert len(owners) == 1
    slow = owners[0].slow
    assert all(a.slow_weights is slow for a in adapters.values())
    qkv = adapters["blocks.0.attn.qkv"]  # 64 -> 192
    assert own_params(qkv) == 2 * (192 + 64) + (4**3 if qkv is owners[0] else 0)
    report = core.param_report(model).by_adapter["default"]["params"]
    assert report == 4**3 + 2 * 2 * (192 + 64) + 2 * 2 * (256 + 64)
    randomise(model)
    delta = sum(
        torch.kron(qkv.slow_weights[i], qkv.u[i] @ qkv.v[i].T) for i in range(4)
    ) * 2.0  # fmt: skip
    layer = model.blocks[0].attn.qkv
    h = torch.randn(3, 64)
    torch.testing.assert_close(layer(h), layer.base_layer(h) + h @ delta.T, atol=1e-5, rtol=1e-5)
    model(x).sum().backward()  # every layer's gradient reaches the one slow tensor
    assert slow.grad is not None and slow.grad.abs().sum() > 0
    assert_merge_exact(model, x, lambda m, x: m(x))
    with torch.no_grad():
        want = model(x)
    core.save_adapter(model, tmp_path)
    core.load_adapter(pristine, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pristine(x), want, atol=1e-5, rtol=1e-5)


# --- SURM ------------------------------------------------------------------------------------


def dense_by_definition(structure, adapter):
    """S from the definitions, entry by entry (independent of the adapter's helpers)."""
    out_f, in_f, n = adapter.out_features, adapter.in_features, adapter.n
    s = torch.zeros(out_f, in_f)
    for i in range(out_f):
        for j in range(in_f):
            if structure == "circulant":
                s[i, j] = adapter.c[(i - j) % n]
            elif structure == "toeplitz":
                s[i, j] = adapter.t[i - j + in_f - 1]
    if structure == "ldr":
        full = torch.zeros(n, n)
        for g, h in zip(adapter.g, adapter.h):
            circ = torch.stack([torch.roll(g, k) for k in range(n)], dim=1)  # column k = g shifted
            skew = torch.zeros(n, n)
            for i in range(n):
                for j in range(n):
                    skew[i, j] = h[i - j] if i >= j else -h[i - j + n]
            full += circ @ skew
        s = full[:out_f, :in_f]
    if structure == "kronecker":
        s = torch.kron(adapter.kron_a, adapter.kron_b)
    return s


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "ldr", "kronecker"])
@pytest.mark.parametrize(("d_in", "d_out"), [(12, 8), (6, 10)])
def test_surm_fft_forward_equals_the_structured_matrix(structure, d_in, d_out):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    x = torch.randn(2, 3, d_in)
    before = model(x)
    core.inject(model, SURM(structure=structure, displacement_rank=2, alpha=0.5, targets=["0"]))
    torch.testing.assert_close(model(x), before)  # S = 0 at start
    randomise(model)
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        s = dense_by_definition(structure, adapter)
        torch.testing.assert_close(adapter.structured_matrix(), s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), before + 0.5 * x @ s.T, atol=1e-5, rtol=1e-5)
    n = max(d_in, d_out)
    (a, b), (c, d) = factorization(d_out), factorization(d_in)
    expected = {"circulant": n, "toeplitz": d_in + d_out - 1, "ldr": 2 * 2 * n,
                "kronecker": a * c + b * d}[structure]  # fmt: skip
    assert own_params(adapter) == expected
    assert_merge_exact(model, x, lambda m, x: m(x))


@pytest.mark.parametrize(("d_in", "d_out"), [(13, 7), (5, 11), (9, 9)])
def test_surm_circulant_gradients_equal_autograd_of_the_dense_formula(d_in, d_out):
    """The FFT circulant path's own backward against autograd of y = W0 x + alpha S(c) x."""
    torch.manual_seed(d_in * d_out)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    core.inject(model, SURM(alpha=0.7, targets=["0"]))
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.c.normal_()
    x = torch.randn(2, 3, d_in, requires_grad=True)
    upstream = torch.randn(2, 3, d_out)
    (model(x) * upstream).sum().backward()
    got_x, got_c = x.grad.clone(), adapter.c.grad.clone()

    c = adapter.c.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    n = adapter.n
    idx = (torch.arange(d_out)[:, None] - torch.arange(d_in)[None, :]) % n
    base = model[0].base_layer
    y = base(x2) + 0.7 * x2 @ c[idx].T
    (y * upstream).sum().backward()
    torch.testing.assert_close(got_x, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_c, c.grad, atol=1e-5, rtol=1e-5)


def test_surm_structures_are_full_rank_unlike_low_rank_updates():
    c = torch.randn(16)
    assert torch.linalg.matrix_rank(circulant_matrix(c)) == 16
    # the LDR family holds the circulants: S(e_0) is the identity
    e0 = torch.zeros(16)
    e0[0] = 1
    torch.testing.assert_close(skew_circulant_matrix(e0), torch.eye(16))
    torch.testing.assert_close(circulant_matrix(c) @ skew_circulant_matrix(e0), circulant_matrix(c))


# --- every method: identity, merge, checkpoint, meta -----------------------------------------

EVERY = {
    "loha": lambda t: LoHa(r=2, targets=t),
    "lokr": lambda t: LoKr(r=2, targets=t),
    "kadaptation": lambda t: KAdaptation(targets=t),
    "surm_circulant": lambda t: SURM(targets=t),
    "surm_ldr": lambda t: SURM(structure="ldr", targets=t),
}


@pytest.mark.parametrize("method", EVERY)
def test_identity_merge_and_checkpoint_for_every_method(tmp_path, method):
    assert_identity_merge_and_checkpoint(tmp_path, EVERY[method](["qkv", "fc2"]))


@pytest.mark.parametrize("method", EVERY)
def test_every_method_plans_and_counts_on_the_meta_device(method):
    with torch.device("meta"):
        model = make_llama(hidden_size=128, intermediate_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        core.inject(model, EVERY[method](["q_proj", "down_proj"]))
    # q_proj 128 -> 128, down_proj 256 -> 128, in both of 2 layers
    expected = {
        "loha": 2 * 2 * 2 * ((128 + 128) + (128 + 256)),
        "lokr": 2 * ((8 * 8 + 2 * (16 + 16)) + (8 * 16 + 2 * (16 + 16))),
        "kadaptation": 4**3 + 2 * ((128 + 128) + (128 + 256)),
        "surm_circulant": 2 * (128 + 256),
        "surm_ldr": 2 * (2 * 128 + 2 * 256),
    }[method]
    assert core.param_report(model).by_adapter["default"]["params"] == expected
    assert math.isclose(core.param_report(model).trainable, expected)


# --- the training paths equal the plain formulas (forward and every gradient) ---------------


def adapted_linear(cfg, in_f: int, out_f: int, bias: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    core.inject(model, cfg)
    adapter = adapters_of(model)["0"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(std=0.3)
    model.train()
    return model, adapter


def assert_matches_formula(model, adapter, plain, draws=None):
    """model(x) and its gradients (input and every trainable tensor) equal ``plain(x)``;
    ``draws`` reseeds the RNG before each so both see the same dropout draws."""
    x = torch.randn(2, 7, model[0].in_features, requires_grad=True)
    params = [x, *[p for p in adapter.parameters() if p.requires_grad]]
    upstream = torch.randn(2, 7, model[0].out_features)
    outs = []
    for run in (model, plain):
        if draws is not None:
            torch.manual_seed(draws)
        y = run(x)
        grads = torch.autograd.grad(y, params, upstream, allow_unused=True, materialize_grads=True)
        outs.append((y, grads))
    (got, got_grads), (want, want_grads) = outs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def count_fused_calls(monkeypatch) -> list[int]:
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    fused = layers.lora_linear
    monkeypatch.setattr(layers, "lora_linear", counting)
    return calls


def loha_formula(model, adapter, keep_rows=None):
    base = model[0].base_layer

    def plain(x):
        delta = adapter.scale * (adapter.w1_a @ adapter.w1_b) * (adapter.w2_a @ adapter.w2_b)
        if keep_rows is not None:  # drawn per call, as the adapter draws
            delta = delta * keep_rows(delta.shape[0])[:, None]
        return F.linear(x, base.weight + delta, base.bias)

    return plain


@pytest.mark.parametrize(("r", "lowrank"), [(2, True), (5, False)])
def test_loha_training_step_equals_the_hadamard_formula(monkeypatch, r, lowrank):
    model, adapter = adapted_linear(LoHa(r=r, alpha=3.0, targets=["0"]), 29, 37)
    assert hadamard_lowrank_pays(r, 37, 29) == lowrank == adapter.lowrank
    assert adapter.replaces_base == (not lowrank)
    calls = count_fused_calls(monkeypatch)
    a, b = adapter.hadamard_factors()
    assert a.shape == (r * r, 29) and b.shape == (37, r * r)
    assert_matches_formula(model, adapter, loha_formula(model, adapter))
    assert len(calls) == (1 if lowrank else 0)  # rank r^2 through the fused LoRA path


DRAWS = 5  # a seed whose first draw keeps the module under module_dropout=0.01
assert torch.rand(1, generator=torch.Generator().manual_seed(DRAWS)).item() > 0.01


def rank_keep(rate: float, normalise: bool = True):
    """The draws LyCORIS' dropouts make: module dropout's one number, then the row mask."""

    def keep_rows(rows: int) -> torch.Tensor:
        torch.rand(1)
        keep = (torch.rand(rows) > rate).float()
        return keep / keep.mean() if normalise else keep

    return keep_rows


@pytest.mark.parametrize("r", [2, 5])
def test_loha_rank_and_module_dropout_draw_as_the_dense_formula(r):
    cfg = LoHa(r=r, rank_dropout=0.4, module_dropout=0.01, targets=["0"])
    model, adapter = adapted_linear(cfg, 29, 37)
    keep = rank_keep(0.4)
    assert_matches_formula(model, adapter, loha_formula(model, adapter, keep), draws=DRAWS)
    adapter.module_dropout = 0.999  # dropped: the base alone, on both paths
    assert_matches_formula(model, adapter, model[0].base_layer, draws=DRAWS)


def lokr_formula(model, adapter, keep_rows=None):
    base = model[0].base_layer

    def plain(x):
        delta = adapter.scale * torch.kron(adapter.side("1"), adapter.side("2"))
        if keep_rows is not None:  # drawn per call, as the adapter draws
            delta = delta * keep_rows(delta.shape[0])[:, None]
        return F.linear(x, base.weight + delta, base.bias)

    return plain


# 99 = 9 x 11 outputs, 104 = 8 x 13 inputs: applying the Kronecker product pays; 35 x 33 not
@pytest.mark.parametrize(
    ("shape", "options", "structured"),
    [
        ((104, 99), {"r": 8}, True),  # W1 and W2 full
        ((104, 99), {"r": 2, "decompose_both": True}, True),  # both low-rank
        ((33, 35), {"r": 2}, False),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_lokr_training_step_equals_the_kronecker_formula(
    shape, options, structured, bias, monkeypatch
):
    model, adapter = adapted_linear(LoKr(alpha=3.0, targets=["0"], **options), *shape, bias)
    assert adapter.structured == structured and adapter.replaces_base
    assert kron_apply_pays(*factorization(shape[1]), *factorization(shape[0])) == structured
    calls = count_kron_calls(monkeypatch)
    assert_matches_formula(model, adapter, lokr_formula(model, adapter))
    assert len(calls) == structured  # the Kronecker product applied to x where it pays


def count_kron_calls(monkeypatch) -> list[int]:
    calls = []
    real = KronLinearFunction.apply
    monkeypatch.setattr(KronLinearFunction, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def test_lokr_rank_dropout_takes_the_dense_form_with_the_same_draws(monkeypatch):
    cfg = LoKr(r=8, rank_dropout=0.3, module_dropout=0.01, targets=["0"])
    model, adapter = adapted_linear(cfg, 104, 99)
    calls = count_kron_calls(monkeypatch)
    keep = rank_keep(0.3, normalise=False)  # LoKr rescales only with rank_dropout_scale
    assert_matches_formula(model, adapter, lokr_formula(model, adapter, keep), draws=DRAWS)
    assert not calls  # row masks are not a Kronecker product


def test_lokr_under_autocast_takes_the_dense_form_in_bfloat16(monkeypatch):
    """KronLinearFunction runs in one dtype; under autocast W + Delta W goes through
    F.linear, which autocast casts, and stays close to the float32 step."""
    model, adapter = adapted_linear(LoKr(r=8, targets=["0"]), 104, 99)
    calls = count_kron_calls(monkeypatch)
    x = torch.randn(6, 104)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = model(x)
    assert cast.dtype == torch.bfloat16 and not calls
    full = model(x)
    assert len(calls) == 1
    torch.testing.assert_close(cast.float(), full, atol=0.05, rtol=0.02)


def test_kron_linear_function_gives_every_gradient_of_the_formula():
    x, weight, bias = torch.randn(11, 6 * 5), torch.randn(4 * 7, 6 * 5), torch.randn(4 * 7)
    w1, w2 = torch.randn(4, 6), torch.randn(7, 5)
    inputs = [t.requires_grad_() for t in (x, weight, bias, w1, w2)]
    got = KronLinearFunction.apply(x, weight, bias, w1, w2, 0.7)
    want = F.linear(x, weight + 0.7 * torch.kron(w1, w2), bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(want.shape)
    for g, w in zip(
        torch.autograd.grad(got, inputs, upstream),
        torch.autograd.grad(want, inputs, upstream),
        strict=True,
    ):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_loha_mixed_batch_uses_its_rank_r2_factors_per_sample():
    model, _ = adapted_linear(LoHa(r=2, targets=["0"]), 29, 37)
    core.inject(model, LoHa(r=2, targets=["0"]), name="other")
    randomise(model)
    model.eval()
    x = torch.randn(3, 4, 29)
    names = ["default", "other", None]
    assert adapters_of(model, "other")["0"].lowrank_factors()[0].shape == (4, 29)
    with torch.no_grad():
        with core.batch_adapters(model, names):
            mixed = model(x)
        for i, name in enumerate(names):
            core.set_active(model, [name] if name else [])
            torch.testing.assert_close(mixed[i], model(x[i : i + 1])[0], rtol=1e-5, atol=1e-5)
