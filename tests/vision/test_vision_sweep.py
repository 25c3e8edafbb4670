"""`python -m vision.sweep`: methods x tasks -> the VTAB-1k table (CSV) and its plot (PNG)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from PIL import Image
from vtab_toy import IMAGE_SIZE, TINY_VIT, make_task

from vision.metrics import read_metrics
from vision.sweep import finished_metrics, main, run_dir

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"train800": 8, "val200": 4, "train800val200": 12, "test": 8}


def write_config(path, model: dict) -> None:
    base = {
        "model": {
            "backbone": "vit_base_patch16_224",
            "backbone_kwargs": TINY_VIT,
            "pretrained": False,
            "lr": 0.01,
            **model,
        },
        "data": {"image_size": IMAGE_SIZE, "batch_size": 4, "num_workers": 0},
    }
    path.write_text(yaml.safe_dump(base))


def test_sweep_writes_the_vtab_table_and_plot_and_resumes(tmp_path):
    root = tmp_path / "vtab"
    for task in ("dtd", "eurosat"):  # a Natural and a Specialized task folder
        make_task(root, task, sizes=SMALL)
    lora, linear = tmp_path / "lora_tiny.yaml", tmp_path / "linear_tiny.yaml"
    lora_method = {
        "class_path": "core.methods.lora.LoRA",
        "init_args": {"r": 4, "targets": ["qkv"]},
    }
    write_config(lora, {"method": lora_method})
    write_config(linear, {"tuning": "linear"})
    out = tmp_path / "sweep"
    extra = [
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    args = ["--root", str(root), "--configs", str(lora), str(linear), "--tasks", "dtd,eurosat"]
    assert main([*args, "--out", str(out), *extra]) == 0

    with (out / "vtab.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
        header = list(rows["lora_tiny"])
    assert header == [
        "method",
        "params_M",
        "dtd",
        "eurosat",
        "natural",
        "specialized",
        "structured",
        "mean",
        "mean_of_groups",
    ]
    for method in ("lora_tiny", "linear_tiny"):
        row = rows[method]
        acc = {
            t: 100 * finished_metrics(run_dir(out, tmp_path / f"{method}.yaml", t))["test_acc"]
            for t in ("dtd", "eurosat")
        }
        assert float(row["dtd"]) == pytest.approx(acc["dtd"], abs=1e-3)
        assert float(row["natural"]) == pytest.approx(acc["dtd"], abs=1e-3)
        assert float(row["specialized"]) == pytest.approx(acc["eurosat"], abs=1e-3)
        assert row["structured"] == ""
        both = (acc["dtd"] + acc["eurosat"]) / 2
        assert float(row["mean"]) == pytest.approx(both, abs=1e-3)
        assert float(row["mean_of_groups"]) == pytest.approx(both, abs=1e-3)
    # LoRA r=4 on the two qkv Linears (32 -> 96); the linear probe trains only the head.
    assert float(rows["lora_tiny"]["params_M"]) == pytest.approx(2 * 4 * (32 + 96) / 1e6)
    assert float(rows["linear_tiny"]["params_M"]) == 0.0
    # Each run recorded the class count of its VTAB task and the test list it scored.
    record = finished_metrics(run_dir(out, lora, "eurosat"))
    assert record["num_classes"] == 10 and record["lists"]["test"] == "test.txt"

    with Image.open(out / "vtab.png") as image:
        assert image.format == "PNG" and image.size == (720, 480)

    # A second call finds every run finished and trains nothing.
    versions = sorted(str(p) for p in out.glob("*/*/lightning_logs/version_*"))
    assert len(versions) == 4
    assert main([*args, "--out", str(out), *extra]) == 0
    assert sorted(str(p) for p in out.glob("*/*/lightning_logs/version_*")) == versions
    assert (
        json.loads(
            (
                out / "lora_tiny" / "dtd" / "lightning_logs" / "version_0" / "metrics.json"
            ).read_text()
        )["task"]
        == "dtd"
    )
    assert (
        read_metrics(out / "linear_tiny" / "dtd" / "lightning_logs" / "version_0")["method"]
        == "linear"
    )


def test_sweep_refuses_missing_configs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path), "--configs", str(tmp_path / "nope.yaml")])
    assert "config file(s) not found" in capsys.readouterr().err
