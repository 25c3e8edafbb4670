"""PeftModule wiring for methods that need more than a loss: GPS/SPT choose their entries
from training batches before the optimizer exists; mixtures log their expert load."""

from __future__ import annotations

import csv

import lightning
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import core
from core.lightning import MethodArg, PeftModule


class TinyClassifier(PeftModule):
    def __init__(self, method: MethodArg, **kwargs):
        super().__init__(method, **kwargs)

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def compute_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y), {}


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), 16)


def fit(module: PeftModule, tmp_path, steps: int = 3) -> lightning.Trainer:
    trainer = lightning.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, train_dataloaders=loader())
    return trainer


def test_gps_selects_its_entries_from_training_batches_and_trains_only_those(tmp_path):
    module = TinyClassifier(core.GPS(k=2, targets=["0", "2"]), scheduler="constant")
    base = {k: v.clone() for k, v in module.model.state_dict().items() if "base_layer" in k}
    fit(module, tmp_path)
    adapter = module.model[0].adapters["default"]
    assert adapter.is_selected() and adapter.num_selected() == 16 * 2
    weight = adapter.updated(module.model[0].base_layer)["weight"]
    changed = (weight != base["0.base_layer.weight"]).flatten().nonzero().flatten()
    assert set(changed.tolist()) <= set(adapter.indices("weight").tolist())
    assert len(changed) > 0


def test_mixture_expert_load_reaches_the_logs(tmp_path):
    module = TinyClassifier(core.MoLoRA(num_experts=3, targets=["0"]), scheduler="constant")
    trainer = fit(module, tmp_path)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        header = next(csv.reader(handle))
    loads = [h for h in header if h.startswith("expert_load/default/0/")]
    assert sorted(loads) == [f"expert_load/default/0/{i}" for i in range(3)]


def test_diff_pruning_prunes_midway_and_trains_the_kept_entries(tmp_path):
    cfg = core.DiffPruning(density=0.1, prune_at=0.5, targets=["0"])
    module = TinyClassifier(cfg, scheduler="constant", lr=1e-2)
    fit(module, tmp_path, steps=6)
    adapter = module.model[0].adapters["default"]
    entries = module.model[0].base_layer.weight.numel() + module.model[0].base_layer.bias.numel()
    assert module.method.kept and adapter.num_selected() == round(0.1 * entries)
    assert module.hparams["method"]["init_args"]["kept"] == module.method.kept
    # the optimizer now holds the pruned adapter's parameters, which carry the kept values
    optimised = {
        id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]
    }
    assert all(id(p) in optimised for p in adapter.parameters())
    assert any(v.abs().sum() > 0 for v in adapter.values.values())
