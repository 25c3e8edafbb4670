"""core.domain / core.backbones: the plumbing the domains share, free of any domain."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from core.domain import (
    METRICS_FILE,
    TUNINGS,
    EpochShuffle,
    ExactAccuracy,
    MetricsFile,
    check_tuning,
    read_metrics,
)
from core.errors import ConfigError

DOMAINS = ("vision", "diffusion", "audio", "medical", "nlp")


def test_core_imports_no_domain_and_no_timm():
    code = (
        "import sys, core, core.domain, core.backbones, core.lightning\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {DOMAINS!r} + ('timm', 'open_clip')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exact_accuracy_counts_each_index_once():
    metric = ExactAccuracy()
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    metric.update(logits, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 0]))  # index 0 twice
    assert metric.compute().item() == pytest.approx(0.5)
    assert metric.count() == 2


def test_epoch_shuffle_is_a_function_of_seed_and_epoch():
    data = list(range(10))
    a, b = EpochShuffle(data, seed=3), EpochShuffle(data, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)


def test_check_tuning():
    check_tuning("full", None, True)
    assert TUNINGS == ("peft", "full", "linear")
    with pytest.raises(ConfigError, match="needs a method"):
        check_tuning("peft", None, True)
    with pytest.raises(ConfigError, match="tuning must be one of"):
        check_tuning("lora", None, True)


def test_metrics_file_takes_a_describe_callable(tmp_path):
    trainer = SimpleNamespace(
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
        is_global_zero=True,
        callback_metrics={"test_acc": torch.tensor(0.75)},
        datamodule=None,
    )
    MetricsFile(describe=lambda t, m: {"task": "toy"}).on_test_end(trainer, object())
    record = read_metrics(tmp_path)
    assert record == {"task": "toy", "test_acc": 0.75}
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == record
