"""core.lightning.PeftModule: what trains, what a checkpoint holds, what loads back."""

from __future__ import annotations

import math
from collections import OrderedDict

import lightning
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import core
from conftest import make_vit
from core.checkpoint import adapter_state
from core.lightning import MethodArg, PeftModule, lr_factor, method_from_spec

IN, HIDDEN, CLASSES = 16, 32, 4


def make_mlp() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(IN, HIDDEN),
            bn=nn.BatchNorm1d(HIDDEN),  # frozen running statistics must not move
            act1=nn.ReLU(),
            drop=nn.Dropout(0.1),
            fc2=nn.Linear(HIDDEN, HIDDEN),
            act2=nn.ReLU(),
            head=nn.Linear(HIDDEN, CLASSES),
        )
    )


class MLPClassifier(PeftModule):
    """The few lines a domain writes."""

    def __init__(self, method: MethodArg, hidden: int = HIDDEN, **kwargs):
        super().__init__(method, **kwargs)

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)  # stands in for loading pretrained weights
        assert self.hparams.hidden == HIDDEN  # subclass args reach build_model
        return make_mlp()

    def compute_loss(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


class LazyMLPClassifier(MLPClassifier):
    build_in_configure_model = True


class ViTClassifier(PeftModule):
    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return make_vit(num_classes=CLASSES)

    def compute_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y), {}


def lora(**overrides) -> core.LoRA:
    opts = dict(r=4, alpha=8, targets=["fc1", "fc2"], modules_to_save=["head"])
    return core.LoRA(**{**opts, **overrides})


def mlp_data(n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, IN, generator=gen)
    y = (x @ torch.randn(IN, CLASSES, generator=gen)).argmax(-1)  # learnable labels
    return TensorDataset(x, y)


def trainer(tmp_path, max_steps: int = 30, **kw) -> lightning.Trainer:
    opts = dict(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    opts.update(kw)
    return lightning.Trainer(**opts)


def loader(ds: TensorDataset, shuffle: bool = True) -> DataLoader:
    return DataLoader(
        ds, batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(2)
    )


def mean_loss(module: PeftModule, ds: TensorDataset) -> float:
    module.eval()
    with torch.no_grad():
        return F.cross_entropy(module(ds.tensors[0]), ds.tensors[1]).item()


def is_adapter_key(key: str) -> bool:
    return ".adapters.default." in key or key.startswith("head.")


class RecordModes(lightning.Callback):
    """What mode each module trains in."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes = {name: m.training for name, m in pl_module.model.named_modules()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short fit shared by the checks that only read its results."""
    tmp = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    module = MLPClassifier(lora(), lr=3e-2, warmup_steps=3)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    ds = mlp_data()
    loss_before = mean_loss(module, ds)
    modes = RecordModes()
    t = trainer(tmp, logger=CSVLogger(tmp), log_every_n_steps=5, callbacks=[modes])
    t.fit(module, loader(ds))
    ckpt = tmp / "adapter_only.ckpt"
    t.save_checkpoint(ckpt)
    return {
        "module": module,
        "trainer": t,
        "before": before,
        "ds": ds,
        "loss_before": loss_before,
        "ckpt": ckpt,
        "modes": modes.modes,
    }


# --- optimisation --------------------------------------------------------------------------


def test_optimizer_holds_exactly_the_trainable_parameters(trained):
    module, t = trained["module"], trained["trainer"]
    (optimizer,) = t.optimizers
    in_opt = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert {id(p) for p in in_opt} == {id(p) for p in trainable}
    assert len(in_opt) == len(trainable)
    assert sum(p.numel() for p in in_opt) == core.param_report(module.model).trainable
    # 4 * (16 + 32) + 4 * (32 + 32) LoRA factors + the 32x4 head with bias
    assert core.param_report(module.model).trainable == 4 * 48 + 4 * 64 + 32 * 4 + 4
    # Biases (1-D) get no weight decay, matrices do.
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(module.model.head.bias)] == 0.0
    assert decay_of[id(module.model.head.weight)] == pytest.approx(0.01)
    assert decay_of[id(module.model.fc1.adapters["default"].A)] == pytest.approx(0.01)


def test_fit_trains_the_adapter_and_leaves_the_base_bit_identical(trained):
    module, before = trained["module"], trained["before"]
    after = module.model.state_dict()
    assert set(after) == set(before)
    base = [k for k in before if not is_adapter_key(k)]
    adapter = [k for k in before if is_adapter_key(k)]
    assert base and adapter
    for key in base:
        assert torch.equal(after[key], before[key]), f"frozen {key} changed"
    for key in adapter:
        assert not torch.equal(after[key], before[key]), f"adapter {key} did not train"
    loss_after = mean_loss(module, trained["ds"])
    assert loss_after < 0.5 * trained["loss_before"]


def test_training_runs_in_train_mode_but_frozen_batchnorm_stays_in_eval(trained):
    # mean_loss() left the module in eval mode before fit; a pretrained backbone often is.
    modes = trained["modes"]
    assert modes["drop"] and modes["fc1"] and modes["head"] and modes[""]
    assert not modes["bn"]  # its running statistics are not in the adapter checkpoint


def test_training_runs_the_warmup_cosine_schedule_per_step(trained):
    t = trained["trainer"]
    (config,) = t.lr_scheduler_configs
    assert config.interval == "step"
    assert config.scheduler.last_epoch == 30  # stepped once per optimizer step
    lr_now = t.optimizers[0].param_groups[0]["lr"]
    assert lr_now == pytest.approx(
        3e-2 * lr_factor(30, warmup_steps=3, total_steps=30, schedule="cosine")
    )
    assert lr_factor(0, warmup_steps=4, total_steps=100, schedule="cosine") == pytest.approx(0.25)
    assert lr_factor(3, warmup_steps=4, total_steps=100, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(52, warmup_steps=4, total_steps=100, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(100, warmup_steps=4, total_steps=100, schedule="cosine") == pytest.approx(0.0)
    assert lr_factor(90, warmup_steps=4, total_steps=100, schedule="constant") == 1.0


def test_fit_logs_parameter_counts(trained):
    log_dir = trained["trainer"].log_dir
    with open(f"{log_dir}/metrics.csv") as handle:
        header, *rows = handle.read().splitlines()
    assert "params_trainable" in header and "train_loss" in header
    report = core.param_report(trained["module"].model)
    col = header.split(",").index("params_trainable")
    values = [float(r.split(",")[col]) for r in rows if r.split(",")[col]]
    assert values == [report.trainable]


# --- Lightning checkpoints -----------------------------------------------------------------


def test_checkpoint_holds_only_the_adapter_and_plain_hparams(trained):
    module = trained["module"]
    ckpt = torch.load(trained["ckpt"], weights_only=True)  # no pickled objects inside
    state = ckpt["state_dict"]
    expected = {f"model.{k}" for k in module.model.state_dict() if is_adapter_key(k)}
    assert set(state) == expected
    assert not any("base_layer" in k for k in state)
    assert len(state) == len(adapter_state(module.model, "default"))
    assert ckpt["hyper_parameters"]["method"] == {
        "class_path": "core.methods.lora.LoRA",
        "init_args": lora().to_dict(),
    }
    assert ckpt["hyper_parameters"]["hidden"] == HIDDEN


def test_checkpoint_loads_into_a_fresh_module_with_identical_outputs(trained):
    module, ds = trained["module"], trained["ds"]
    x = ds.tensors[0]
    module.eval()
    want = module(x).detach()
    fresh = MLPClassifier(lora()).eval()
    assert not torch.equal(fresh(x), want)
    loaded = MLPClassifier.load_from_checkpoint(trained["ckpt"], weights_only=True).eval()
    assert loaded.method == lora()
    assert loaded.hparams.lr == 3e-2 and loaded.hparams.warmup_steps == 3
    assert torch.equal(loaded(x), want)
    # The lazy variant builds in configure_model, which load_from_checkpoint calls.
    lazy = LazyMLPClassifier.load_from_checkpoint(trained["ckpt"], weights_only=True).eval()
    assert torch.equal(lazy(x), want)


def test_checkpoint_with_unknown_or_missing_keys_raises(trained, tmp_path):
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    ckpt["state_dict"]["model.nonexistent.weight"] = torch.zeros(3)
    bad = tmp_path / "unknown.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(core.CheckpointError, match=r"model\.nonexistent\.weight"):
        MLPClassifier.load_from_checkpoint(bad, weights_only=True)

    ckpt = torch.load(trained["ckpt"], weights_only=True)
    del ckpt["state_dict"]["model.fc2.adapters.default.B"]
    bad = tmp_path / "missing.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(core.CheckpointError, match=r"missing model\.fc2\.adapters\.default\.B"):
        MLPClassifier.load_from_checkpoint(bad, weights_only=True)

    # A module with another rank cannot take the checkpoint.
    with pytest.raises(core.CheckpointError, match=r"checkpoint \[4, 16\] vs model \[2, 16\]"):
        MLPClassifier.load_from_checkpoint(trained["ckpt"], weights_only=True, method=lora(r=2))


def test_fit_resumes_from_an_adapter_only_checkpoint(trained, tmp_path):
    torch.manual_seed(0)
    module = LazyMLPClassifier(lora(), lr=3e-2, warmup_steps=3)
    assert module.model is None  # built by the trainer, in configure_model
    t = trainer(tmp_path, max_steps=32)
    t.fit(module, loader(trained["ds"]), ckpt_path=trained["ckpt"])
    assert t.global_step == 32
    assert mean_loss(module, trained["ds"]) < 0.5 * trained["loss_before"]


# --- exported adapter ----------------------------------------------------------------------


def test_train_end_exports_an_adapter_that_core_load_adapter_reads(trained):
    module, ds = trained["module"], trained["ds"]
    folder = trained["trainer"].log_dir + "/adapter"
    assert str(module.exported_adapter) == folder
    torch.manual_seed(0)
    backbone = make_mlp().eval()
    core.load_adapter(backbone, folder)
    module.eval()
    x = ds.tensors[0]
    assert torch.equal(backbone(x), module(x))


def test_export_adapter_round_trips_a_vit(tmp_path):
    torch.manual_seed(0)
    cfg = core.LoRA(r=4, targets=["qkv"], modules_to_save=["head"])
    module = ViTClassifier(cfg, lr=1e-2, scheduler="constant")
    gen = torch.Generator().manual_seed(3)
    ds = TensorDataset(torch.randn(16, 3, 32, 32, generator=gen), torch.arange(16) % CLASSES)
    t = trainer(tmp_path, max_steps=3)
    t.fit(module, loader(ds))
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()  # default_root_dir
    out = module.export_adapter(tmp_path / "exported")
    torch.manual_seed(0)  # the same "pretrained" base build_model makes
    backbone = make_vit(num_classes=CLASSES)
    module.eval()
    x = ds.tensors[0][:4]
    assert not torch.equal(backbone(x), module(x))
    core.load_adapter(backbone, out)
    assert torch.equal(backbone(x), module(x))


# --- auxiliary losses ----------------------------------------------------------------------


def test_training_step_adds_the_adapters_aux_loss(tmp_path):
    torch.manual_seed(0)
    module = MLPClassifier(lora(), scheduler="constant")
    adapters = [module.model.fc1.adapters["default"], module.model.fc2.adapters["default"]]
    for adapter in adapters:  # a regulariser with a known value
        adapter.aux_loss = lambda a=adapter: 0.5 * a.A.pow(2).sum()
    batch = mlp_data(16).tensors
    module.eval()  # deterministic forward (no dropout) for the direct calls
    task, _ = module.compute_loss(batch)
    aux = 0.5 * sum(a.A.pow(2).sum() for a in adapters)
    assert aux.item() > 0
    total = module.training_step(batch, 0)
    assert torch.allclose(total, task + aux)
    total.backward()  # the regulariser's gradient reaches A
    assert module.model.fc1.adapters["default"].A.grad is not None

    t = trainer(tmp_path, max_steps=1)
    t.fit(module, DataLoader(TensorDataset(*batch), batch_size=16))
    logged = t.callback_metrics
    assert {"train_loss", "train_task_loss", "train_aux_loss", "train_acc"} <= set(logged)
    assert logged["train_aux_loss"] > 0
    assert logged["train_loss"] == pytest.approx(
        (logged["train_task_loss"] + logged["train_aux_loss"]).item(), rel=1e-6
    )


def test_no_aux_loss_is_logged_when_no_adapter_has_one(trained):
    logged = trained["trainer"].callback_metrics
    assert "train_aux_loss" not in logged
    assert logged["train_loss"] == pytest.approx(logged["train_task_loss"].item())


# --- configuration -------------------------------------------------------------------------


def test_method_given_as_class_path_dict_builds_the_same_config():
    spec = {
        "class_path": "core.LoRA",
        "init_args": {"r": 4, "alpha": 8, "targets": ["fc1", "fc2"], "modules_to_save": ["head"]},
    }
    module = MLPClassifier(spec)
    assert module.method == lora()
    assert method_from_spec({"class_path": "lora", "init_args": {"targets": ["x"]}}) == core.LoRA(
        targets=["x"]
    )
    with pytest.raises(core.ConfigError, match="registered method"):
        method_from_spec({"class_path": "os.system", "init_args": {}})
    with pytest.raises(core.ConfigError, match="scheduler"):
        MLPClassifier(lora(), scheduler="linear")


def test_jsonargparse_parses_method_as_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MLPClassifier, "model")
    cfg = parser.parse_object(
        {
            "model": {
                "method": {
                    "class_path": "core.LoRA",
                    "init_args": {
                        "r": 4,
                        "alpha": 8,
                        "targets": ["fc1", "fc2"],
                        "modules_to_save": ["head"],
                    },
                },
                "lr": 0.01,
            }
        }
    )
    module = parser.instantiate(cfg).model
    assert module.method == lora()
    assert module.hparams.lr == 0.01


def test_lightning_cli_config_trains_and_its_checkpoint_reloads(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    method = {
        "class_path": "core.LoRA",
        "init_args": {"r": 4, "alpha": 8, "targets": ["fc1", "fc2"]},
    }
    cli = LightningCLI(
        MLPClassifier,
        run=False,
        save_config_callback=None,
        args={
            "model": {"method": method, "lr": 0.02},
            "trainer": {
                "max_steps": 2,
                "accelerator": "cpu",
                "logger": False,
                "enable_progress_bar": False,
                "enable_checkpointing": False,
                "default_root_dir": str(tmp_path),
            },
        },
    )
    assert cli.model.method == core.LoRA(r=4, alpha=8, targets=["fc1", "fc2"])
    cli.trainer.fit(cli.model, loader(mlp_data()))
    cli.trainer.save_checkpoint(tmp_path / "cli.ckpt")
    hparams = torch.load(tmp_path / "cli.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["method"]["init_args"]["r"] == 4 and hparams["lr"] == 0.02
    loaded = MLPClassifier.load_from_checkpoint(tmp_path / "cli.ckpt", weights_only=True)
    x = mlp_data().tensors[0]
    assert torch.equal(loaded.eval()(x), cli.model.eval()(x))


def test_cosine_without_a_run_length_is_a_clear_error(tmp_path):
    module = MLPClassifier(lora())
    t = trainer(tmp_path, max_steps=-1, max_epochs=-1)
    with pytest.raises(core.ConfigError, match="max_steps"):
        t.fit(module, loader(mlp_data()))


def test_lr_factor_is_finite_everywhere():
    for step in range(0, 60):
        value = lr_factor(step, warmup_steps=5, total_steps=50, schedule="cosine")
        assert math.isfinite(value) and 0.0 <= value <= 1.0


# --- without an adapter: full fine-tuning and linear probes --------------------------------


class ProbeMLP(MLPClassifier):
    """A linear probe: build_model leaves only the head trainable."""

    def build_model(self) -> nn.Module:
        model = super().build_model()
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        return model


@pytest.mark.parametrize("probe", [False, True])
def test_without_a_method_what_build_model_leaves_trainable_trains_and_exports(tmp_path, probe):
    cls = ProbeMLP if probe else MLPClassifier
    torch.manual_seed(0)
    module = cls(None, lr=1e-2)
    assert module.method is None and module.hparams.method is None
    assert core.adapter_names(module.model) == []
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    modes = RecordModes()
    t = trainer(tmp_path, max_steps=4, callbacks=[modes])
    t.fit(module, loader(mlp_data()))
    after = module.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    if probe:
        assert changed == {"head.weight", "head.bias"}
        assert not modes.modes["bn"]  # frozen statistics stay frozen
    else:  # everything trains, BatchNorm statistics included
        assert {"fc1.weight", "bn.running_mean", "head.bias"} <= changed
        assert modes.modes["bn"]
    t.save_checkpoint(tmp_path / "run.ckpt")
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"]
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    bn_stats = {"model.bn.running_mean", "model.bn.running_var", "model.bn.num_batches_tracked"}
    assert set(state) == (trainable if probe else trainable | bn_stats)

    exported = tmp_path / "trained" / "trained.safetensors"
    assert module.exported_adapter == tmp_path / "trained" and exported.is_file()
    x = mlp_data().tensors[0]
    fresh = cls(None, init_adapter=exported).eval()
    assert torch.equal(fresh(x), module.eval()(x))
    assert fresh.hparams.init_adapter == str(exported)  # plain str, safe in checkpoints
    loaded = cls.load_from_checkpoint(tmp_path / "run.ckpt", weights_only=True).eval()
    assert torch.equal(loaded(x), module(x))


def test_load_trained_refuses_tensors_the_model_lacks(tmp_path):
    import safetensors.torch

    safetensors.torch.save_file({"fc9.weight": torch.zeros(2)}, tmp_path / "trained.safetensors")
    module = MLPClassifier(None)
    with pytest.raises(core.CheckpointError, match=r"unexpected fc9\.weight"):
        module.load_exported(tmp_path)
    with pytest.raises(core.CheckpointError, match="does not exist"):
        module.load_exported(tmp_path / "missing.safetensors")


def test_init_adapter_loads_an_exported_adapter_of_the_same_config(tmp_path):
    torch.manual_seed(0)
    module = MLPClassifier(lora(), lr=3e-2)
    trainer(tmp_path, max_steps=3).fit(module, loader(mlp_data()))
    folder = module.export_adapter(tmp_path / "exported")
    x = mlp_data().tensors[0]
    again = MLPClassifier(lora(), init_adapter=folder).eval()
    assert torch.equal(again(x), module.eval()(x))
    assert all(p.requires_grad for p in again.model.fc1.adapters["default"].parameters())
    with pytest.raises(core.CheckpointError, match=r"alpha: saved 8\.0 vs 4\.0"):
        MLPClassifier(lora(alpha=4), init_adapter=folder)


def test_class_paths_of_omnipeft_method_modules_resolve_and_nothing_else_imports():
    vpt = method_from_spec(
        {"class_path": "core.methods.prompts.VPT", "init_args": {"targets": ["blocks"]}}
    )
    assert type(vpt).__module__ == "core.methods.prompts" and vpt.targets == ("blocks",)
    for path in ("core.methods.missing.LoRA", "core.methods.lora.os", "json.JSONDecoder"):
        with pytest.raises(core.ConfigError, match="names no registered method"):
            method_from_spec({"class_path": path, "init_args": {}})
