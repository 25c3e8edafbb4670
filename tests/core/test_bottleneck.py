"""Bottleneck adapters (Houlsby, Pfeiffer, parallel / scaled parallel), AdapterBias and
Compacter / PHM-Adapter on timm ViT, LLaMA, BERT and a diffusers transformer block."""

import copy

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import core
from conftest import adapters_of, make_llama, make_vit, own_params, randomise
from core.errors import CheckpointError, ConfigError, MergeError, TargetError
from core.inject import adapter_config
from core.methods.bottleneck import (
    AdapterBias,
    Bottleneck,
    Compacter,
    PHMLinear,
    placement_targets,
)
from core.registry import METHODS, config_from_dict
from core.targeting import adapted_modules

# --- models and inputs ------------------------------------------------------------------


def make_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


def make_diffusers_block():
    from diffusers.models.attention import BasicTransformerBlock

    return BasicTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16).eval()


MODELS = {  # name: (build, make input, run, preset family)
    "vit": (make_vit, lambda: torch.randn(2, 3, 32, 32), lambda m, x: m(x), "timm_vit"),
    "llama": (
        make_llama,
        lambda: torch.randint(0, 128, (2, 9)),
        lambda m, x: m(input_ids=x).logits,
        "llama",
    ),
    "bert": (
        make_bert,
        lambda: torch.randint(0, 100, (2, 7)),
        lambda m, x: m(input_ids=x).last_hidden_state,
        "bert",
    ),
    "diffusers": (
        make_diffusers_block,
        lambda: torch.randn(2, 5, 32),
        lambda m, x: m(x),
        "diffusers",
    ),
}

METHOD_CONFIGS = {  # name: family -> config
    "houlsby": lambda fam: Bottleneck.preset("houlsby", fam),
    "pfeiffer_ln": lambda fam: Bottleneck.preset("pfeiffer", fam, layer_norm=True),
    "scaled_parallel": lambda fam: Bottleneck.preset("scaled_parallel", fam),
    "parallel_both": lambda fam: Bottleneck(
        targets=placement_targets("both", fam), mode="parallel"
    ),
    "adapter_bias": lambda fam: AdapterBias(targets=placement_targets("ffn", fam)),
    "compacter": lambda fam: Compacter.preset("houlsby", fam, bottleneck=8),
    "phm_adapter": lambda fam: Compacter.preset("pfeiffer", fam, rank=None, bottleneck=8),
}


# --- identity at start, on four model families -----------------------------------------


@pytest.mark.parametrize("method", METHOD_CONFIGS)
@pytest.mark.parametrize("family", MODELS)
def test_starts_as_the_frozen_model(family, method):
    build, make_x, run, fam = MODELS[family]
    model, x = build(), make_x()
    with torch.no_grad():
        frozen = run(model, x)
        core.inject(model, METHOD_CONFIGS[method](fam))
        adapted = run(model, x)
    assert len(adapters_of(model)) >= 1
    torch.testing.assert_close(adapted, frozen, atol=1e-6, rtol=0)
    randomise(model, std=0.1)  # and the adapters do act once trained
    with torch.no_grad():
        assert (run(model, x) - frozen).abs().max() > 1e-3


def test_near_identity_init_is_close_but_not_exact():
    model, x = make_vit(), torch.randn(2, 3, 32, 32)
    frozen = model(x)
    core.inject(model, Bottleneck.preset("houlsby", "timm_vit", init="near_identity"))
    diff = (model(x) - frozen).abs().max().item()
    assert 0 < diff < 1e-2
    for adapter in adapters_of(model).values():
        for layer in (adapter.down, adapter.up):
            assert layer.weight.abs().max() <= 2e-2 and layer.weight.abs().max() > 0
            assert torch.count_nonzero(layer.bias) == 0


# --- the forward follows the equations ---------------------------------------------------


class TupleBlock(nn.Module):
    """A block returning (hidden, extra) like transformers attention, input 6 -> output 8."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, hidden_states, scale=1.0):
        return self.fc(hidden_states) * scale, "weights"


def wrapped_tuple_block(cfg):
    model = nn.Sequential(TupleBlock())
    core.inject(model, cfg)
    randomise(model, std=0.5)
    return model, model[0].adapters["default"], model[0].base_layer


def test_sequential_equation_with_layer_norm_on_tuple_output():
    cfg = Bottleneck(targets=["0"], bottleneck=3, activation="tanh", layer_norm=True, scale=2.0)
    model, a, base = wrapped_tuple_block(cfg)
    x = torch.randn(4, 6)
    out, extra = model[0](hidden_states=x, scale=0.5)
    h = base.fc(x) * 0.5
    z = F.layer_norm(h, (8,), a.norm.weight, a.norm.bias)
    expected = h + 2.0 * (torch.tanh(z @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
    torch.testing.assert_close(out, expected)
    assert extra == "weights"


def test_parallel_equation_reads_the_block_input():
    cfg = Bottleneck(targets=["0"], bottleneck=3, mode="parallel", scale=4.0)
    model, a, base = wrapped_tuple_block(cfg)
    x = torch.randn(4, 6)
    out, _ = model(x)
    assert a.down.weight.shape == (3, 6) and a.up.weight.shape == (8, 3)
    expected = base.fc(x) + 4.0 * (
        F.relu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias
    )
    torch.testing.assert_close(out, expected)


def test_adapter_bias_equation():
    model, a, base = wrapped_tuple_block(AdapterBias(targets=["0"]))
    x = torch.randn(2, 5, 6)
    out, _ = model(x)
    alpha = x @ a.alpha.weight.T + a.alpha.bias  # (2, 5, 1): one weight per token
    torch.testing.assert_close(out, base.fc(x) + alpha * a.shift)


def test_adapter_bias_starts_with_zero_shift_and_default_linear_init():
    model = nn.Sequential(nn.Linear(16, 8))
    core.inject(model, AdapterBias(targets=["0"]))
    a = model[0].adapters["default"]
    assert torch.count_nonzero(a.shift) == 0
    assert 0 < a.alpha.weight.abs().max() <= 1 / 16**0.5 + 1e-6  # PyTorch's Linear bound


@pytest.mark.parametrize("rank", [1, 2, None])
def test_phm_weight_is_a_sum_of_kronecker_products(rank):
    layer = PHMLinear(8, 12, 4, rank, {})
    layer.reset_parameters(zero=False)
    rule = torch.randn(4, 4, 4)
    blocks = layer.block_factors()
    assert blocks.shape == (4, 3, 2)
    if rank is not None:
        torch.testing.assert_close(blocks[1], layer.s[1] @ layer.t[1].T)
        assert torch.linalg.matrix_rank(blocks[1]) <= rank
    expected = sum(torch.kron(rule[i], blocks[i]) for i in range(4))
    torch.testing.assert_close(layer.weight(rule), expected)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x, rule), x @ expected.T + layer.bias)


def test_compacter_equation_and_zero_up_start():
    cfg = Compacter(targets=["0"], bottleneck=4, n=2, activation="relu")
    model = nn.Sequential(TupleBlock())
    core.inject(model, cfg)
    a = model[0].adapters["default"]
    assert torch.count_nonzero(a.up.s) == 0 and torch.count_nonzero(a.up.t) > 0
    randomise(model, std=0.5)
    x = torch.randn(3, 6)
    with pytest.raises(RuntimeError, match="built for outputs with 8 features"):
        a.adapt(x, torch.randn(3, 7))
    out, _ = model(x)
    h = model[0].base_layer.fc(x)
    w_down, w_up = a.down.weight(a.rule), a.up.weight(a.rule)
    expected = h + F.relu(h @ w_down.T + a.down.bias) @ w_up.T + a.up.bias
    torch.testing.assert_close(out, expected)


# --- parameter counts by the papers' formulas ------------------------------------------


def bottleneck_count(d_z, d_out, m, ln=False):
    return m * (d_z + 1) + d_out * (m + 1) + (2 * d_z if ln else 0)


def phm_count(a, b, n, r):
    return (r * (a + b) if r is not None else a * b // n) + b


def compacter_count(d_z, d_out, m, n, r, ln=False):
    return phm_count(d_z, m, n, r) + phm_count(m, d_out, n, r) + (2 * d_z if ln else 0)


# Feature sizes (d_in, d_out) of the preset targets: ViT d=64; BERT d=32, intermediate 64.
VIT_SIZES = {"attn": (64, 64), "mlp": (64, 64)}
BERT_SIZES = {"attention.output.dense": (32, 32), "output.dense": (64, 32)}


def sizes_of(path, table):
    return next(v for k, v in sorted(table.items(), key=lambda kv: -len(kv[0])) if path.endswith(k))


@pytest.mark.parametrize(
    "family, table", [("timm_vit", VIT_SIZES), ("bert", BERT_SIZES)], ids=["vit", "bert"]
)
@pytest.mark.parametrize(
    "cfg_kwargs",
    [
        {"mode": "sequential"},
        {"mode": "parallel", "bottleneck": 8},
        {"mode": "sequential", "reduction_factor": 4, "layer_norm": True},
        {"mode": "parallel", "layer_norm": True},
    ],
    ids=["seq", "par", "seq_ln", "par_ln"],
)
def test_bottleneck_counts_per_layer(family, table, cfg_kwargs):
    model = make_vit() if family == "timm_vit" else make_bert()
    cfg = Bottleneck(targets=placement_targets("both", family), **cfg_kwargs)
    core.inject(model, cfg)
    found = adapters_of(model)
    assert len(found) == 4  # two layers x (attention, FFN)
    for path, adapter in found.items():
        d_in, d_out = sizes_of(path, table)
        d_z = d_in if cfg.mode == "parallel" else d_out
        m = cfg.bottleneck or int(d_out // cfg.reduction_factor)
        assert own_params(adapter) == bottleneck_count(d_z, d_out, m, cfg.layer_norm), path
    assert core.param_report(model).trainable == sum(own_params(a) for a in found.values())


@pytest.mark.parametrize("family, table", [("timm_vit", VIT_SIZES), ("bert", BERT_SIZES)])
def test_adapter_bias_counts_per_layer(family, table):
    model = make_vit() if family == "timm_vit" else make_bert()
    core.inject(model, AdapterBias(targets=placement_targets("both", family)))
    for path, adapter in adapters_of(model).items():
        d_in, d_out = sizes_of(path, table)
        assert own_params(adapter) == d_out + d_in + 1, path


@pytest.mark.parametrize("rank", [1, 3, None], ids=["compacter_r1", "compacter_r3", "phm"])
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("family, table", [("timm_vit", VIT_SIZES), ("bert", BERT_SIZES)])
def test_compacter_counts_per_layer_with_one_shared_rule(family, table, mode, rank):
    model = make_vit() if family == "timm_vit" else make_bert()
    cfg = Compacter(targets=placement_targets("both", family), bottleneck=8, mode=mode, rank=rank)
    core.inject(model, cfg)
    found = adapters_of(model)
    owners = [a for a in found.values() if a.owns_rule]
    assert len(owners) == 1 and len(found) == 4
    assert all(a.rule is owners[0].phm_rule for a in found.values())
    per_layer = 0
    for path, adapter in found.items():
        d_in, d_out = sizes_of(path, table)
        d_z = d_in if mode == "parallel" else d_out
        expected = compacter_count(d_z, d_out, 8, 4, rank)
        assert own_params(adapter) == expected + (4**3 if adapter.owns_rule else 0), path
        per_layer += expected
    report = core.param_report(model)
    assert report.trainable == per_layer + 4**3  # the shared rule counts once
    assert report.by_adapter["default"]["params"] == per_layer + 4**3


def test_paper_count_compacter_houlsby_is_4L_d_plus_m_plus_n_cubed():
    # Karimi Mahabadi et al.: 4 L (d + m) + n^3 weights (biases aside) for r = 1.
    model = make_vit()  # L = 2, d = 64
    core.inject(model, Compacter.preset("houlsby", "timm_vit", bottleneck=8))
    weights = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "bias" not in n
    )
    assert weights == 4 * 2 * (64 + 8) + 4**3


def test_meta_device_llama_7b_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig())  # 32 layers, d = 4096
    core.inject(model, Bottleneck.preset("houlsby", "llama"), name="houlsby")
    core.inject(model, Compacter.preset("houlsby", "llama"), name="compacter")
    report = core.param_report(model)
    d, m_b, m_c = 4096, 4096 // 16, 4096 // 32
    assert report.by_adapter["houlsby"]["params"] == 64 * bottleneck_count(d, d, m_b)
    assert report.by_adapter["compacter"]["params"] == 64 * compacter_count(d, d, m_c, 4, 1) + 64
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_meta_device_counts_equal_real_counts(method):
    cfg = METHOD_CONFIGS[method]("timm_vit")
    real = make_vit()
    with torch.device("meta"):
        meta = make_vit()
    core.inject(real, cfg, name="a")
    core.inject(meta, cfg, name="a")
    assert core.param_report(meta).as_dict() == core.param_report(real).as_dict()
    assert all(p.is_meta for p in meta.parameters())


# --- not mergeable -----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_merge_is_refused_and_changes_nothing(method):
    model, x = make_vit(), torch.randn(2, 3, 32, 32)
    cfg = METHOD_CONFIGS[method]("timm_vit")
    assert METHODS[cfg.method].mergeable is False
    core.inject(model, cfg)
    randomise(model, std=0.1)
    before_out = model(x)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="acts on activations"):
        core.merge(model)
    assert all(not w.merged for _, w in adapted_modules(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    torch.testing.assert_close(model(x), before_out, atol=0, rtol=0)


# --- training -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_adamw_steps_reduce_the_loss(method):
    model, x = make_vit(num_classes=4), torch.randn(8, 3, 32, 32)
    target = torch.randn(8, 4)
    core.inject(model, METHOD_CONFIGS[method]("timm_vit"))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(
        ".adapters." in n for n, p in model.named_parameters() if p.requires_grad
    )
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key


def test_llama_and_diffusers_blocks_train():
    llama, ids = make_llama(), torch.randint(0, 128, (2, 9))
    block, h = make_diffusers_block(), torch.randn(2, 5, 32)
    core.inject(llama, Bottleneck.preset("houlsby", "llama"))
    core.inject(block, Compacter.preset("houlsby", "diffusers", bottleneck=8))
    for model, run in (
        (llama, lambda: llama(input_ids=ids, labels=ids).loss),
        (block, lambda: (block(h) - 1).pow(2).mean()),
    ):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        first = None
        for _ in range(8):
            loss = run()
            first = loss.item() if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert run().item() < first


# --- checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_save_load_round_trip_is_exact(tmp_path, method):
    base, x = make_vit(), torch.randn(2, 3, 32, 32)
    fresh = copy.deepcopy(base)
    core.inject(base, METHOD_CONFIGS[method]("timm_vit"), name="task")
    randomise(base, std=0.1)
    expected = base(x)
    core.save_adapter(base, tmp_path, name="task")
    core.load_adapter(fresh, tmp_path, name="task")
    assert torch.equal(fresh(x), expected)
    assert adapter_config(fresh, "task") == adapter_config(base, "task")


def test_compacter_checkpoint_keeps_the_rule_shared(tmp_path):
    base, x = make_vit(), torch.randn(2, 3, 32, 32)
    fresh = copy.deepcopy(base)
    core.inject(base, Compacter.preset("houlsby", "timm_vit", bottleneck=8))
    randomise(base, std=0.1)
    rule = next(a.rule for a in adapters_of(base).values()).detach().clone()
    core.save_adapter(base, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter.safetensors")
    saved_rules = [v for k, v in tensors.items() if k.endswith("phm_rule")]
    assert len(saved_rules) == 4 and all(torch.equal(r, rule) for r in saved_rules)

    core.load_adapter(fresh, tmp_path)
    loaded = adapters_of(fresh)
    owners = [a for a in loaded.values() if a.owns_rule]
    assert len(owners) == 1
    assert all(a.rule is owners[0].phm_rule for a in loaded.values())
    assert torch.equal(owners[0].phm_rule, rule)
    assert (
        core.param_report(fresh).by_adapter["default"]["params"]
        == core.param_report(base).by_adapter["default"]["params"]
    )
    assert torch.equal(fresh(x), base(x))

    # Loading again into the existing adapter overwrites the one shared rule.
    with torch.no_grad():
        owners[0].phm_rule.zero_()
    core.load_adapter(fresh, tmp_path)
    assert torch.equal(owners[0].phm_rule, rule) and torch.equal(fresh(x), base(x))


def test_compacter_torch_state_dict_round_trip_keeps_the_rule_shared():
    cfg = Compacter.preset("houlsby", "timm_vit", bottleneck=8)
    a, b, x = make_vit(), make_vit(), torch.randn(2, 3, 32, 32)
    core.inject(a, cfg)
    core.inject(b, cfg)
    randomise(a, std=0.1)
    b.load_state_dict(a.state_dict())  # strict: every layer's phm_rule entry is accepted
    assert torch.equal(a(x), b(x))
    found = adapters_of(b)
    assert len({id(ad.rule) for ad in found.values()}) == 1


def test_checkpoint_of_other_width_is_refused(tmp_path):
    model = make_vit()
    core.inject(model, Bottleneck(targets=["mlp"], bottleneck=4))
    core.save_adapter(model, tmp_path)
    other = make_vit()
    core.inject(other, Bottleneck(targets=["mlp"], bottleneck=8), name="default")
    with pytest.raises(CheckpointError, match="do not fit"):
        core.load_adapter(other, tmp_path)


# --- several named adapters ---------------------------------------------------------------


def test_named_adapters_switch_and_stack():
    model, x = make_vit(), torch.randn(2, 3, 32, 32)
    frozen = model(x)
    core.inject(model, Bottleneck.preset("pfeiffer", "timm_vit"), name="a")
    core.inject(model, Bottleneck.preset("scaled_parallel", "timm_vit", bottleneck=8), name="b")
    randomise(model, std=0.1)
    outputs = {}
    for active in (["a"], ["b"], ["a", "b"], []):
        core.set_active(model, active)
        outputs["+".join(active)] = model(x)
    torch.testing.assert_close(outputs[""], frozen, atol=0, rtol=0)
    for one, other in (("a", "b"), ("a", "a+b"), ("b", "a+b"), ("a", "")):
        assert (outputs[one] - outputs[other]).abs().max() > 1e-3
    core.set_active(model, ["a"])
    assert torch.equal(model(x), outputs["a"])
    # Stacked on one block, the second adapter reads the first one's output.
    wrapper = model.blocks[0].mlp
    hidden = torch.randn(3, 64)
    core.set_active(model, ["a", "b"])
    a, b = wrapper.adapters["a"], wrapper.adapters["b"]
    y = wrapper.base_layer(hidden)
    torch.testing.assert_close(wrapper(hidden), b.adapt(hidden, a.adapt(hidden, y)))


def test_each_compacter_adapter_name_has_its_own_rule():
    model = make_vit()
    cfg = Compacter.preset("houlsby", "timm_vit", bottleneck=8)
    core.inject(model, cfg, name="one")
    core.inject(model, cfg, name="two")  # the same config object, a new injection
    rules = {
        name: {id(a.rule) for a in adapters_of(model, name).values()} for name in ("one", "two")
    }
    assert len(rules["one"]) == 1 and len(rules["two"]) == 1 and rules["one"] != rules["two"]
    by_adapter = core.param_report(model).by_adapter
    assert by_adapter["one"]["params"] == by_adapter["two"]["params"] == 4 * 216 + 4**3
    assert compacter_count(64, 64, 8, 4, 1) == 216


def test_same_compacter_config_in_two_models_gives_each_its_own_rule():
    cfg = Compacter(targets=["mlp"], bottleneck=8)
    vit, llama = make_vit(), make_llama()  # disjoint module names, both 64 wide
    core.inject(vit, cfg)
    core.inject(llama, cfg)
    rules = [{id(a.rule) for a in adapters_of(m).values()} for m in (vit, llama)]
    assert len(rules[0]) == len(rules[1]) == 1 and rules[0] != rules[1]


def test_deepcopy_keeps_the_rule_shared_within_the_copy():
    model, x = make_vit(), torch.randn(2, 3, 32, 32)
    core.inject(model, Compacter.preset("houlsby", "timm_vit", bottleneck=8))
    randomise(model, std=0.1)
    clone = copy.deepcopy(model)
    rules = {id(a.rule) for a in adapters_of(clone).values()}
    assert len(rules) == 1 and rules.isdisjoint({id(a.rule) for a in adapters_of(model).values()})
    assert torch.equal(clone(x), model(x))


# --- targets that are not blocks, and bad configs ------------------------------------------


class NoLinear(nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize(
    "build, cfg, message",
    [
        (make_vit, Bottleneck(targets=["norm1"]), "LayerNorm is a normalisation layer"),
        (make_llama, AdapterBias(targets=["input_layernorm"]), "normalisation layer"),
        (make_llama, Bottleneck(targets=["layers"]), "container with no forward"),
        (make_llama, Bottleneck(targets=["act_fn"]), "hidden size cannot be inferred"),
        (make_vit, Bottleneck(targets=["mlp.act"]), "activation function"),
        (make_vit, Bottleneck(targets=["attn_drop"]), "dropout"),
        (make_llama, Bottleneck(targets=["embed_tokens"]), "embedding lookup"),
        (make_vit, Compacter(targets=["mlp"], bottleneck=6), "6 is not divisible by 4"),
        (make_vit, Bottleneck(targets=["mlp"], reduction_factor=128), "leaves no bottleneck"),
    ],
)
def test_non_blocks_are_refused_with_a_reason(build, cfg, message):
    model = build()
    with pytest.raises(TargetError, match=message):
        core.inject(model, cfg)
    assert not list(adapted_modules(model))


def test_hidden_size_lets_a_block_without_linear_layers_be_adapted():
    model = nn.Sequential(NoLinear())
    with pytest.raises(TargetError, match="pass hidden_size"):
        core.inject(model, Bottleneck(targets=["0"]))
    core.inject(model, Bottleneck(targets=["0"], hidden_size=32))
    randomise(model, std=0.1)
    x = torch.randn(2, 32)
    assert model(x).shape == (2, 32) and not torch.equal(model(x), 2 * x)
    with pytest.raises(RuntimeError, match="was built for outputs with 32 features"):
        model(torch.randn(2, 16))


def test_half_precision_block_gets_float32_adapter():
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))
    core.inject(model, Compacter(targets=["0"], bottleneck=4))
    adapter = model[0].adapters["default"]
    assert adapter.rule.dtype == adapter.up.bias.dtype == torch.float32
    assert model(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bert_sublayer_blocks_with_two_inputs():
    # BertSelfOutput / BertOutput are called (hidden_states, input_tensor); both match "output".
    model, ids = make_bert(), torch.randint(0, 100, (2, 7))
    frozen = model(input_ids=ids).last_hidden_state
    core.inject(model, Bottleneck(targets=["output"], mode="parallel", bottleneck=4))
    found = adapters_of(model)
    assert len(found) == 4
    assert {a.down.in_features for a in found.values()} == {32, 64}  # context / intermediate
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, frozen, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Bottleneck(targets=["mlp"], reduction_factor=8, bottleneck=4), "exactly one"),
        (lambda: Bottleneck(targets=["mlp"], bottleneck=0), "bottleneck must be >= 1"),
        (lambda: Bottleneck(targets=["mlp"], bottleneck=2.5), "bottleneck must be an int"),
        (lambda: Bottleneck(targets=["mlp"], reduction_factor=0), "reduction_factor must lie"),
        (lambda: Bottleneck(targets=["mlp"], mode="serial"), "mode must be one of"),
        (lambda: Bottleneck(targets=["mlp"], scale=0), "scale must lie"),
        (lambda: Bottleneck(targets=["mlp"], activation="softmax"), "activation must be one of"),
        (lambda: Bottleneck(targets=["mlp"], init="xavier"), "init must be one of"),
        (lambda: Bottleneck(targets=["mlp"], layer_norm="yes"), "layer_norm must be True or"),
        (lambda: AdapterBias(targets=["mlp"], hidden_size=0), "hidden_size must be >= 1"),
        (lambda: Compacter(targets=["mlp"], n=1), "n must be >= 2"),
        (lambda: Compacter(targets=["mlp"], rank=0), "rank must be >= 1"),
        (lambda: Bottleneck(targets=[]), "non-empty list"),
        (lambda: Bottleneck.preset("middle", "timm_vit"), "unknown placement"),
        (lambda: placement_targets("ffn", "resnet"), "unknown model family"),
        (lambda: placement_targets("middle", "llama"), "unknown placement"),
    ],
)
def test_bad_configs_are_refused_clearly(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_configs_default_from_targets_and_round_trip_through_the_registry():
    b, c, ab = Bottleneck(targets=["mlp"]), Compacter(targets=["mlp"]), AdapterBias(targets=["mlp"])
    assert (b.reduction_factor, b.mode, b.scale, b.activation, b.init) == (
        16.0,
        "sequential",
        1.0,
        "relu",
        "zero_up",
    )
    assert (c.reduction_factor, c.n, c.rank, c.activation) == (32.0, 4, 1, "gelu")
    for cfg in (b, c, ab, Bottleneck.preset("scaled_parallel", "bert", bottleneck=8)):
        assert config_from_dict(cfg.method, cfg.to_dict()) == cfg
    assert {"bottleneck", "adapter_bias", "compacter"} <= set(METHODS)
    assert Compacter.preset("pfeiffer", "llama").targets == ("mlp",)  # Compacter++
    sp = Bottleneck.preset("scaled_parallel", "timm_vit")
    assert (sp.mode, sp.scale, sp.targets) == ("parallel", 4.0, ("mlp",))
