import json

import pytest
import torch

import core
from conftest import make_vit
from core.errors import CheckpointError


def trained_vit(r=4):
    model = make_vit()
    core.inject(model, core.LoRA(r=r, targets=["qkv", "fc1"], modules_to_save=["head"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


def test_round_trip_into_a_fresh_model(tmp_path):
    torch.manual_seed(1)
    model = trained_vit()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    core.save_adapter(model, tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"adapter.json", "adapter.safetensors"}
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 4
    assert meta["fingerprint"]["modules"]["blocks.0.attn.qkv"] == {
        "type": "Linear",
        "weight_shape": [192, 64],
    }

    torch.manual_seed(1)
    fresh = make_vit()  # same base weights (same seed), new head
    core.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x), out)
    assert not any(p.requires_grad for p in fresh.parameters())
    core.load_adapter(fresh, tmp_path / "a", name="again", trainable=True)
    assert core.adapter_names(fresh) == ["default", "again"]
    assert any(p.requires_grad for p in fresh.parameters())


def test_saved_file_holds_adapter_tensors_only(tmp_path):
    from safetensors.torch import load_file

    model = trained_vit(r=2)
    core.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter.safetensors"))
    assert keys == {
        f"blocks.{i}.{m}.{t}" for i in range(2) for m in ("attn.qkv", "mlp.fc1") for t in "AB"
    } | {"head.weight", "head.bias"}


def test_loading_into_existing_adapter_replaces_values(tmp_path):
    torch.manual_seed(1)
    model = trained_vit()
    core.save_adapter(model, tmp_path)
    x = torch.randn(1, 3, 32, 32)
    want = model(x)
    torch.manual_seed(1)
    other = make_vit()
    core.inject(other, core.LoRA(r=4, targets=["qkv", "fc1"], modules_to_save=["head"]))
    assert not torch.allclose(other(x), want)  # fresh adapter, B = 0
    core.load_adapter(other, tmp_path)
    torch.testing.assert_close(other(x), want)


def corrupt(path, how):
    tensors = path / "adapter.safetensors"
    if how == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-40])
    elif how == "flip":
        data = bytearray(tensors.read_bytes())
        data[-10] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif how == "json":
        (path / "adapter.json").write_text("{not json")
    elif how == "missing":
        tensors.unlink()


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("truncate", "truncated, corrupt"),
        ("flip", "truncated, corrupt"),
        ("json", "not valid JSON"),
        ("missing", "is missing"),
    ],
)
def test_corrupt_checkpoint_is_refused_and_model_unchanged(tmp_path, how, fragment):
    core.save_adapter(trained_vit(), tmp_path)
    corrupt(tmp_path, how)
    target = make_vit()
    snap = snapshot(target)
    with pytest.raises(CheckpointError, match=fragment):
        core.load_adapter(target, tmp_path)
    assert_unchanged(target, snap)
    assert core.adapter_names(target) == []


def test_mismatched_base_model_is_refused_and_model_unchanged(tmp_path):
    import timm

    core.save_adapter(trained_vit(), tmp_path)
    wider = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=96,
        depth=2,
        num_heads=4,
        num_classes=10,
    )
    snap = snapshot(wider)
    with pytest.raises(
        CheckpointError, match=r"blocks\.0\.attn\.qkv: checkpoint has Linear\[192, 64\]"
    ):
        core.load_adapter(wider, tmp_path)
    assert_unchanged(wider, snap)

    shallower = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=1,
        num_heads=4,
        num_classes=10,
    )
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv: not in this model"):
        core.load_adapter(shallower, tmp_path)
    assert core.adapter_names(shallower) == []


def test_tensor_set_that_does_not_fit_is_refused(tmp_path):
    core.save_adapter(trained_vit(r=4), tmp_path)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["config"]["r"] = 8  # config says r=8, tensors are r=4
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    target = make_vit()
    snap = snapshot(target)
    with pytest.raises(CheckpointError, match=r"checkpoint \[4, 64\] vs model \[8, 64\]"):
        core.load_adapter(target, tmp_path)
    assert_unchanged(target, snap)


def test_wrong_method_into_existing_name_is_refused(tmp_path):
    model = trained_vit()
    core.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["method"] = "no-such-method"
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown method 'no-such-method'"):
        core.load_adapter(make_vit(), tmp_path)


def test_meta_adapter_cannot_be_saved(tmp_path):
    with torch.device("meta"):
        model = make_vit()
    core.inject(model, core.LoRA(targets=["qkv"]))
    with pytest.raises(CheckpointError, match="meta device"):
        core.save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter.json").exists()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    model = trained_vit()
    core.save_adapter(model, tmp_path)
    core.save_adapter(model, tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]


def test_pissa_adapter_reloads_onto_the_original_base(tmp_path):
    torch.manual_seed(3)
    model = make_vit()
    core.inject(model, core.LoRA(r=4, init="pissa", targets=["qkv"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    core.save_adapter(model, tmp_path)
    torch.manual_seed(3)
    fresh = make_vit()
    core.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)
