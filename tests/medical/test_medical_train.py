"""`python -m medical.train` fit + test on a tiny ViT (LoRA) and a tiny MONAI DenseNet,
adapter-only checkpoints, the test report with bootstrap intervals, saliency overlays,
and every shipped config building on a tiny backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from med_toy import QUIET, TINY_DENSENET, TINY_VIT
from PIL import Image

from medical.explain import load_run, write_overlays
from medical.module import CXRClassifier
from medical.synthetic import write_chexpert, write_nih
from medical.train import CXRCLI

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "medical"


def fit_and_test(config: str, root: Path, out: Path, *extra: str) -> tuple[CXRCLI, list[dict]]:
    cli = CXRCLI(
        args=[
            "--config",
            str(CONFIGS / config),
            "--data.root",
            str(root),
            "--trainer.default_root_dir",
            str(out),
            "--trainer.max_epochs",
            "1",
            "--model.bootstrap_samples",
            "40",
            *QUIET,
            *extra,
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, cli.trainer.test(cli.model, datamodule=cli.datamodule)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = write_nih(tmp_path_factory.mktemp("nih"), patients=12, test_patients=4, size=16)
    out = tmp_path_factory.mktemp("vit")
    return fit_and_test(
        "cxr_demo.yaml", root, out, "--data.image_size", "16", "--model.backbone_kwargs", TINY_VIT
    )


@pytest.fixture(scope="module")
def densenet_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = write_chexpert(tmp_path_factory.mktemp("cx"), patients=12, valid_patients=4, size=32)
    out = tmp_path_factory.mktemp("dense")
    return fit_and_test(
        "cxr_densenet_lora.yaml",
        root,
        out,
        "--data.dataset",
        "chexpert",
        "--data.image_size",
        "32",
        "--data.uncertainty",
        "ignore",
        "--model.pretrained",
        "false",
        "--model.backbone_kwargs",
        TINY_DENSENET,
    )


def test_vit_lora_fit_test_report(vit_run):
    cli, results = vit_run
    log_dir = Path(cli.trainer.log_dir)
    report = json.loads((log_dir / "test_report.json").read_text())
    assert len(report["auroc"]) == 14 and report["images"] == 8
    assert results[0]["test_auroc"] == pytest.approx(report["mean"])
    defined = [k for k, a in enumerate(report["auroc"]) if a == a]
    assert defined and all(
        report["low"][k] <= report["auroc"][k] <= report["high"][k] for k in defined
    )
    with (log_dir / "auroc.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["finding"] for r in rows][-2:] == ["Hernia", "mean"]
    assert (log_dir / "adapter").is_dir()


def test_checkpoint_is_adapter_only(vit_run):
    cli, _ = vit_run
    ckpt = next(Path(cli.trainer.log_dir).rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert any(".adapters.default." in k for k in state) and any(
        k.startswith("model.head.") for k in state
    )
    assert not any(k.endswith("patch_embed.proj.weight") for k in state)


def test_exported_adapter_reloads_to_the_same_scores(vit_run):
    cli, _ = vit_run
    module, data = load_run(cli.trainer.log_dir)
    data.setup()
    images = next(iter(data.test_dataloader()))[0]
    cli.model.eval()
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module(images), cli.model(images), atol=1e-6)


def test_densenet_lora_on_chexpert_and_gradcam(densenet_run, tmp_path):
    cli, results = densenet_run
    assert cli.model.hparams.backbone == "monai:densenet121"
    assert cli.model.findings == [
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Pleural Effusion",
    ]
    assert 0.0 <= results[0]["test_auroc"] <= 1.0
    module, data = load_run(cli.trainer.log_dir)
    written = write_overlays(module, data, tmp_path, finding=1, images=3, method="gradcam")
    assert len(written) == 3
    pixels = np.asarray(Image.open(written[0]))
    assert pixels.shape == (256, 256, 3) and pixels.std() > 1


def test_masked_bce_with_pos_weight():
    module = CXRClassifier(
        tuning="linear",
        backbone="monai:densenet121",
        pretrained=False,
        num_classes=2,
        backbone_kwargs=yaml.safe_load(TINY_DENSENET),
        pos_weight=[3.0, 1.0],
    )
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.3]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = (
        3 * torch.nn.functional.softplus(-logits[0, 0])
        + torch.nn.functional.softplus(logits[1, 0])
        + torch.nn.functional.softplus(-logits[1, 1])
    ) / 3
    assert module.bce(logits, labels, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["model.class_layers.out.weight", "model.class_layers.out.bias"]


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("cxr_*.yaml")))
def test_shipped_configs_build_on_tiny_backbones(config):
    model = dict(yaml.safe_load((CONFIGS / config).read_text())["model"])
    tiny = TINY_DENSENET if model["backbone"].startswith("monai:") else TINY_VIT
    kwargs = yaml.safe_load(tiny)
    if "patch_size" in kwargs and model.get("method", {}).get("class_path", "").endswith("VPT"):
        model["method"]["init_args"]["patch_size"] = 8
    side = 32 if model["backbone"].startswith("monai:") else 16
    model.update(pretrained=False, backbone_kwargs=kwargs, num_classes=3, image_size=side)
    module = CXRClassifier(**model)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    assert 0 < trainable <= total
    if model.get("tuning") == "full":
        assert trainable == total
    elif model.get("method"):
        assert trainable < total
    out = module(torch.randn(2, 3, side, side))
    assert out.shape == (2, 3)


def test_cli_test_of_a_saved_adapter(vit_run, tmp_path):
    from medical.train import main

    cli, results = vit_run
    root = cli.datamodule.hparams.root
    args = [
        "test",
        "--config",
        str(CONFIGS / "cxr_demo.yaml"),
        "--data.root",
        root,
        "--data.image_size",
        "16",
        "--model.backbone_kwargs",
        TINY_VIT,
        "--model.bootstrap_samples",
        "40",
        "--model.init_adapter",
        str(Path(cli.trainer.log_dir) / "adapter"),
        "--trainer.default_root_dir",
        str(tmp_path),
        *QUIET,
    ]
    again = main(args)
    report = again.model.test_report
    assert report["mean"] == pytest.approx(results[0]["test_auroc"], abs=1e-6)
    assert (Path(again.trainer.log_dir) / "auroc.csv").is_file()


def test_open_clip_tower_as_multilabel_classifier():
    tiny_clip = {
        "embed_dim": 16,
        "vision_cfg": {
            "layers": 2,
            "width": 32,
            "patch_size": 8,
            "head_width": 8,
            "image_size": 32,
        },
        "text_cfg": {"layers": 1, "width": 16, "heads": 2, "context_length": 4, "vocab_size": 32},
    }
    method = {"class_path": "core.methods.lora.LoRA", "init_args": {"r": 2, "targets": ["qkv"]}}
    module = CXRClassifier(
        method,
        backbone="open_clip:ViT-B-16",
        backbone_kwargs=tiny_clip,
        pretrained=False,
        num_classes=5,
        image_size=32,
    )
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(".adapters.default." in n for n in trainable) and "model.head.weight" in trainable
    assert not any(n.endswith("conv1.weight") for n in trainable)
    logits = module(torch.randn(2, 3, 32, 32))
    loss = module.bce(logits, torch.ones(2, 5), torch.ones(2, 5))
    loss.backward()
    assert logits.shape == (2, 5) and module.model.head.weight.grad is not None


def test_u_ignore_labels_get_no_gradient_through_the_loss(densenet_run):
    """CheXpert's -1.0 under U-Ignore is masked: the loss does not depend on those logits."""
    cli, _ = densenet_run
    assert cli.datamodule.hparams.uncertainty == "ignore"
    loader = cli.datamodule.train_dataloader()
    images, labels, mask, _ = next(b for b in loader if (b[2] == 0).any())
    logits = torch.randn(labels.shape, requires_grad=True)
    cli.model.bce(logits, labels, mask).backward()
    ignored = mask == 0
    assert ignored.any() and torch.all(logits.grad[ignored] == 0)
    assert torch.all(logits.grad[~ignored] != 0)
    kept = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[~ignored].detach(), labels[~ignored]
    )
    assert cli.model.bce(logits.detach(), labels, mask).item() == pytest.approx(kept.item())
