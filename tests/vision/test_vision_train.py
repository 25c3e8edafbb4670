"""`python -m vision.train` end to end on a tiny ViT and a generated VTAB-1k task: fit, test,
adapter-only checkpoints, resuming, full fine-tuning and linear probing, the shipped configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from vtab_toy import IMAGE_SIZE, TINY_VIT, make_task

import core
from core.checkpoint import read_checkpoint
from core.methods.bottleneck import Bottleneck
from core.methods.lora import LoRA
from vision.data import VTABDataModule
from vision.module import VisionClassifier
from vision.train import VisionCLI, main

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "vision"
LORA = {
    "class_path": "core.methods.lora.LoRA",
    "init_args": {"r": 4, "alpha": 8, "targets": ["q", "v"]},
}
HOULSBY = {
    "class_path": "core.methods.bottleneck.Bottleneck",
    "init_args": {"bottleneck": 4, "targets": ["attn", "mlp"]},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vtab")
    make_task(folder)
    return folder


def tiny_config(folder: Path, model: dict, **trainer) -> Path:
    """A config like configs/vision/*.yaml, for the tiny ViT and tiny task."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 2,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "default_root_dir": str(folder),
            **trainer,
        },
        "model": {
            "backbone": "vit_base_patch16_224",
            "backbone_kwargs": TINY_VIT,
            "pretrained": False,
            "lr": 0.01,
            "warmup_steps": 2,
            **model,
        },
        "data": {"image_size": IMAGE_SIZE, "batch_size": 8, "num_workers": 0},
    }
    path = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run(command: str, config: Path, root: Path, *extra: str):
    args = [command, "--config", str(config), "--data.root", str(root), "--data.task", "toy"]
    return main([*args, *extra])


def accuracy_on_test_list(module: VisionClassifier, root: Path) -> float:
    """Top-1 accuracy over the task's test.txt, computed here without Lightning."""
    data = VTABDataModule(root, "toy", protocol="final", image_size=IMAGE_SIZE, num_workers=0)
    data.setup("test")
    dataset = data.datasets["test"]
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([s.label for s in dataset.samples])
    module.eval()
    with torch.no_grad():
        return (module(images).argmax(-1) == labels).float().mean().item()


def is_adapter_or_head(key: str) -> bool:
    return ".adapters.default." in key or key.startswith(("head.", "model.head."))


@pytest.fixture(scope="module")
def lora_run(root, tmp_path_factory):
    """fit (2 epochs) then test of the exported adapter, both through the CLI."""
    folder = tmp_path_factory.mktemp("lora")
    config = tiny_config(folder, {"method": LORA, "split_qkv": True})
    fit = run("fit", config, root)
    log_dir = Path(fit.trainer.log_dir)
    adapter = log_dir / "adapter"
    test = run("test", config, root, "--model.init_adapter", str(adapter))
    return {"fit": fit, "test": test, "log_dir": log_dir, "adapter": adapter, "config": config}


# --- LoRA: fit + test through LightningCLI -----------------------------------------------


def test_fit_exports_an_adapter_only_checkpoint_with_the_head(lora_run):
    meta, tensors = read_checkpoint(lora_run["adapter"])
    assert meta["method"] == "lora"
    assert meta["config"]["modules_to_save"] == ["head"]  # added by the module
    # core's format: "<module>.<tensor>", the LoRA factors of q and v and the new head only.
    assert set(tensors) == {
        f"blocks.{b}.attn.qkv.{part}.{factor}" for b in (0, 1) for part in "qv" for factor in "AB"
    } | {"head.weight", "head.bias"}


def test_lightning_checkpoint_holds_only_adapter_and_head_tensors(lora_run):
    (ckpt,) = (lora_run["log_dir"] / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and all(is_adapter_or_head(k) for k in state)
    assert not any("base_layer" in k for k in state)
    # 2 blocks x (q, v) x (A, B) + head weight and bias
    assert len(state) == 2 * 2 * 2 + 2


def test_accuracy_is_top1_on_the_test_list(lora_run, root):
    module = lora_run["test"].model
    logged = json.loads((Path(lora_run["test"].trainer.log_dir) / "metrics.json").read_text())
    assert logged["lists"]["test"] == "test.txt"
    assert logged["test_acc"] == pytest.approx(accuracy_on_test_list(module, root), abs=1e-6)


def test_fit_scores_the_test_list_every_epoch_and_writes_a_metrics_file(lora_run):
    record = json.loads((lora_run["log_dir"] / "metrics.json").read_text())
    assert record["protocol"] == "final"
    assert record["lists"] == {"train": "train800val200.txt", "val": "test.txt", "test": "test.txt"}
    assert [e["epoch"] for e in record["val_acc_per_epoch"]] == [0, 1]
    assert record["params"]["trainable_without_head"] == 2 * 2 * 4 * (32 + 32)
    assert record["params"]["head"] == 32 * 4 + 4
    assert record["method"] == "lora" and record["exported"] == str(lora_run["adapter"])
    # The reloaded adapter scores the test list exactly as the last epoch of fit did.
    test_record = json.loads((Path(lora_run["test"].trainer.log_dir) / "metrics.json").read_text())
    assert test_record["test_acc"] == pytest.approx(record["val_acc"], abs=1e-6)


def test_fit_logs_losses_accuracy_learning_rate_and_parameter_counts(lora_run):
    header = (lora_run["log_dir"] / "metrics.csv").read_text().splitlines()[0].split(",")
    expected = {"train_loss", "val_acc", "val_loss", "params_trainable", "lr-AdamW/pg1"}
    assert expected | {"params_trainable_without_head"} <= set(header)


def test_exported_adapter_reproduces_the_trained_model(lora_run):
    trained = lora_run["fit"].model.eval()
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    reloaded = lora_run["test"].model.eval()
    assert torch.equal(trained(x), reloaded(x))
    fresh = VisionClassifier(
        LoRA(r=4, alpha=8, targets=["q", "v"]),
        backbone="vit_base_patch16_224",
        backbone_kwargs=TINY_VIT,
        pretrained=False,
        split_qkv=True,
        num_classes=4,
        image_size=IMAGE_SIZE,
    ).eval()
    assert not torch.equal(fresh(x), trained(x))
    fresh.load_exported(lora_run["adapter"])
    assert torch.equal(fresh(x), trained(x))
    # Another config (rank) is refused with the difference named.
    other = VisionClassifier(
        LoRA(r=2, alpha=8, targets=["q", "v"]),
        backbone="vit_base_patch16_224",
        backbone_kwargs=TINY_VIT,
        pretrained=False,
        split_qkv=True,
        num_classes=4,
        image_size=IMAGE_SIZE,
    )
    with pytest.raises(core.CheckpointError, match=r"r: saved 4 vs 2"):
        other.load_exported(lora_run["adapter"])


def test_resuming_from_a_lightning_checkpoint_continues_the_same_run(root, tmp_path):
    keep_all = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_top_k": -1, "filename": "{epoch}"},
        }
    ]
    whole = run(
        "fit",
        tiny_config(tmp_path / "a", {"method": LORA, "split_qkv": True}, callbacks=keep_all),
        root,
    )
    first_epoch = Path(whole.trainer.log_dir) / "checkpoints" / "epoch=0.ckpt"
    assert first_epoch.is_file()
    resumed = run(
        "fit",
        tiny_config(tmp_path / "b", {"method": LORA, "split_qkv": True}),
        root,
        "--ckpt_path",
        str(first_epoch),
    )
    assert resumed.trainer.global_step == whole.trainer.global_step == 8
    want, got = whole.model.adapter_state_dict(), resumed.model.adapter_state_dict()
    assert set(want) == set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


# --- an activation-space method ----------------------------------------------------------


def test_bottleneck_adapter_fits_and_tests_on_the_test_list(root, tmp_path):
    config = tiny_config(tmp_path, {"method": HOULSBY}, max_epochs=1)
    fit = run("fit", config, root)
    adapter = Path(fit.trainer.log_dir) / "adapter"
    meta, tensors = read_checkpoint(adapter)
    assert meta["method"] == "bottleneck"
    sites = [f"blocks.{b}.{site}." for b in (0, 1) for site in ("attn", "mlp")]
    adapter_keys = [k for k in tensors if not k.startswith("head.")]
    assert all(k.startswith(tuple(sites)) for k in adapter_keys)
    assert all(any(k.startswith(site) for k in adapter_keys) for site in sites)
    assert not any("base_layer" in k or "norm" in k or ".fc1." in k for k in adapter_keys)
    tested = run("test", config, root, "--model.init_adapter", str(adapter))
    record = json.loads((Path(tested.trainer.log_dir) / "metrics.json").read_text())
    assert record["method"] == "bottleneck"
    # per block: 2 x (32*4 + 4 + 4*32 + 32)
    assert record["params"]["trainable_without_head"] == 2 * 2 * (32 * 4 + 4 + 4 * 32 + 32)
    assert record["test_acc"] == pytest.approx(accuracy_on_test_list(tested.model, root), abs=1e-6)
    assert isinstance(fit.model.method, Bottleneck)
    with pytest.raises(core.MergeError):
        core.merge(fit.model.model)


# --- baselines: full fine-tuning and linear probe ---------------------------------------


@pytest.mark.parametrize("tuning", ["linear", "full"])
def test_full_fine_tuning_and_linear_probe_train_and_reload(root, tmp_path, tuning):
    config = tiny_config(tmp_path, {"tuning": tuning}, max_epochs=1)
    fit = run("fit", config, root)
    module = fit.model
    counts = module.parameter_counts()
    if tuning == "linear":
        assert counts["trainable"] == counts["head"] == 32 * 4 + 4
    else:
        assert counts["trainable"] == counts["total"]
    (ckpt,) = (Path(fit.trainer.log_dir) / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    exported = Path(fit.trainer.log_dir) / "trained"
    tested = run("test", config, root, "--model.init_adapter", str(exported))
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(tested.model.eval()(x), module.eval()(x))
    record = json.loads((Path(tested.trainer.log_dir) / "metrics.json").read_text())
    assert record["method"] == tuning


def test_tuning_and_method_must_agree():
    with pytest.raises(core.ConfigError, match="needs a method"):
        VisionClassifier(None, backbone_kwargs=TINY_VIT, pretrained=False)
    with pytest.raises(core.ConfigError, match="trains without an adapter"):
        VisionClassifier(LORA, tuning="full", pretrained=False)
    with pytest.raises(core.ConfigError, match="tuning must be one of"):
        VisionClassifier(LORA, tuning="adapter", pretrained=False)


# --- the shipped configs -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_parses_and_builds_a_tiny_model(name, root):
    path = CONFIGS / f"{name}.yaml"
    shipped = yaml.safe_load(path.read_text())["model"]
    cli = VisionCLI(
        args=[
            "--config",
            str(path),
            "--data.root",
            str(root),
            "--data.task",
            "toy",
            "--data.image_size",
            str(IMAGE_SIZE),
            "--model.backbone",
            "vit_base_patch16_224",
            "--model.backbone_kwargs",
            json.dumps({**TINY_VIT, "embed_dim": 64}),  # FourierFT's n = 3000 fits 64 x 64
            "--model.pretrained",
            "false",
        ],
        run=False,
    )
    module = cli.model
    assert module.hparams.num_classes == 4 and module.hparams.image_size == IMAGE_SIZE
    if "method" in shipped:
        assert module.hparams.method["class_path"] == shipped["method"]["class_path"]
        assert core.adapter_names(module.model) == ["default"]
    else:
        assert module.method is None and shipped["tuning"] in ("full", "linear")
    counts = module.parameter_counts()
    assert 0 < counts["trainable"] <= counts["total"]
    logits = module.eval()(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


# --- two CPU processes (DDP) -------------------------------------------------------------


def test_ddp_on_two_cpu_processes_writes_one_adapter_and_counts_each_sample_once(tmp_path):
    root = tmp_path / "vtab"
    # 31 test images: DDP's sampler pads the list to 32, repeating one sample.
    make_task(root, sizes={"train800": 8, "val200": 4, "train800val200": 16, "test": 31})
    config = tiny_config(tmp_path / "run", {"method": LORA, "split_qkv": True}, max_epochs=1)
    command = [
        sys.executable,
        "-m",
        "vision.train",
        "fit",
        "--config",
        str(config),
        "--data.root",
        str(root),
        "--data.task",
        "toy",
        "--data.eval_batch_size",
        "4",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process on 2 cores
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log_dir = tmp_path / "run" / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (tmp_path / "run" / "lightning_logs").iterdir()) == ["version_0"]
    assert len(list((log_dir / "checkpoints").glob("*.ckpt"))) == 1
    record = json.loads((log_dir / "metrics.json").read_text())
    assert record["global_step"] == 1  # 16 images / (2 processes x batch 8)
    module = VisionClassifier(
        LoRA(r=4, alpha=8, targets=["q", "v"]),
        backbone="vit_base_patch16_224",
        backbone_kwargs=TINY_VIT,
        pretrained=False,
        split_qkv=True,
        num_classes=4,
        image_size=IMAGE_SIZE,
        init_adapter=str(log_dir / "adapter"),
    )
    assert record["val_acc"] == pytest.approx(accuracy_on_test_list(module, root), abs=1e-6)
