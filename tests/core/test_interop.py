"""LoRA outputs equal HF PEFT's for the same weights, both directions."""

import copy

import peft
import pytest
import torch

import core
from conftest import make_llama, make_vit, model_cases, randomise, vit_input
from core.errors import CheckpointError

VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]  # "proj" also hits patch_embed.proj, a Conv2d
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "embed_tokens"]


CASES = model_cases(VIT_TARGETS, LLAMA_TARGETS)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_saved_adapter_imports_with_identical_outputs(tmp_path, case, use_rslora):
    build, make_x, run, targets = CASES[case]
    base = build()
    ours = copy.deepcopy(base)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        use_rslora=use_rslora,
        rank_pattern={"fc1": 2},
        alpha_pattern={"fc1": 3},
    )
    theirs = peft.get_peft_model(base, cfg)
    randomise(theirs, "lora_")
    theirs.save_pretrained(tmp_path)
    core.interop.load_peft(ours, tmp_path)
    x = make_x()
    with torch.no_grad():
        torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=1e-5)
    assert core.param_report(ours).by_adapter["default"]["params"] == sum(
        p.numel() for n, p in theirs.named_parameters() if "lora_" in n
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_exported_adapter_loads_in_peft_with_identical_outputs(tmp_path, case, init):
    build, make_x, run, targets = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    if init == "pissa":
        targets = [t for t in targets if t not in ("embed_tokens", "proj")] + ["attn.proj"]
        targets = [t for t in targets if t in ("q_proj", "v_proj", "qkv", "fc1")]
    core.inject(base, core.LoRA(r=4, alpha=16, init=init, targets=targets))
    randomise(base, ".adapters.")
    core.interop.save_peft(base, tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    x = make_x()
    with torch.no_grad():
        torch.testing.assert_close(run(theirs, x), run(base, x), atol=1e-4, rtol=1e-4)


def test_export_then_import_round_trip_with_modules_to_save(tmp_path):
    model = make_vit()
    pristine = copy.deepcopy(model)
    core.inject(model, core.LoRA(r=2, targets=["qkv"], modules_to_save=["head"]))
    randomise(model, ".adapters.")
    randomise(model, "head.")
    core.interop.save_peft(model, tmp_path)
    x = vit_input()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    core.interop.load_peft(pristine, tmp_path)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(pristine(x), want)
        torch.testing.assert_close(theirs(x), want)


def test_pickle_only_peft_folder_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="pickle file omnipeft never opens"):
        core.interop.load_peft(make_vit(), tmp_path)


def test_unsupported_peft_options_are_refused_and_model_unchanged(tmp_path):
    base = make_vit()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["qkv"], lora_bias=True)
    )
    theirs.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="lora_bias"):
        core.interop.load_peft(base, tmp_path)
    assert core.adapter_names(base) == []


def test_peft_adapter_for_another_model_is_refused(tmp_path):
    theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path)
    vit = make_vit()
    with pytest.raises(CheckpointError, match="modules this model lacks"):
        core.interop.load_peft(vit, tmp_path)
    assert core.adapter_names(vit) == []
