"""Every method's training step, against HF PEFT where it has the method and against
omnipeft's own LoRA for all of them, measured in one interleaved run.

The model is timm's ``vit_base_patch16_224`` at its ViT-B/16 width (768 wide, 12 heads,
patch 16, 224 px: 197 tokens, batch 8) with 2 of its 12 blocks (``--quick``: a small ViT).
The blocks are identical, so a method's cost relative to another's is per block and the
depth multiplies both; two blocks keep ~60 contenders within minutes on two cores. Two,
not one: the first adapted block needs no gradient below its qkv (nothing trainable lies
under it), so with one block every step would skip the qkv input-gradient GEMM that the
other 11 blocks of a real ViT-B compute; with two, one block of each kind is measured.

All contenders share one set of base weights (``shared_copy``: injection never copies
them). Each gets its adapter on ``qkv`` where the method can wrap a linear layer (the
others, on the layers their paper places them: bottlenecks on the MLP, LN tuning on the
norms, VPT on the blocks), with the paper's defaults; the trainable tensors are then
moved off their initial values (as after some training: several methods start at an
exact zero update). Methods built for decoders (prompt and prefix tuning, Control
Prefixes, LLaMA-Adapter) run on a LLaMA-shaped model and PERFT on a Mixtral-shaped one,
each against LoRA on that model.

A training step is: zero the gradients, forward, the task loss plus the regularisers the
method's adapters expose (``core.aux_loss``; PEFT's AdaLoRA adds its orthogonality term
to the loss likewise), backward. Optimizer steps and between-step controllers (AdaLoRA's
rank allocation, in both libraries) are left out: they are the same small per-step cost
whatever the batch.

PEFT's copy of a method is built from omnipeft's adapter with ``core.interop.save_peft`` +
``PeftModel.from_pretrained(is_trainable=True)``; outputs, losses and input gradients must
match (``peft_bridge.check_parity``) before anything is timed.

Contenders run interleaved round-robin in groups of six (``time_steps``): omnipeft's LoRA
and five others, each PEFT copy beside its omnipeft twin; ratios are medians of per-round
ratios within a group (``common.paired_ratio``). Peak memory per step is measured after
the timings.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

import core
from core import compose
from core.controllers import controllers_for

from .common import (
    Table,
    Timing,
    clock_name,
    paired_ratio,
    peak_rss_delta_mb,
    saved_for_backward_mb,
    shared_copy,
    time_interleaved,
)
from .models import LlamaShape, Task, VitShape, llama_task, mixtral_task, vit_task
from .peft_bridge import check_parity, peft_config_class, to_peft, trainable_count

LORA_STEP_TARGET = 1.10  # every method's step within 10% of our LoRA's on the same model
PERTURB_STD = 0.05
TOTAL_STEPS = 1000  # the training length schedule-driven methods (AdaLoRA, ...) are told
GROUP_SIZE = 6  # contenders timed in one interleaved loop, LoRA included


@dataclass(frozen=True)
class Sizes:
    vit: VitShape
    llama: LlamaShape
    moe: LlamaShape
    moe_experts: int
    warmup: int
    repeats: int
    infer_repeats: int


FULL = Sizes(
    vit=VitShape(embed=768, depth=2, heads=12, img=224, patch=16, batch=8),
    llama=LlamaShape(
        hidden=768, intermediate=2048, layers=2, heads=12, vocab=1000, seq=128, batch=8
    ),
    moe=LlamaShape(hidden=512, intermediate=1024, layers=2, heads=8, vocab=1000, seq=128, batch=8),
    moe_experts=4,
    warmup=2,
    repeats=5,
    infer_repeats=5,
)

QUICK = Sizes(
    vit=VitShape(embed=256, depth=2, heads=4, img=64, patch=16, batch=8),
    llama=LlamaShape(hidden=256, intermediate=512, layers=2, heads=4, vocab=500, seq=32, batch=4),
    moe=LlamaShape(hidden=128, intermediate=256, layers=2, heads=4, vocab=500, seq=32, batch=4),
    moe_experts=4,
    warmup=1,
    repeats=3,
    infer_repeats=3,
)


# --- what runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One omnipeft contender: a registered method with its targets and options."""

    method: str
    targets: list[str] | str
    options: dict = field(default_factory=dict)
    label: str = ""  # row name; the method name when empty
    peft: bool = False  # also time HF PEFT's copy of it
    prepare: str | None = None  # "select" (GPS, SPT) or "fusion" (AdapterFusion)
    guessed: bool = False  # a default setup for a method registered after this file

    @property
    def name(self) -> str:
        return self.label or self.method


QKV = ["qkv"]
LORA, FOURIERFT = "lora r=8", "fourierft n=1000"
BOFT_M1, BOFT_M2 = "boft m=1 b=8", "boft m=2 b=8"
VIT_SETUPS = [
    Setup("lora", QKV, {"r": 8}, label=LORA, peft=True),
    Setup("dora", QKV, {"r": 8}, label="dora r=8", peft=True),
    Setup("fourierft", QKV, {"n_frequency": 1000}, label=FOURIERFT, peft=True),
    Setup("boft", QKV, {"block_size": 8, "butterfly_factors": 1}, label=BOFT_M1, peft=True),
    Setup("boft", QKV, {"block_size": 8, "butterfly_factors": 2}, label=BOFT_M2),
    Setup("oft", QKV, {"block_size": 32}, label="oft b=32", peft=True),
    Setup("ia3", QKV, peft=True),
    Setup("vera", QKV, {"r": 256}, label="vera r=256", peft=True),
    Setup("loha", QKV, {"r": 8}, label="loha r=8", peft=True),
    Setup("lokr", QKV, {"r": 8}, label="lokr r=8", peft=True),
    Setup("adalora", QKV, {"init_r": 12, "target_r": 8}, label="adalora r=12->8", peft=True),
    Setup("dylora", QKV),
    Setup("melora", QKV),
    Setup("sharelora", QKV),
    Setup("capaboost", QKV),
    Setup("increlora", QKV),
    Setup("dora_dynamic", QKV),
    Setup("triadaptlora", QKV),
    Setup("diffora", QKV),
    Setup("l4q", QKV),
    Setup("qgoft", QKV),
    Setup("svft", QKV),
    Setup("svfit", QKV),
    Setup("soda", QKV),
    Setup("kadaptation", QKV),
    Setup("surm", QKV),
    Setup("ssf", QKV),
    Setup("bitfit", QKV),
    Setup("difffit", QKV),
    Setup("ln_tuning", ["norm1", "norm2"]),
    Setup("diff_pruning", QKV),
    Setup("gps", QKV, prepare="select"),
    Setup("spt", QKV, prepare="select"),
    Setup("molora", QKV),
    Setup("mov", QKV),
    Setup("mpoe", QKV),
    Setup("bottleneck", ["mlp"]),
    Setup("compacter", ["mlp"]),
    Setup("pesc", ["mlp"]),
    Setup("adapter_bias", ["fc2"]),
    Setup("vpt", ["blocks"], {"deep": True}),
    Setup("styleinject", QKV),
    Setup("adapter_fusion", ["mlp"], label="adapter_fusion (2 bottlenecks)", prepare="fusion"),
]
DECODER_SETUPS = [
    Setup("lora", ["q_proj", "v_proj"], {"r": 8}, label=LORA),
    Setup("prompt_tuning", ["model"]),
    Setup("prefix_tuning", ["model"]),
    Setup("control_prefix", ["model"]),
    Setup("llama_adapter", r"model\.layers\.\d+"),
]
MOE_SETUPS = [
    Setup("lora", ["q_proj", "v_proj"], {"r": 8}, label=LORA),
    Setup("perft", ["mlp"]),
]


@dataclass
class Contender:
    """A model to time and the training loss it differentiates."""

    label: str
    model: nn.Module
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, main input) -> scalar
    targets: str = ""
    trainable: int = 0
    extra: dict = field(default_factory=dict)

    def step(self, task: Task) -> Callable[[], None]:
        def run() -> None:
            self.model.zero_grad(set_to_none=True)
            self.loss(self.model, task.inputs).backward()

        return run

    def infer(self, task: Task) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return task.outputs(self.model)

        return run


def our_loss(task: Task, call_kwargs: dict) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Task loss + the adapters' regularisers, as ``core.lightning`` trains."""

    def loss(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        value = task.loss(model, inputs, **call_kwargs)
        extra = core.aux_loss(model)
        return value if extra is None else value + extra

    return loss


def peft_loss(task: Task, model: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Task loss, plus AdaLoRA's orthogonality term where PEFT would add it to ``.loss``."""
    config = model.peft_config[model.active_adapter]
    weight = getattr(config, "orth_reg_weight", None) if config.peft_type == "ADALORA" else None

    def loss(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        value = task.loss(model, inputs)
        return value if weight is None else value + weight * peft_adalora_orthogonality(model)

    return loss


def peft_adalora_orthogonality(model: nn.Module) -> torch.Tensor:
    """PEFT AdaLoRA's regulariser: the mean over its P and Q factors of ||F F^T - I||_F
    (F^T F for P), computed as its ``AdaLoraModel.forward`` does for models with a loss."""
    terms = []
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            cov = param @ param.T if "lora_A" in name else param.T @ param
            eye = torch.eye(cov.shape[0], dtype=cov.dtype)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    return torch.stack(terms).mean()


# --- building the contenders ----------------------------------------------------------------


def perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor off its initial value, as some training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(PERTURB_STD * torch.randn(param.shape, generator=gen))


def call_kwargs_for(setup: Setup, task: Task) -> dict:
    if setup.method == "control_prefix":
        gen = torch.Generator().manual_seed(3)
        return {"control_ids": torch.randint(0, 2, (task.batch,), generator=gen)}
    return {}


def build_ours(setup: Setup, task: Task, seed: int) -> Contender:
    model = shared_copy(task.base)
    call_kwargs = call_kwargs_for(setup, task)
    if setup.prepare == "fusion":
        # AdapterFusion (Pfeiffer et al., 2021) attends over task adapters placed after
        # the FFN; two bottleneck adapters there, the fusion layer trains.
        for name in ("a", "b"):
            core.inject(model, core.METHODS["bottleneck"](targets=setup.targets), name=name)
        perturb(model, seed)
        fuse = compose.Fuse("a", "b")
        compose.add_fusion(model, fuse)
        compose.activate(model, fuse)
    else:
        core.inject(model, core.METHODS[setup.method](targets=setup.targets, **setup.options))
        if setup.prepare == "select":
            core.select(model, [task.inputs], loss_fn=lambda m, _: task.loss(m, **call_kwargs))
        perturb(model, seed)
    controllers_for(model, total_steps=TOTAL_STEPS)  # sets schedule-driven regulariser scales
    targets = setup.targets if isinstance(setup.targets, str) else ",".join(setup.targets)
    return Contender(
        setup.name,
        model,
        our_loss(task, call_kwargs),
        targets=targets,
        trainable=trainable_count(model),
    )


def build_peft(ours: Contender, task: Task) -> Contender:
    theirs = to_peft(ours.model, shared_copy(task.base))
    return Contender(
        ours.label,
        theirs,
        peft_loss(task, theirs),
        targets=ours.targets,
        trainable=trainable_count(theirs),
        extra={"peft_config": peft_config_class(theirs)},
    )


def base_fingerprint(model: nn.Module) -> list[float]:
    return [t.double().sum().item() for t in [*model.parameters(), *model.buffers()]]


def check_base_untouched(task: Task, before: list[float]) -> None:
    """Contenders share the base weights: none may have changed or unfrozen them."""
    if base_fingerprint(task.base) != before:
        raise RuntimeError(f"{task.name}: a contender changed the shared base weights")
    unfrozen = [n for n, p in task.base.named_parameters() if p.requires_grad]
    if unfrozen:
        raise RuntimeError(f"{task.name}: a contender unfroze shared base weights {unfrozen[:3]}")


# --- measuring ------------------------------------------------------------------------------


def memory_of(contender: Contender, task: Task) -> dict[str, float | None]:
    """Peak RSS delta and saved-for-backward MB of one training step (one call measures
    both: the saved-tensor hooks only record, they keep nothing alive)."""
    step = contender.step(task)
    saved: dict[str, float] = {}

    def measured() -> None:
        saved["mb"] = saved_for_backward_mb(step, contender.model.parameters())

    rss = peak_rss_delta_mb(measured)
    contender.model.zero_grad(set_to_none=True)
    return {"peak_rss_delta_mb": rss, "saved_for_backward_mb": saved["mb"]}


def timing_groups(keys: list[str], size: int) -> list[list[str]]:
    """``keys`` (LoRA excluded) in consecutive groups of at most ``size``, never splitting
    a method from its PEFT copy (``peft:<label>``, which follows it)."""
    units: list[list[str]] = []
    for key in keys:
        if key.startswith("peft:") and units and units[-1][0] == key.removeprefix("peft:"):
            units[-1].append(key)
        else:
            units.append([key])
    groups: list[list[str]] = [[]]
    for unit in units:
        if groups[-1] and len(groups[-1]) + len(unit) > size:
            groups.append([])
        groups[-1].extend(unit)
    return groups


def time_steps(contenders: dict[str, Contender], task: Task, s: Sizes) -> dict[str, dict]:
    """Training-step timings in small interleaved groups, each with its own LoRA, then each
    contender's step memory.

    One loop over ~60 contenders would take a minute per round, and a machine whose load
    drifts within that minute would skew ratios between contenders far apart in it; a
    group's round takes a few seconds, and every ratio is taken within a group: a method
    against the LoRA step of its own group, PEFT against its omnipeft twin beside it.
    """
    for contender in contenders.values():
        contender.model.train()
    steps = {key: c.step(task) for key, c in contenders.items()}
    others = [key for key in contenders if key != LORA]
    measured: dict[str, dict] = {}
    for group in timing_groups(others, size=GROUP_SIZE - 1):
        timings = time_interleaved(
            {LORA: steps[LORA], **{k: steps[k] for k in group}},
            warmup=s.warmup,
            repeats=s.repeats,
        )
        measured.setdefault(LORA, {"timing": timings[LORA], "reference": timings[LORA]})
        for key in group:
            measured[key] = {"timing": timings[key], "reference": timings[LORA]}
    for key, contender in contenders.items():
        measured[key]["memory"] = memory_of(contender, task)
    return measured


@dataclass
class TaskRun:
    """What ``run_task`` built and measured on one model."""

    contenders: dict[str, Contender]
    measured: dict[str, dict]
    parity: dict[str, dict]
    skipped: dict[str, str]


def run_task(task: Task, setups: list[Setup], s: Sizes, log: Callable[[str], None]) -> TaskRun:
    """Build every contender of ``task`` (PEFT copies keyed ``peft:<label>``), check
    parity, time the training steps."""
    before = base_fingerprint(task.base)
    contenders: dict[str, Contender] = {}
    parity: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for i, setup in enumerate(setups):
        try:
            ours = build_ours(setup, task, seed=100 + i)
        except Exception as err:  # only a guessed setup may fail: report, do not stop
            if not setup.guessed:
                raise
            skipped[setup.method] = f"its default setup on qkv failed: {err}".split("\n")[0]
            continue
        contenders[setup.name] = ours
        if setup.peft:
            theirs = contenders[f"peft:{setup.name}"] = build_peft(ours, task)
            parity[setup.name] = check = check_parity(
                setup.name, task, ours.model, theirs.model, ours.loss, theirs.loss
            )
            log(
                f"    parity {setup.name}: output max|diff| {check['output_max_abs_diff']:.1e}, "
                f"input-grad rel diff {check['input_grad_rel_diff']:.1e}"
            )
    check_base_untouched(task, before)
    log(f"    timing {len(contenders)} training steps, interleaved ...")
    return TaskRun(contenders, time_steps(contenders, task, s), parity, skipped)


def time_inference(contenders: dict[str, Contender], task: Task, s: Sizes) -> dict[str, Timing]:
    fns = {"base": Contender("base", task.base, task.loss).infer(task)}
    for key, contender in contenders.items():
        contender.model.eval()
        fns[key] = contender.infer(task)
    return time_interleaved(fns, warmup=s.warmup, repeats=s.infer_repeats)


# --- tables -----------------------------------------------------------------------------------


def peft_table(task: Task, done: TaskRun, clock: str) -> Table:
    contenders, measured = done.contenders, done.measured
    table = Table(
        f"Training step vs HF PEFT, {task.name} (median {clock} ms; peft/omni > 1: "
        "omnipeft faster)",
        [
            "method",
            "PEFT config",
            "omni ms",
            "peft ms",
            "peft/omni",
            "trainable omni / peft",
            "max |dy|",
            "saved MB omni / peft",
            "peak RSS MB omni / peft",
        ],
    )
    for label, check in done.parity.items():
        ours, theirs = measured[label], measured[f"peft:{label}"]
        t_o, t_p = ours["timing"], theirs["timing"]
        m_o, m_p = ours["memory"], theirs["memory"]
        table.rows.append(
            [
                label,
                contenders[f"peft:{label}"].extra["peft_config"],
                t_o.median,
                t_p.median,
                paired_ratio(t_p, t_o),
                f"{contenders[label].trainable} / {contenders[f'peft:{label}'].trainable}",
                f"{check['output_max_abs_diff']:.1e}",
                _pair(m_o["saved_for_backward_mb"], m_p["saved_for_backward_mb"]),
                _pair(m_o["peak_rss_delta_mb"], m_p["peak_rss_delta_mb"]),
            ]
        )
    table.notes += [
        "Both models hold the same adapter weights (omnipeft's, exported with "
        "core.interop.save_peft, loaded with PeftModel.from_pretrained(is_trainable=True)); "
        "outputs, losses and input gradients were checked to match before timing (max |dy|: "
        "largest output difference).",
        "peft/omni: median over rounds of (PEFT step / omnipeft step in the same round).",
        f"{BOFT_M1}: HF PEFT builds BOFT with one butterfly factor on CPU whatever "
        "boft_n_butterfly_factor says (its m >= 2 path needs a CUDA extension), so the pair "
        "is m=1 on both sides; omnipeft's m=2 is in the last two tables.",
        "trainable counts differ where PEFT stores more than the paper's parameters "
        "(BOFT: full b x b skew blocks instead of their b(b-1)/2 upper entries).",
        "saved MB: tensors autograd keeps for backward (deterministic); peak RSS: the "
        "process's peak resident memory during one step minus before (noisy below ~1 MB).",
    ]
    return table


def _pair(a: float | None, b: float | None) -> str:
    return f"{a:.1f} / {b:.1f}" if a is not None and b is not None else "-"


def sweep_rows(task_label: str, contenders: dict, measured: dict) -> list[list[object]]:
    rows = []
    for key, contender in contenders.items():
        if key.startswith("peft:"):
            continue
        timing, memory = measured[key]["timing"], measured[key]["memory"]
        relative = paired_ratio(timing, measured[key]["reference"])
        rows.append(
            [
                key,
                task_label,
                contender.targets,
                contender.trainable,
                timing.median,
                measured[key]["reference"].median,
                relative,
                "yes" if relative <= LORA_STEP_TARGET else "NO",
                memory["saved_for_backward_mb"],
                memory["peak_rss_delta_mb"],
            ]
        )
    return rows


def sweep_table(rows: list[list[object]], clock: str, notes: list[str]) -> Table:
    table = Table(
        f"Every registered method: training step relative to omnipeft's LoRA r=8 on the "
        f"same model (median {clock} ms; target <= {LORA_STEP_TARGET:.2f}x)",
        [
            "method",
            "model",
            "targets",
            "trainable",
            "step ms",
            "LoRA ms",
            "x LoRA",
            f"<= {LORA_STEP_TARGET:.2f}x",
            "saved MB",
            "peak RSS MB",
        ],
        rows,
    )
    table.notes += [
        *notes,
        "x LoRA: median over rounds of (method step / LoRA step in the same round). Methods "
        f"are timed in interleaved groups of {GROUP_SIZE - 1}, each with its own LoRA "
        "(LoRA ms: LoRA's step in the method's group). LoRA r=8 targets qkv on the ViT and "
        "q_proj,v_proj on the decoders. Every method runs with its paper's defaults except "
        "the options in its label.",
        "saved MB: tensors autograd keeps for backward; peak RSS: the process's peak "
        "resident memory during one step minus before.",
    ]
    return table


def orthogonal_spectral_table(
    task: Task, measured: dict, inference: dict[str, Timing], clock: str
) -> Table:
    table = Table(
        f"BOFT and FourierFT vs HF PEFT, {task.name} (median {clock} ms; peft/omni > 1: "
        "omnipeft faster)",
        ["omnipeft", "peft", "mode", "omni ms", "peft ms", "peft/omni", "base ms"],
    )
    pairs = [
        (BOFT_M1, BOFT_M1, BOFT_M1),
        (BOFT_M2, f"{BOFT_M1} (m=1 forced on CPU)", BOFT_M1),
        (FOURIERFT, FOURIERFT, FOURIERFT),
    ]
    for ours, peft_label, peft_key in pairs:
        train_o, train_p = measured[ours]["timing"], measured[f"peft:{peft_key}"]["timing"]
        infer_o, infer_p = inference[ours], inference[f"peft:{peft_key}"]
        for mode, t_o, t_p, base in (
            ("train step", train_o, train_p, None),
            ("inference", infer_o, infer_p, inference["base"].median),
        ):
            row = [ours, peft_label, mode, t_o.median, t_p.median, paired_ratio(t_p, t_o), base]
            table.rows.append(row)
    table.notes += [
        "HF PEFT on CPU builds BOFT with one butterfly factor whatever "
        "boft_n_butterfly_factor says (its m >= 2 path needs a CUDA extension), so "
        "omnipeft's m=2 (twice the rotation work) is set against PEFT's m=1.",
        "train step: the same measurements as the first table; inference: eval-mode "
        "forward under torch.no_grad, these five and the base interleaved.",
    ]
    return table


# --- entry ------------------------------------------------------------------------------------


def guessed_setups(setups: list[Setup]) -> list[Setup]:
    """Default setups (on qkv) for registered methods this file has no setup for yet."""
    covered = {s.method for s in setups}
    return [
        Setup(m, QKV, label=f"{m} (default setup)", guessed=True)
        for m in sorted(core.METHODS)
        if m not in covered
    ]


ONLY_ENV = "OMNIPEFT_BENCH_METHODS"  # e.g. "fourierft,boft": time only these (and LoRA)


def only_methods() -> set[str] | None:
    """The methods named in ``$OMNIPEFT_BENCH_METHODS`` (unset or empty: all)."""
    names = {m.strip() for m in os.environ.get(ONLY_ENV, "").split(",") if m.strip()}
    unknown = sorted(names - set(core.METHODS))
    if unknown:
        raise SystemExit(f"{ONLY_ENV} names unknown method(s) {unknown}; see core.METHODS")
    return names or None


def run_only(names: set[str], s: Sizes, log: Callable[[str], None]) -> dict:
    """The sweep table for a few methods: what a change to one method file needs."""
    keep = names | {"lora"}
    every = VIT_SETUPS + DECODER_SETUPS + MOE_SETUPS
    rows: list[list[object]] = []
    for short, setups, make in (
        ("ViT", VIT_SETUPS + guessed_setups(every), lambda: vit_task(s.vit)),
        ("LLaMA", DECODER_SETUPS, lambda: llama_task(s.llama)),
        ("Mixtral", MOE_SETUPS, lambda: mixtral_task(s.moe, s.moe_experts)),
    ):
        chosen = [x for x in setups if x.method in keep]
        if not any(x.method in names for x in chosen):
            continue
        task = make()
        log(f"  running {sorted(names)} on {task.name} ...")
        done = run_task(task, chosen, s, log)
        rows += sweep_rows(short, done.contenders, done.measured)
        del done
    table = sweep_table(rows, clock_name(), [f"only {sorted(names)} ({ONLY_ENV})"])
    return {"sizes": asdict(s), "tables": [table.as_dict()], "table_objects": [table]}


def run(quick: bool, log: Callable[[str], None] = print) -> dict:
    """Run the method sweep; returns JSON-ready numbers and the tables."""
    s = QUICK if quick else FULL
    clock = clock_name()
    warnings.filterwarnings("ignore", module="peft")
    names = only_methods()
    if names:
        return run_only(names, s, log)
    results: dict = {"sizes": asdict(s), "tasks": {}}

    vit = vit_task(s.vit)
    log(f"  running every method on {vit.name} ...")
    vit_setups = VIT_SETUPS + guessed_setups(VIT_SETUPS + DECODER_SETUPS + MOE_SETUPS)
    done = run_task(vit, vit_setups, s, log)
    log("    timing BOFT / FourierFT inference ...")
    keys = [BOFT_M1, BOFT_M2, FOURIERFT, f"peft:{BOFT_M1}", f"peft:{FOURIERFT}"]
    inference = time_inference({k: done.contenders[k] for k in keys}, vit, s)
    rows = sweep_rows("ViT", done.contenders, done.measured)
    skipped = dict(done.skipped)
    first = peft_table(vit, done, clock)
    last = orthogonal_spectral_table(vit, done.measured, inference, clock)
    results["tasks"]["ViT"] = _numbers(vit, done)
    results["tasks"]["ViT"]["inference"] = {k: t.as_dict() for k, t in inference.items()}
    models = {"ViT": vit.name}
    del done  # free the ViT's adapted copies before the next model

    for short, setups, task in (
        ("LLaMA", DECODER_SETUPS, llama_task(s.llama)),
        ("Mixtral", MOE_SETUPS, mixtral_task(s.moe, s.moe_experts)),
    ):
        log(f"  running decoder methods on {task.name} ...")
        done = run_task(task, setups, s, log)
        rows += sweep_rows(short, done.contenders, done.measured)
        results["tasks"][short] = _numbers(task, done)
        models[short] = task.name
        del done
    notes = [f"{short}: {name}" for short, name in models.items()]
    notes.append(
        f"prompt tuning's 100 virtual tokens (its default) come on top of the decoder's "
        f"{s.llama.seq}-token sequence."
    )
    notes += [f"not timed: {name} ({why})" for name, why in skipped.items()]
    tables = [first, sweep_table(rows, clock, notes), last]
    results["tables"] = [t.as_dict() for t in tables]
    results["table_objects"] = tables
    return results


def _numbers(task: Task, done: TaskRun) -> dict:
    return {
        "model": task.name,
        "parity": done.parity,
        "contenders": {
            key: {
                "targets": c.targets,
                "trainable": c.trainable,
                **c.extra,
                "timing": done.measured[key]["timing"].as_dict(),
                "lora_timing_same_group": done.measured[key]["reference"].as_dict(),
                "memory": done.measured[key]["memory"],
            }
            for key, c in done.contenders.items()
        },
    }
