"""core.controllers: the one mechanism that lets AdaLoRA, IncreLoRA, dynamic-rank DoRA,
TriAdaptLoRA and DiffoRA act between optimizer steps; budgets, schedules, resume, and the
Lightning base calling it."""

import math

import lightning
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import core
from conftest import adapters_of
from core.controllers import ControllerSet, controllers_for
from core.errors import ConfigError
from core.lightning import PeftModule
from core.methods.adaptive_rank import (
    AdaLoRA,
    DiffoRA,
    DynamicDoRA,
    IncreLoRA,
    TriAdaptLoRA,
    cubic_budget,
)

TARGETS = ["0", "2", "4"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )


def data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(32, 16, generator=gen), torch.randn(32, 4, generator=gen)


def run(model, steps, *, total=None, lr=1e-2, inspect=None, controllers=None, first=1, opt="adamw"):
    """Train with the plain-loop protocol; ``inspect(step, controllers)`` after each step."""
    x, y = data()
    if controllers is None:
        controllers = controllers_for(model, total_steps=total or steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr) if opt == "adamw" else torch.optim.SGD(params, lr)
    model.train()
    for step in range(first, first + steps):
        loss = F.mse_loss(model(x), y)
        extra = core.aux_loss(model)
        (loss if extra is None else loss + extra).backward()
        controllers.after_backward(model, step)
        optimizer.step()
        controllers.after_step(model, step)
        optimizer.zero_grad()
        if inspect is not None:
            inspect(step, controllers)
    return controllers


# --- the mechanism ------------------------------------------------------------------------


def test_one_controller_per_adapter_name_and_none_for_methods_without_one():
    model = mlp()
    core.inject(model, core.LoRA(r=2, targets=["0"]), name="plain")
    core.inject(model, AdaLoRA(init_r=4, target_r=2, total_step=10, targets=TARGETS), name="ada")
    core.inject(model, DiffoRA(r=2, search_steps=3, targets=["2"]), name="diff")
    controllers = controllers_for(model)
    assert sorted(controllers.controllers) == ["ada", "diff"]
    assert set(controllers.controllers["ada"].adapters(model)) == set(TARGETS)


def test_a_schedule_without_the_runs_length_is_a_clear_error():
    model = mlp()
    core.inject(model, AdaLoRA(init_r=4, target_r=2, targets=TARGETS))
    with pytest.raises(ConfigError, match="total_step"):
        controllers_for(model)
    assert len(controllers_for(model, total_steps=20)) == 1
    model = mlp()
    core.inject(model, DynamicDoRA(r=2, targets=TARGETS))
    with pytest.raises(ConfigError, match="estimated_stepping_batches"):
        controllers_for(model, total_steps=None)


def test_after_step_defaults_to_the_step_after_backward_saw():
    model = mlp()
    core.inject(model, DiffoRA(r=2, search_steps=2, targets=TARGETS))
    controllers = controllers_for(model)
    controllers.after_step(model)  # nothing pending: nothing happens
    controllers.after_backward(model, 2)
    controllers.after_step(model)
    assert all(bool(a.fixed) for a in adapters_of(model).values())


# --- AdaLoRA: the budget at every step, the cubic schedule -------------------------------


def test_adalora_respects_the_cubic_budget_at_every_step():
    model = mlp()
    cfg = AdaLoRA(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=16, targets=TARGETS)
    core.inject(model, cfg)
    adapters = adapters_of(model)
    budgets = []

    def check(step, controllers):
        end = 16 - 3
        want = 18 if step <= 2 else 6 if step >= end else int(cubic_budget(
            step, start=2, end=end, initial=18, final=6
        ))  # fmt: skip
        kept = sum(int(a.rank_mask.sum()) for a in adapters.values())
        live = sum(int((a.E != 0).sum()) for a in adapters.values())
        assert live <= kept <= want, step  # the forward never uses more than the budget
        assert kept == want or step <= 2, step  # scores are continuous: no ties
        budgets.append(kept)

    run(model, 16, inspect=check)
    assert budgets[:2] == [18, 18] and budgets[-4:] == [6, 6, 6, 6]
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))
    assert len(set(budgets)) > 4  # it really went down step by step


def test_adalora_resumes_from_its_state_exactly(tmp_path):
    """Half a run, save adapter + controller state, rebuild, finish: same as one run."""
    cfg = AdaLoRA(init_r=6, target_r=2, tinit=1, tfinal=2, total_step=12, targets=TARGETS)
    straight = mlp()
    core.inject(straight, cfg)
    run(straight, 12, opt="sgd")

    first = mlp()
    core.inject(first, cfg)
    controllers = run(first, 6, total=12, opt="sgd")
    core.save_adapter(first, tmp_path)
    state = controllers.state_dict()
    second = mlp()
    core.load_adapter(second, tmp_path, trainable=True)
    resumed = ControllerSet()
    resumed.load_state_dict(state)  # before attach, as Lightning restores before the fit
    resumed.attach(second, total_steps=12)
    run(second, 6, controllers=resumed, first=7, opt="sgd")
    for path, adapter in adapters_of(straight).items():
        again = adapters_of(second)[path]
        assert torch.equal(again.rank_mask, adapter.rank_mask)
        torch.testing.assert_close(again.E, adapter.E)


# --- dynamic-rank DoRA --------------------------------------------------------------------


def test_dynamic_dora_prunes_on_its_schedule_and_stops_the_modulator_after():
    model = mlp()
    cfg = DynamicDoRA(
        r=2, prune_start=0.1, prune_end=0.6, prune_interval=3, total_step=20, targets=TARGETS
    )
    core.inject(model, cfg)
    adapters = adapters_of(model)
    n = 3 * 3  # three modules, r' = 3 components each
    start, length = int(20 * 0.1), int(20 * 0.5)
    seen = {}

    def check(step, controllers):
        t = step - start
        kept = sum(int(a.keep.sum()) for a in adapters.values())
        for a in adapters.values():
            assert not a.c[~a.keep].any()  # pruned components are off at every step
        if 0 <= t <= length and (t % 3 == 0 or t == length):
            want = n - int(n * (1 / 3) * (t / length) ** 3)
            assert kept == want, step
            seen[step] = kept
        assert (core.aux_loss(model) is None) == (t > length), step

    run(model, 20, inspect=check)
    assert seen[start + length] == 3 * 2  # r per module on average
    assert len(set(seen.values())) >= 3


# --- IncreLoRA ------------------------------------------------------------------------------


def test_increlora_grows_the_most_important_modules_under_the_budget():
    model = mlp()
    cfg = IncreLoRA(
        init_r=1, target_r=3, add_rank=2, top_h=1, init_warmup=2, incre_interval=2,
        restart_warmup=0, targets=TARGETS,
    )  # fmt: skip
    core.inject(model, cfg)
    adapters = adapters_of(model)
    controllers = controllers_for(model)
    controller = controllers.controllers["default"]
    history = []

    def before(step):  # the module the controller should pick at this step, if any
        due = step > 2 and step % 2 == 0 and controller.total_rank(adapters) < 9
        if not due:
            return None
        scores = {p: controller.score(p).item() for p in adapters if adapters[p].active_rank() < 12}
        return max(scores, key=scores.get)

    x, y = data()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 17):
        ranks = {p: a.active_rank() for p, a in adapters.items()}
        F.mse_loss(model(x), y).backward()
        controllers.after_backward(model, step)
        optimizer.step()
        pick = before(step)
        controllers.after_step(model, step)
        optimizer.zero_grad()
        grown = {p: a.active_rank() - ranks[p] for p, a in adapters.items()}
        total = controller.total_rank(adapters)
        assert total <= 9  # budget: target_r * 3 modules
        if pick is None:
            assert not any(grown.values()), step
        else:
            assert grown == {
                p: (min(2, 9 - sum(ranks.values())) if p == pick else 0) for p in adapters
            }
        history.append(total)
    assert history[-1] == 9 and history[0] == 3
    assert all(int(a.reserve) == 0 and not a.track_importance for a in adapters.values())


def test_increlora_reserves_learn_in_advance_and_new_components_warm_up():
    model = mlp()
    cfg = IncreLoRA(init_r=1, target_r=3, add_rank=1, init_warmup=100, restart_warmup=4,
                    targets=TARGETS)  # fmt: skip
    core.inject(model, cfg)
    adapter = adapters_of(model)["2"]
    controllers = run(model, 1)
    assert int(adapter.reserve) == 1 and adapter.live() == 2
    before = adapter.A[1].clone()
    run(model, 3, controllers=controllers, first=2)
    assert not torch.equal(adapter.A[1], before)  # the reserve's A trained in advance
    assert adapter.E[1] == 0 and int(adapter.rank) == 1  # its singular value stayed fixed
    controller = controllers.controllers["default"]
    start, lo, hi = 10, 0, 1
    controller.warming = {"2": (start, lo, hi)}
    old = adapter.A[0].clone()
    controller.snapshot_warming(adapters_of(model))
    with torch.no_grad():
        adapter.A[0] += 1.0  # what the optimizer did this step
        controller.finish_warmup(adapters_of(model), start + 1)
    torch.testing.assert_close(adapter.A[0], old + 0.25)  # 1/4 of the step at warmup step 1


def test_increlora_tracks_importance_only_in_the_steps_that_reach_an_allocation():
    model = mlp()
    core.inject(model, IncreLoRA(init_warmup=100, incre_interval=200, targets=TARGETS))
    controller = controllers_for(model).controllers["default"]
    assert controller.history() == math.ceil(math.log(1e-12) / math.log(0.85)) == 171
    allocations = [a for a in range(1, 1500) if a > 100 and a % 200 == 0]
    for step in range(1, 1001):
        reaches = any(0 <= a - step < 171 for a in allocations)
        assert controller.tracks(step) == reaches, step
    assert not any(a.track_importance for a in adapters_of(model).values())  # step 1: no
    model = mlp()
    core.inject(model, IncreLoRA(init_warmup=0, incre_interval=100, targets=TARGETS))
    controller = controllers_for(model).controllers["default"]
    assert all(a.track_importance for a in adapters_of(model).values())
    assert all(controller.tracks(step) for step in range(1, 400))  # history >= interval


def increlora_run(steps, tracked):
    """A float64 IncreLoRA run (history 40 steps, allocations at 50, 100); ``tracked``
    records, per step, whether its forward recorded importance."""
    model = mlp().double()
    cfg = IncreLoRA(
        init_r=1, target_r=3, add_rank=1, top_h=1, init_warmup=0, incre_interval=50,
        beta1=0.5, beta2=0.5, restart_warmup=0, targets=TARGETS,
    )  # fmt: skip
    core.inject(model, cfg)
    adapters = adapters_of(model)
    controllers = controllers_for(model)
    x, y = (t.double() for t in data())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, steps + 1):
        tracked.append(adapters["2"].track_importance)
        F.mse_loss(model(x), y).backward()
        controllers.after_backward(model, step)
        optimizer.step()
        controllers.after_step(model, step)
        optimizer.zero_grad()
    return model, controllers.controllers["default"]


def test_increlora_scores_from_the_window_equal_scores_from_every_step(monkeypatch):
    windowed: list[bool] = []
    model, controller = increlora_run(100, windowed)
    assert controller.history() == 40
    assert [i for i, on in enumerate(windowed, start=1) if on] == [
        *range(11, 51),
        *range(61, 101),
    ]
    monkeypatch.setattr(type(controller), "tracks", lambda self, step: True)
    always: list[bool] = []
    reference, every = increlora_run(100, always)
    assert all(always)
    ranks = {p: a.active_rank() for p, a in adapters_of(model).items()}
    assert ranks == {p: a.active_rank() for p, a in adapters_of(reference).items()}
    assert sum(ranks.values()) == 5  # two allocations of one component each
    for path in ranks:
        torch.testing.assert_close(controller.score(path), every.score(path), rtol=1e-9, atol=0)


def test_increlora_resumes_tracking_at_the_step_after_its_state():
    model, controller = increlora_run(30, [])  # step 31 lies within 40 steps of step 50
    adapters = adapters_of(model)
    assert all(a.track_importance for a in adapters.values())
    fresh = controllers_for(model).controllers["default"]  # assumes step 1: outside
    assert not any(a.track_importance for a in adapters.values())
    fresh.load_state_dict(controller.state_dict())
    assert fresh.step == 30 and all(a.track_importance for a in adapters.values())


# --- TriAdaptLoRA ---------------------------------------------------------------------------


def test_triadaptlora_grows_by_its_threshold_schedule_within_the_budget():
    model = mlp()
    cfg = TriAdaptLoRA(r=4, init_r=1, add_rank=1, max_rank=9, incre_interval=2, total_step=20,
                       targets=TARGETS)  # fmt: skip
    core.inject(model, cfg)
    adapters = adapters_of(model)
    controller = controllers_for(model, total_steps=20)
    totals = []

    def check(step, controllers):
        total = sum(a.active_rank() for a in adapters.values())
        assert total <= 12
        totals.append(total)

    x, y = data()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 21):
        F.mse_loss(model(x), y).backward()
        controller.after_backward(model, step)
        optimizer.step()
        before = sum(a.active_rank() for a in adapters.values())
        controller.after_step(model, step)
        optimizer.zero_grad()
        after = sum(a.active_rank() for a in adapters.values())
        if step % 2:
            assert after == before
        elif before < 12:
            chosen = min(max(int((12 - before) * step / 20), 1), 3)  # m = int(R p), >= 1
            grew = after - before
            assert min(chosen, 12 - before) <= grew <= min(3, 12 - before), step  # ties: more
        check(step, controller)
    assert totals[-1] == 12 and totals == sorted(totals)


# --- DiffoRA --------------------------------------------------------------------------------


def test_diffora_selects_at_the_end_of_the_search_and_drops_the_rest():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(2)])
    cfg = DiffoRA(r=2, keep_ratio=0.5, search_ratio=0.25, targets=["0", "1"], exclude=r"^\d$")
    core.inject(model, cfg)
    adapters = adapters_of(model)
    assert sorted(adapters) == ["0.0", "0.1", "1.0", "1.1"]
    controllers = controllers_for(model, total_steps=12)
    x = torch.randn(4, 8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(1, 7):
        model(x).square().mean().backward()
        controllers.after_backward(model, step)
        opt.step()
        controllers.after_step(model, step)
        opt.zero_grad()
        fixed = [bool(a.fixed) for a in adapters.values()]
        assert all(fixed) == (step >= 3) and (any(fixed) == (step >= 3))
    for layer in ("0", "1"):  # one of the two modules per layer keeps its LoRA
        kept = [p for p, a in adapters.items() if p.startswith(layer) and bool(a.selected)]
        assert len(kept) == 1
    model(x).square().mean().backward()
    for adapter in adapters.values():
        assert (adapter.B.grad is not None) == bool(adapter.selected)
        assert adapter.gate.grad is None


# --- the Lightning base calls the controllers -------------------------------------------------


class Regression(PeftModule):
    def build_model(self) -> nn.Module:
        return mlp()

    def compute_loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)


def test_peft_module_drives_the_controller_and_checkpoints_its_state(tmp_path):
    steps = 12
    cfg = AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=2, targets=TARGETS)  # total from trainer
    module = Regression(cfg, lr=1e-2, scheduler="constant")
    seen = []
    trainer = lightning.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")],
    )
    original = AdaLoRA.controller

    def spy(self, model, name, total_steps):
        controller = original(self, model, name, total_steps)
        assert total_steps == steps
        after = controller.after_step
        controller.after_step = lambda m, step: (seen.append(step), after(m, step))
        return controller

    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    AdaLoRA.controller = spy
    try:
        trainer.fit(module, loader)
    finally:
        AdaLoRA.controller = original
    assert seen == list(range(1, steps + 1))
    adapters = adapters_of(module.model)
    assert sum(int(a.rank_mask.sum()) for a in adapters.values()) == 2 * 3
    ckpt = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=True)
    assert ckpt["omnipeft_controllers"]["default"]["budget"] == 2 * 3
    reloaded = Regression(cfg, init_adapter=module.exported_adapter)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), module(x))
    for path, adapter in adapters_of(reloaded.model).items():
        assert torch.equal(adapter.rank_mask, adapters[path].rank_mask)
    assert math.isfinite(float(F.mse_loss(reloaded(x), y)))
