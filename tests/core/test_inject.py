import pytest
import torch
import torch.nn as nn

import core
from core.errors import MergeError, TargetError
from core.layers import AdaptedModule


def test_inject_wraps_in_place_and_freezes_the_rest(vit):
    base_weight = vit.blocks[0].attn.qkv.weight
    core.inject(vit, core.LoRA(targets=["qkv"]))
    wrapper = vit.blocks[0].attn.qkv
    assert isinstance(wrapper, AdaptedModule)
    assert wrapper.base_layer.weight is base_weight  # never copied
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    assert len(trainable) == 2 * len(vit.blocks)


def test_starts_as_identity(vit):
    x = torch.randn(2, 3, 32, 32)
    before = vit(x)
    core.inject(vit, core.LoRA(r=4, targets=["qkv", "fc1"]))
    assert torch.equal(vit(x), before)


def test_list_targets_match_suffix_and_regex_matches_full_name(vit):
    core.inject(vit, core.LoRA(targets=["attn.qkv"]), name="suffix")
    core.inject(vit, core.LoRA(targets=r"blocks\.1\.mlp\.fc\d"), name="regex")
    wrapped = {p for p, _ in core.targeting.adapted_modules(vit)}
    assert wrapped == {
        "blocks.0.attn.qkv",
        "blocks.1.attn.qkv",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    }


def test_exclude(vit):
    core.inject(vit, core.LoRA(targets=["qkv"], exclude=["blocks.0.attn.qkv"]))
    assert not isinstance(vit.blocks[0].attn.qkv, AdaptedModule)
    assert isinstance(vit.blocks[1].attn.qkv, AdaptedModule)


def test_typo_names_nearest_modules_and_changes_nothing(vit):
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(TargetError, match=r"'qvk'.*Nearest module names: \['qkv'"):
        core.inject(vit, core.LoRA(targets=["qkv", "qvk"]))
    assert core.adapter_names(vit) == []
    assert vit.state_dict().keys() == state.keys()


def test_unsupported_module_type_is_named(vit):
    with pytest.raises(TargetError, match=r"blocks\.0\.norm1 \(LayerNorm\): LoRA wraps"):
        core.inject(vit, core.LoRA(targets=["norm1"]))
    assert core.adapter_names(vit) == []


def test_multihead_attention_out_proj_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(16, 2))
    with pytest.raises(TargetError, match="MultiheadAttention"):
        core.inject(model, core.LoRA(targets=["out_proj"]))


def test_named_adapters_and_set_active(vit):
    x = torch.randn(2, 3, 32, 32)
    base = vit(x)
    core.inject(vit, core.LoRA(r=2, targets=["qkv"]), name="a")
    core.inject(vit, core.LoRA(r=2, targets=["qkv", "proj"]), name="b")
    for _, p in vit.named_parameters():
        if p.requires_grad or ".adapters.a." in _:
            nn.init.normal_(p, std=0.1)
    assert core.active_adapters(vit) == ["b"]
    # only b trains after injecting b
    assert all(".adapters.b." in n for n, p in vit.named_parameters() if p.requires_grad)
    out_b = vit(x)
    core.set_active(vit, ["a"])
    out_a = vit(x)
    core.set_active(vit, ["a", "b"])
    out_ab = vit(x)
    core.set_active(vit, [])
    assert torch.allclose(vit(x), base, atol=1e-6)
    assert not torch.allclose(out_a, out_b)
    assert not torch.allclose(out_ab, out_a) and not torch.allclose(out_ab, out_b)
    with pytest.raises(KeyError, match="unknown adapter"):
        core.set_active(vit, ["c"])


def test_same_name_twice_is_refused(vit):
    core.inject(vit, core.LoRA(targets=["qkv"]))
    with pytest.raises(core.ConfigError, match="already has an adapter named 'default'"):
        core.inject(vit, core.LoRA(targets=["fc1"]))
    with pytest.raises(core.ConfigError, match="not allowed"):
        core.inject(vit, core.LoRA(targets=["fc1"]), name="a.b")
    with pytest.raises(core.ConfigError, match="torch.nn.Module attribute"):
        core.inject(vit, core.LoRA(targets=["fc1"]), name="half")


def test_delete_and_unload_restore_the_plain_model(vit):
    x = torch.randn(2, 3, 32, 32)
    before = vit(x)
    core.inject(vit, core.LoRA(targets=["qkv"]), name="a")
    core.inject(vit, core.LoRA(targets=["qkv", "fc2"]), name="b")
    core.delete_adapter(vit, "b")
    assert core.adapter_names(vit) == ["a"]
    assert not isinstance(vit.blocks[0].mlp.fc2, AdaptedModule)
    core.unload(vit)
    assert core.adapter_names(vit) == []
    assert isinstance(vit.blocks[0].attn.qkv, nn.Linear)
    assert torch.equal(vit(x), before)


def test_merge_of_unknown_or_while_merged(vit):
    core.inject(vit, core.LoRA(targets=["qkv"]))
    core.merge(vit)
    with pytest.raises(MergeError, match="unmerge"):
        core.set_active(vit, ["default"])
    with pytest.raises(KeyError):
        core.merge(vit, ["nope"])


def test_meta_device_llama_7b_lora_r64_counts_33_5m():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig())  # LLaMA-2-7B shape: 32 layers, 4096 wide
    core.inject(model, core.LoRA(r=64, targets=["q_proj", "v_proj"]))
    report = core.param_report(model)
    assert report.trainable == 33_554_432 == 32 * 2 * 64 * (4096 + 4096)
    assert report.by_adapter["default"]["modules"] == 64
    assert all(p.is_meta for p in model.parameters())


def test_param_report_table_and_data(vit):
    total = sum(p.numel() for p in vit.parameters())
    core.inject(vit, core.LoRA(r=4, targets=["qkv"], modules_to_save=["head"]))
    report = core.param_report(vit)
    lora = 2 * 4 * (64 + 192)
    head = vit.head.weight.numel() + vit.head.bias.numel()
    assert report.by_adapter["default"]["params"] == lora
    assert report.by_adapter["default"]["saved_params"] == head
    assert report.trainable == lora + head
    assert report.total == total + lora
    assert report.by_module_type["Linear"]["modules"] == 2
    assert "trainable" in str(report) and f"{lora:,}" in str(report)
    assert report.as_dict()["trainable_percent"] == pytest.approx(
        100 * (lora + head) / (total + lora)
    )


class _AddOne(core.layers.Adapter):
    def post(self, x, y, base):
        return y + 1


class _KeywordBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, hidden_states, scale=1.0):
        return self.inner(hidden_states) * scale


def test_wrapper_passes_keyword_inputs_and_extra_arguments():
    block = _KeywordBlock()
    x = torch.randn(2, 4)
    want = block(hidden_states=x, scale=2.0) + 1
    wrapper = core.layers.AdaptedModule(block)
    wrapper.adapters["one"] = _AddOne()
    wrapper.active = ["one"]
    torch.testing.assert_close(wrapper(hidden_states=x, scale=2.0), want)
    torch.testing.assert_close(wrapper(x, 2.0), want)
    with pytest.raises(TypeError, match="without a positional input"):
        wrapper(other=x)


class _Doubling(core.layers.Adapter):
    replaces_base = True

    def run_base(self, x, base, *args, **kwargs):
        return 2 * base(x, *args, **kwargs)


def test_replacing_adapter_works_with_keyword_inputs():
    block = _KeywordBlock()
    wrapper = core.layers.AdaptedModule(block)
    wrapper.adapters["twice"] = _Doubling()
    wrapper.active = ["twice"]
    x = torch.randn(2, 4)
    want = 2 * block(x, 3.0)
    torch.testing.assert_close(wrapper(hidden_states=x, scale=3.0), want)
    torch.testing.assert_close(wrapper(x, scale=3.0), want)


def test_layers_inside_a_wrapped_block_stay_targetable(vit):
    x = torch.randn(2, 3, 32, 32)
    core.inject(vit, core.Bottleneck(targets=["mlp"]), name="bottleneck")
    core.inject(vit, core.LoRA(r=2, targets=["fc1"]), name="lora")
    assert isinstance(vit.blocks[0].mlp, AdaptedModule)
    assert isinstance(vit.blocks[0].mlp.base_layer.fc1, AdaptedModule)
    assert core.adapter_names(vit) == ["bottleneck", "lora"]
    core.set_active(vit, ["bottleneck", "lora"])
    for name, p in vit.named_parameters():
        if ".adapters." in name:
            nn.init.normal_(p, std=0.1)
    both = vit(x)
    core.set_active(vit, ["bottleneck"])
    assert not torch.allclose(vit(x), both)
    core.set_active(vit, ["bottleneck", "lora"])
    core.merge(vit, ["lora"])
    torch.testing.assert_close(vit(x), both, atol=1e-5, rtol=1e-5)
    core.unmerge(vit)
    core.unload(vit)
    assert isinstance(vit.blocks[0].mlp.fc1, nn.Linear)


def test_injecting_into_an_eval_model_keeps_dropout_off(vit):
    vit.eval()
    core.inject(vit, core.LoRA(r=2, dropout=0.5, targets=["qkv"]))
    assert not any(m.training for m in vit.modules())
