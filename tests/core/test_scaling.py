"""The scaling family: (IA)^3, SSF, BitFit, DiffFit and LN tuning."""

import copy

import peft
import pytest
import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

import core
from conftest import make_llama, make_vit, model_cases, perturb
from core.errors import CheckpointError, ConfigError, MergeError, TargetError
from core.methods.scaling import IA3, SSF, BitFit, DiffFit, LNTuning
from core.targeting import adapted_modules


def base_state(model):
    """The model's own tensors (adapters excluded), under their pre-injection names."""
    return {
        k.replace(".base_layer", ""): v.clone()
        for k, v in model.state_dict().items()
        if ".adapters." not in k
    }


def per_layer_params(model, name="default"):
    return {
        path: sum(p.numel() for p in wrapper.adapters[name].parameters())
        for path, wrapper in adapted_modules(model)
        if name in wrapper.adapters
    }


class Net(nn.Module):
    """One of each layer kind the family supports."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.tf = Conv1D(10, 12)  # GPT-2 layout: weight (in=12, out=10)
        self.lin_nb = nn.Linear(12, 6, bias=False)
        self.ln_nb = nn.LayerNorm(6, bias=False)
        self.rms = nn.RMSNorm(6)
        self.c1d = nn.Conv1d(6, 4, 3, padding=1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4)
        self.gconv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        with torch.no_grad():  # non-trivial norm affines and running statistics
            for norm in (self.ln, self.ln_nb, self.rms, self.gn, self.bn):
                norm.weight.normal_(1.0, 0.2)
            for norm in (self.ln, self.gn, self.bn):
                norm.bias.normal_(0.0, 0.2)
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, seq, img):
        h = self.ln(self.lin(seq))
        t = self.tf(h)
        g = self.rms(self.ln_nb(self.lin_nb(h)))
        c = self.c1d(g.transpose(1, 2))
        i = self.bn(self.gn(self.conv(img)))
        return h, t, g, c, i, self.gconv(i)


def inputs():
    return torch.randn(2, 5, 8), torch.randn(2, 3, 6, 6)


def make_net():
    return Net().eval()


ALL = ["lin", "ln", "tf", "lin_nb", "ln_nb", "rms", "c1d", "conv", "gn", "bn", "gconv"]
LAYERS = ["lin", "tf", "lin_nb", "c1d", "conv", "gconv"]
NORMS = ["ln", "ln_nb", "rms", "gn", "bn"]
WITH_BIAS = ["lin", "ln", "tf", "c1d", "conv", "gn", "bn", "gconv"]

CONFIGS = {
    "ia3": IA3(targets=LAYERS, feedforward_modules=["lin_nb", "tf", "gconv"]),
    # An RMSNorm has no bias to merge beta into: see the refusal test below.
    "ssf": SSF(targets=[t for t in ALL if t != "rms"], create_missing_bias=True),
    "bitfit": BitFit(targets=WITH_BIAS),
    "bitfit_create": BitFit(targets=["lin_nb", "ln_nb", "lin"], create_missing_bias=True),
    "ln_tuning": LNTuning(targets=NORMS),
    "difffit": DiffFit(targets=ALL, scale_modules=["lin", "tf", "lin_nb", "conv", "gconv"]),
    "difffit_bias_only": DiffFit(targets=WITH_BIAS, scale_modules=["conv"], norm=False),
}


@pytest.mark.parametrize("method", CONFIGS)
def test_starts_as_the_identity(method):
    net = make_net()
    x = inputs()
    with torch.no_grad():
        before = net(*x)
        core.inject(net, CONFIGS[method])
        after = net(*x)
    for got, want in zip(after, before, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_ssf_authors_init_starts_near_but_off_the_identity():
    net = make_net()
    x = inputs()
    before = net(*x)[0]
    core.inject(net, SSF(targets=["lin"], init_std=0.02))
    adapter = net.lin.adapters["default"]
    assert 0.005 < adapter.gamma.std().item() < 0.05
    assert abs(adapter.gamma.mean().item() - 1.0) < 0.03
    assert not torch.equal(net(*x)[0], before)


@pytest.mark.parametrize("method", CONFIGS)
def test_merge_equals_unmerged_forward_and_unmerge_restores(method):
    net = make_net()
    pristine = base_state(net)
    core.inject(net, CONFIGS[method])
    perturb(net, std=0.3)
    x = inputs()
    with torch.no_grad():
        adapted = net(*x)
        core.merge(net)
        merged = net(*x)
        core.unmerge(net)
        restored = net(*x)
    for got, want in zip(merged, adapted, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(restored, adapted, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    after = base_state(net)
    assert after.keys() == pristine.keys()  # biases created by merging are gone again
    for key, value in pristine.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-6)


def test_merge_into_bias_less_layers_creates_then_removes_the_bias():
    net = make_net()
    core.inject(net, BitFit(targets=["lin_nb", "ln_nb"], create_missing_bias=True))
    perturb(net, std=0.3)
    core.merge(net)
    delta = net.lin_nb.adapters["default"].bias_delta
    torch.testing.assert_close(net.lin_nb.base_layer.bias, delta.detach())
    assert not net.lin_nb.base_layer.bias.requires_grad
    core.unmerge(net)
    assert net.lin_nb.base_layer.bias is None and net.ln_nb.base_layer.bias is None


def test_forward_follows_the_equations():
    lin = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    w, b = lin.weight.detach(), lin.bias.detach()

    def adapted(cfg):
        model = nn.Sequential(copy.deepcopy(lin))
        core.inject(model, cfg)
        perturb(model, std=0.3)
        return model, model[0].adapters["default"]

    model, a = adapted(IA3(targets=["0"]))  # l * (W x + b)
    torch.testing.assert_close(model(x), a.scale.flatten() * (x @ w.T + b))
    model, a = adapted(IA3(targets=["0"], feedforward_modules=["0"]))  # W (l * x) + b
    torch.testing.assert_close(model(x), (a.scale.flatten() * x) @ w.T + b)
    model, a = adapted(SSF(targets=["0"]))  # gamma * (W x + b) + beta
    torch.testing.assert_close(model(x), a.gamma * (x @ w.T + b) + a.beta)
    model, a = adapted(BitFit(targets=["0"]))  # W x + (b + delta_b)
    torch.testing.assert_close(model(x), x @ w.T + (b + a.bias_delta))
    model, a = adapted(DiffFit(targets=["0"]))  # gamma * (W x + b + delta_b)
    torch.testing.assert_close(model(x), a.gamma * (x @ w.T + b + a.bias_delta))


def test_norm_tuning_recomputes_the_norm_with_the_shifted_affine():
    norm = nn.LayerNorm(6)
    model = nn.Sequential(norm)
    core.inject(model, LNTuning(targets=["0"]))
    perturb(model, std=0.3)
    a = model[0].adapters["default"]
    x = torch.randn(3, 6)
    want = nn.functional.layer_norm(x, (6,), norm.weight + a.weight_delta, norm.bias + a.bias_delta)
    torch.testing.assert_close(model(x), want)


def test_channel_first_layers_scale_the_channel_dim():
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv)
    core.inject(model, SSF(targets=["0"]))
    perturb(model, std=0.3)
    a = model[0].adapters["default"]
    img = torch.randn(2, 3, 5, 5)
    want = conv(img) * a.gamma.view(1, 4, 1, 1) + a.beta.view(1, 4, 1, 1)
    torch.testing.assert_close(model(img), want)
    torch.testing.assert_close(model(img[0]), want[0])  # unbatched input: channels on dim 0


def test_parameter_counts_follow_the_formulas():
    def counts(cfg):
        net = make_net()
        core.inject(net, cfg)
        return per_layer_params(net)

    # (IA)^3: out features on the output side, in features on the input side.
    assert counts(CONFIGS["ia3"]) == {
        "lin": 12, "tf": 12, "lin_nb": 12, "c1d": 4, "conv": 4, "gconv": 4,
    }  # fmt: skip
    # SSF: gamma and beta per output feature.
    features = {"lin": 12, "ln": 12, "tf": 10, "lin_nb": 6, "ln_nb": 6, "rms": 6, "c1d": 4}
    features |= {"conv": 4, "gn": 4, "bn": 4, "gconv": 6}
    assert counts(CONFIGS["ssf"]) == {k: 2 * v for k, v in features.items() if k != "rms"}
    # BitFit: one bias delta per output feature.
    assert counts(CONFIGS["bitfit"]) == {k: features[k] for k in WITH_BIAS}
    # LN tuning: numel(weight) + numel(bias).
    assert counts(CONFIGS["ln_tuning"]) == {"ln": 24, "ln_nb": 6, "rms": 6, "gn": 8, "bn": 8}
    # DiffFit: gamma (+ bias delta) on scaled layers, bias elsewhere, affine on norms.
    assert counts(CONFIGS["difffit"]) == {
        "lin": 24, "tf": 20, "lin_nb": 6, "conv": 8, "gconv": 12, "c1d": 4,
        "ln": 24, "ln_nb": 6, "rms": 6, "gn": 8, "bn": 8,
    }  # fmt: skip
    assert counts(CONFIGS["difffit_bias_only"]) == {
        k: 2 * features[k] if k == "conv" else features[k] for k in WITH_BIAS
    }


def test_meta_device_models_are_planned_and_counted():
    with torch.device("meta"):
        llama = make_llama()
    cases = {
        # k_proj, v_proj: 2 kv heads x 16 = 32 outputs; down_proj input 128; 2 layers.
        "ia3": (IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                2 * (32 + 32 + 128)),
        "ssf": (SSF(targets=["q_proj", "input_layernorm"], init_std=0.02), 2 * (2 * 64 + 2 * 64)),
        "ln": (LNTuning(targets=["input_layernorm", "post_attention_layernorm", "norm"]),
               2 * 2 * 64 + 64),
        "difffit": (DiffFit(targets=["o_proj", "down_proj", "input_layernorm"]), 2 * 3 * 64),
        "bitfit": (BitFit(targets=["o_proj"], create_missing_bias=True), 2 * 64),
    }  # fmt: skip
    for name, (cfg, expected) in cases.items():
        core.inject(llama, cfg, name=name)
        assert core.param_report(llama).by_adapter[name]["params"] == expected, name
    assert all(p.is_meta for p in llama.parameters())


# --- HF PEFT parity ------------------------------------------------------------------


CASES = model_cases()
IA3_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "vit": (["qkv", "fc2", "patch_embed.proj"], ["fc2"]),  # patch_embed.proj is a Conv2d
}
LN_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "vit": r"blocks\.\d+\.norm[12]|norm",  # the top-level "norm": not the Identity "*.norm"
}


def randomise_peft(model, key, mean):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.normal_(mean, 0.3)


@pytest.mark.parametrize("case", CASES)
def test_ia3_peft_saved_adapter_imports_with_identical_outputs(tmp_path, case):
    build, make_x, run = CASES[case]
    targets, feedforward = IA3_TARGETS[case]
    base = build()
    ours = copy.deepcopy(base)
    theirs = peft.get_peft_model(
        base, peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    )
    randomise_peft(theirs, "ia3_l", mean=1.0)
    theirs.save_pretrained(tmp_path)
    core.interop.load_peft(ours, tmp_path)
    x = make_x()
    with torch.no_grad():
        torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=1e-5)
    assert core.param_report(ours).by_adapter["default"]["params"] == sum(
        p.numel() for n, p in theirs.named_parameters() if "ia3_l" in n
    )


@pytest.mark.parametrize("case", CASES)
def test_ia3_exported_adapter_loads_in_peft_with_identical_outputs(tmp_path, case):
    build, make_x, run = CASES[case]
    targets, feedforward = IA3_TARGETS[case]
    model = build()
    pristine = copy.deepcopy(model)
    core.inject(model, IA3(targets=targets, feedforward_modules=feedforward))
    perturb(model, std=0.3)
    core.interop.save_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    x = make_x()
    with torch.no_grad():
        torch.testing.assert_close(run(theirs, x), run(model, x), atol=1e-5, rtol=1e-5)
        # PEFT's merge of our exported vectors gives the same weights as ours.
        core.merge(model)
        merged = theirs.merge_and_unload()
        torch.testing.assert_close(run(merged, x), run(model, x), atol=1e-5, rtol=1e-5)


class Projections(nn.Module):
    """Names where PEFT's plain-suffix feedforward test differs from dotted suffixes."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.out_proj = nn.Linear(6, 4)

    def forward(self, x):
        return self.out_proj(self.proj(x))


def test_ia3_feedforward_names_keep_peft_meaning_both_ways(tmp_path):
    x = torch.randn(3, 6)
    base = Projections()
    # PEFT: "proj" is a plain suffix of "out_proj" too, so both scale their input.
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(target_modules=["proj", "out_proj"], feedforward_modules=["proj"]),
    )
    randomise_peft(theirs, "ia3_l", mean=1.0)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    core.interop.load_peft(ours, tmp_path / "peft")
    assert ours.out_proj.adapters["default"].input_side
    torch.testing.assert_close(ours(x), theirs(x))
    # Ours: dotted suffixes, so only "proj" is input side; the export must say exactly that.
    mine = copy.deepcopy(base)
    core.inject(mine, IA3(targets=["proj", "out_proj"], feedforward_modules=["proj"]))
    assert not mine.out_proj.adapters["default"].input_side
    perturb(mine, std=0.3)
    core.interop.save_peft(mine, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(reloaded(x), mine(x))


@pytest.mark.parametrize("case", CASES)
def test_ln_tuning_peft_parity_both_ways(tmp_path, case):
    build, make_x, run = CASES[case]
    base = build()
    x = make_x()
    # PEFT -> ours: PEFT stores the whole tuned affine; ours holds its difference to the base.
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LNTuningConfig(target_modules=LN_TARGETS[case])
    )
    randomise_peft(theirs, "ln_tuning_layers", mean=0.5)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    core.interop.load_peft(ours, tmp_path / "peft")
    assert core.param_report(ours).by_adapter["default"]["params"] == sum(
        p.numel() for n, p in theirs.named_parameters() if "ln_tuning_layers" in n
    )
    with torch.no_grad():
        torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=1e-5)
    # ours -> PEFT, unmerged and merged (the export reads the tuned affine either way).
    mine = copy.deepcopy(base)
    core.inject(mine, LNTuning(targets=LN_TARGETS[case]))
    perturb(mine, std=0.3)
    with torch.no_grad():
        want = run(mine, x)
        for state in ("unmerged", "merged"):
            if state == "merged":
                core.merge(mine)
            core.interop.save_peft(mine, tmp_path / state)
            reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / state)
            torch.testing.assert_close(run(reloaded, x), want, atol=1e-5, rtol=1e-5)


def test_ia3_conv1d_export_is_refused(tmp_path):
    net = make_net()
    core.inject(net, IA3(targets=["c1d"]))
    with pytest.raises(CheckpointError, match="Conv1d"):
        core.interop.save_peft(net, tmp_path)


# --- checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("method", CONFIGS)
def test_save_load_round_trip(tmp_path, method):
    net = make_net()
    fresh = copy.deepcopy(net)
    core.inject(net, CONFIGS[method])
    perturb(net, std=0.3)
    core.save_adapter(net, tmp_path)
    core.load_adapter(fresh, tmp_path)
    x = inputs()
    with torch.no_grad():
        for got, want in zip(fresh(*x), net(*x), strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    if method == "ia3":  # which side each layer scales comes back from the config
        assert fresh.tf.adapters["default"].input_side
        assert not fresh.lin.adapters["default"].input_side


# --- exact merges at the edges ------------------------------------------------------------


@pytest.mark.parametrize("feedforward", [None, ["0"]])
def test_zero_scales_merge_and_unmerge_exactly(feedforward):
    lin = nn.Linear(6, 5)
    original = {k: v.clone() for k, v in lin.state_dict().items()}
    model = nn.Sequential(lin)
    core.inject(model, IA3(targets=["0"], feedforward_modules=feedforward))
    perturb(model, std=0.3)
    with torch.no_grad():
        model[0].adapters["default"].scale.view(-1)[:2] = 0.0
    x = torch.randn(3, 6)
    with torch.no_grad():
        adapted = model(x)
        core.merge(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-6, rtol=1e-6)
        core.unmerge(model)
    for key, value in original.items():
        torch.testing.assert_close(lin.state_dict()[key], value, atol=1e-6, rtol=1e-6)


class OnePlusRMSNorm(nn.Module):
    """A Gemma-style RMSNorm, y = (1 + weight) * x / rms(x): not linear in its weight."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_ssf_merges_into_a_llama_rmsnorm_but_refuses_other_affine_forms():
    x = torch.randn(3, 6)
    model = nn.Sequential(LlamaRMSNorm(6))
    core.inject(model, SSF(targets=["0"]))
    with torch.no_grad():
        model[0].adapters["default"].gamma.normal_(1.0, 0.3)  # beta stays 0: no bias needed
        adapted = model(x)
        core.merge(model)
        torch.testing.assert_close(model(x), adapted)
    other = nn.Sequential(OnePlusRMSNorm(6))
    core.inject(other, SSF(targets=["0"]))
    with pytest.raises(MergeError, match=r"weight \* normalise\(x\)"):
        core.merge(other)
    # LN tuning needs no assumption about the affine form: it shifts the weight itself.
    core.delete_adapter(other, "default")
    core.inject(other, LNTuning(targets=["0"]))
    perturb(other, std=0.3)
    with torch.no_grad():
        adapted = other(x)
        core.merge(other)
        torch.testing.assert_close(other(x), adapted)


def test_ssf_shift_into_bias_less_layer_needs_create_missing_bias():
    net = make_net()
    pristine = base_state(net)
    core.inject(net, SSF(targets=["lin_nb"]))
    perturb(net, std=0.3)
    with pytest.raises(MergeError, match="create_missing_bias=True"):
        core.merge(net)
    core.delete_adapter(net, "default")
    core.inject(net, SSF(targets=["rms"], create_missing_bias=True))
    perturb(net, std=0.3)
    with pytest.raises(MergeError, match="cannot use one"):
        core.merge(net)
    # A refused merge changes nothing: the gamma was not folded in before the refusal.
    after = base_state(net)
    assert all(torch.equal(after[k], v) for k, v in pristine.items())


def test_half_precision_base_trains_float32_vectors():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(torch.bfloat16)
    core.inject(model, DiffFit(targets=["0", "1"]))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_gradients_reach_only_the_adapters():
    net = make_net()
    core.inject(net, CONFIGS["difffit"])
    perturb(net, std=0.3)
    sum(o.sum() for o in net(*inputs())).backward()
    for name, p in net.named_parameters():
        if ".adapters." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_difffit_on_a_vit_scales_the_residual_branches():
    vit = make_vit()
    x = torch.randn(2, 3, 32, 32)
    before = vit(x)
    cfg = DiffFit(
        targets=r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12]|norm[12])",
        scale_modules=["attn.proj", "mlp.fc2"],
        modules_to_save=["head"],
    )
    core.inject(vit, cfg)
    torch.testing.assert_close(vit(x), before, atol=0, rtol=0)
    counts = per_layer_params(vit)
    assert counts["blocks.0.attn.proj"] == 2 * 64 and counts["blocks.0.mlp.fc2"] == 2 * 64
    assert counts["blocks.0.attn.qkv"] == 192 and counts["blocks.0.mlp.fc1"] == 256
    assert counts["blocks.0.norm1"] == 2 * 64
    assert type(vit.blocks[0].attn.proj.adapters["default"]).__name__ == "GammaAdapter"
    perturb(vit, std=0.3)
    with torch.no_grad():
        adapted = vit(x)
        core.merge(vit)
        torch.testing.assert_close(vit(x), adapted, atol=1e-5, rtol=1e-5)


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: IA3(targets=["k_proj"], feedforward_modules=["down_proj"]), "subset of targets"),
        (lambda: IA3(targets=["k_proj"], feedforward_modules="(unclosed"), "does not compile"),
        (lambda: SSF(targets=["fc"], init_std=-0.1), "init_std must lie in"),
        (lambda: SSF(targets=["fc"], create_missing_bias="yes"), "True or False"),
        (lambda: BitFit(targets=["fc"], create_missing_bias=1), "True or False"),
        (lambda: DiffFit(targets=["fc"], norm="no"), "DiffFit.norm must be True or False"),
        (lambda: DiffFit(targets=["a"], scale_modules=["b"]), "scale_modules must be a subset"),
        (lambda: LNTuning(targets=[]), "non-empty list"),
    ],
)
def test_bad_configs_are_refused_clearly(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (BitFit(targets=["lin_nb"]), r"lin_nb \(Linear\).*create_missing_bias=True"),
        (BitFit(targets=["rms"], create_missing_bias=True), "forward cannot use one"),
        (IA3(targets=["ln"]), r"\(IA\)\^3 wraps nn.Linear"),
        (LNTuning(targets=["lin"]), "LN tuning tunes norm layers"),
        (SSF(targets=["0"]), "SSF wraps"),
        (DiffFit(targets=["rms"], norm=False), "nothing to tune"),
        (DiffFit(targets=["lin_nb", "lin"], scale_modules=["lin"]), "neither in scale_modules"),
    ],
)
def test_unsupported_layers_are_refused_and_the_model_is_unchanged(cfg, match):
    net = make_net()
    net.add_module("0", nn.ReLU())
    with pytest.raises(TargetError, match=match):
        core.inject(net, cfg)
    assert core.adapter_names(net) == []


def test_ln_tuning_refuses_a_norm_without_affine_parameters():
    model = nn.Sequential(nn.LayerNorm(4, elementwise_affine=False))
    with pytest.raises(TargetError, match="no affine parameters"):
        core.inject(model, LNTuning(targets=["0"]))
