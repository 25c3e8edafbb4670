"""LoRA: omnipeft against HF PEFT on the same base weights, in the same process.

For each model (a small LLaMA from ``transformers``, a small ViT from ``timm``) the base
is built once and deep-copied twice; omnipeft's LoRA goes into one copy and PEFT's
(``get_peft_model`` with the same r, alpha and targets) into the other. omnipeft's
adapter (A Kaiming, B random, so the update is not zero) is written with
``core.interop.save_peft`` and those tensors are loaded into the PEFT model, so both
compute the same function; outputs and gradients are checked to match before anything
is timed. Then, interleaved round-robin:

    infer   forward under ``torch.no_grad`` (eval mode)
    train   zero grads + forward + loss + backward (train mode, adapters trainable)
    merged  forward under ``torch.no_grad`` after merging (``core.merge`` /
            PEFT ``merge_adapter``; wrappers stay in place)

and, on a LLaMA-7B-shaped model on the ``meta`` device, the injection call itself.
Times are medians in milliseconds (the ratio of the fastest repeats is printed beside
it: on a busy machine it is the steadier of the two); the ratio is peft / omnipeft, so
> 1 means omnipeft is faster. Training-step memory is measured per library afterwards.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import core
from core.interop import WEIGHTS_FILE, save_peft

from .common import (
    peak_rss_delta_mb,
    ratio,
    saved_for_backward_mb,
    time_each_fresh,
    time_interleaved,
)
from .peft_bridge import ParityError

OUTPUT_TOL = 1e-4  # max abs difference allowed between omnipeft's and PEFT's outputs
GRAD_TOL = 1e-4  # max relative difference allowed between their LoRA gradients
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
VIT_TARGETS = ["attn.qkv", "attn.proj"]  # not "proj": that also names patch_embed.proj


@dataclass(frozen=True)
class Sizes:
    """One benchmark configuration (``full`` or ``quick``)."""

    llama_hidden: int
    llama_intermediate: int
    llama_layers: int
    llama_heads: int
    llama_vocab: int
    llama_seq: int
    llama_batch: int
    vit_embed: int
    vit_depth: int
    vit_heads: int
    vit_img: int
    vit_patch: int
    vit_batch: int
    r: int
    alpha: float
    warmup: int
    repeats: int
    inject_repeats: int


FULL = Sizes(
    llama_hidden=256,
    llama_intermediate=688,
    llama_layers=4,
    llama_heads=8,
    llama_vocab=1000,
    llama_seq=128,
    llama_batch=8,
    vit_embed=256,
    vit_depth=4,
    vit_heads=8,
    vit_img=64,
    vit_patch=8,
    vit_batch=32,
    r=16,
    alpha=32.0,
    warmup=3,
    repeats=20,
    inject_repeats=7,
)

QUICK = Sizes(
    llama_hidden=128,
    llama_intermediate=344,
    llama_layers=2,
    llama_heads=4,
    llama_vocab=1000,
    llama_seq=64,
    llama_batch=4,
    vit_embed=128,
    vit_depth=2,
    vit_heads=4,
    vit_img=64,
    vit_patch=8,
    vit_batch=8,
    r=16,
    alpha=32.0,
    warmup=2,
    repeats=11,
    inject_repeats=3,
)


@dataclass
class Case:
    """A base model, what LoRA targets in it, and how to run it."""

    name: str
    base: nn.Module
    targets: list[str]
    forward: Callable[[nn.Module], torch.Tensor]  # the output compared between libraries
    loss: Callable[[nn.Module], torch.Tensor]  # a scalar for the training step


# --- models -----------------------------------------------------------------------------


def llama_case(s: Sizes) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=s.llama_hidden,
        intermediate_size=s.llama_intermediate,
        num_hidden_layers=s.llama_layers,
        num_attention_heads=s.llama_heads,
        num_key_value_heads=s.llama_heads,
        vocab_size=s.llama_vocab,
        max_position_embeddings=max(256, s.llama_seq),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    ids = torch.randint(0, s.llama_vocab, (s.llama_batch, s.llama_seq))

    def forward(model: nn.Module) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    def loss(model: nn.Module) -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    name = f"llama h{s.llama_hidden} L{s.llama_layers} b{s.llama_batch}x{s.llama_seq} (q,k,v,o)"
    return Case(name, base, LLAMA_TARGETS, forward, loss)


def vit_case(s: Sizes) -> Case:
    import timm

    torch.manual_seed(0)
    base = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=s.vit_img,
        patch_size=s.vit_patch,
        embed_dim=s.vit_embed,
        depth=s.vit_depth,
        num_heads=s.vit_heads,
    )
    images = torch.randn(s.vit_batch, 3, s.vit_img, s.vit_img)
    labels = torch.randint(0, base.num_classes, (s.vit_batch,))

    def forward(model: nn.Module) -> torch.Tensor:
        return model(images)

    def loss(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    name = f"vit d{s.vit_embed} L{s.vit_depth} b{s.vit_batch}@{s.vit_img}px (qkv,proj)"
    return Case(name, base, VIT_TARGETS, forward, loss)


# --- the two adapted copies ---------------------------------------------------------------


def peft_lora_config(s: Sizes, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules=targets, lora_dropout=0.0)


def build_pair(case: Case, s: Sizes) -> tuple[nn.Module, nn.Module]:
    """(omnipeft model, PEFT model) over copies of ``case.base`` with the same adapter."""
    from peft import get_peft_model, set_peft_model_state_dict

    ours = copy.deepcopy(case.base)
    core.inject(ours, core.LoRA(r=s.r, alpha=s.alpha, targets=case.targets))
    gen = torch.Generator().manual_seed(1)
    factors_b = [p for n, p in ours.named_parameters() if n.endswith(".adapters.default.B")]
    if not factors_b:
        raise ParityError(f"{case.name}: no LoRA B factors found (omnipeft's naming changed?)")
    with torch.no_grad():
        for param in factors_b:
            param.copy_(0.02 * torch.randn(param.shape, generator=gen))

    theirs = get_peft_model(copy.deepcopy(case.base), peft_lora_config(s, case.targets))
    with tempfile.TemporaryDirectory() as tmp:
        save_peft(ours, tmp)
        tensors = safetensors.torch.load_file(str(Path(tmp) / WEIGHTS_FILE))
    result = set_peft_model_state_dict(theirs, tensors)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ParityError(
            f"{case.name}: PEFT did not take omnipeft's exported tensors "
            f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})"
        )
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    if n_ours != n_theirs:
        raise ParityError(f"{case.name}: trainable params differ: {n_ours} vs {n_theirs}")
    return ours, theirs


def lora_grads(model: nn.Module, ours: bool) -> dict[str, torch.Tensor]:
    """LoRA gradients keyed ``<module path>.A`` / ``.B`` for either library."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if ours and ".adapters.default." in name:
            path, _, which = name.partition(".adapters.default.")
        elif not ours and ".lora_" in name:
            path, _, rest = name.removeprefix("base_model.model.").partition(".lora_")
            which = rest.split(".")[0]
        else:
            continue
        grads[f"{path}.{which}"] = param.grad
    return grads


def check_parity(case: Case, ours: nn.Module, theirs: nn.Module) -> dict[str, float]:
    """Outputs and LoRA gradients must match; raises ``ParityError`` when they do not."""
    for m in (case.base, ours, theirs):
        m.eval()
    with torch.no_grad():
        y_base, y_ours, y_theirs = (case.forward(m) for m in (case.base, ours, theirs))
    out_diff = (y_ours - y_theirs).abs().max().item()
    effect = (y_ours - y_base).abs().max().item()
    if not out_diff <= OUTPUT_TOL:
        raise ParityError(f"{case.name}: outputs differ by {out_diff:.3g} > {OUTPUT_TOL}")
    if effect < 100 * OUTPUT_TOL:
        raise ParityError(f"{case.name}: the adapter barely changes the output ({effect:.3g})")

    for m in (ours, theirs):
        m.train()
        m.zero_grad(set_to_none=True)
        case.loss(m).backward()
    g_ours, g_theirs = lora_grads(ours, True), lora_grads(theirs, False)
    if set(g_ours) != set(g_theirs) or not g_ours:
        raise ParityError(f"{case.name}: gradients land on different LoRA tensors")
    grad_diff = max(
        ((g_ours[k] - g_theirs[k]).abs().max() / g_theirs[k].abs().max().clamp_min(1e-30)).item()
        for k in g_ours
    )
    if not grad_diff <= GRAD_TOL:
        raise ParityError(f"{case.name}: LoRA gradients differ by {grad_diff:.3g} (relative)")
    for m in (ours, theirs):
        m.zero_grad(set_to_none=True)
    return {"output_max_abs_diff": out_diff, "adapter_effect": effect, "grad_rel_diff": grad_diff}


# --- measuring ------------------------------------------------------------------------------


def _row(case: str, mode: str, timings: dict, **extra) -> dict:
    ours, theirs = timings["omnipeft"], timings["peft"]
    base = timings.get("base")
    return {
        "case": case,
        "mode": mode,
        "omnipeft_ms": ours.median,
        "peft_ms": theirs.median,
        "ratio": ratio(theirs.median, ours.median),
        "base_ms": base.median if base else None,
        "ratio_of_mins": ratio(theirs.min, ours.min),
        "omnipeft_iqr_ms": ours.iqr,
        "peft_iqr_ms": theirs.iqr,
        "timings": {k: v.as_dict() for k, v in timings.items()},
        **extra,
    }


def bench_case(case: Case, s: Sizes, log: Callable[[str], None]) -> dict:
    """Parity check, then infer / train / merged timings and training-step memory."""
    ours, theirs = build_pair(case, s)
    parity = check_parity(case, ours, theirs)
    log(
        f"  parity {case.name}: output max|diff| {parity['output_max_abs_diff']:.2e} "
        f"(adapter moves outputs by {parity['adapter_effect']:.2e}), "
        f"LoRA grad rel diff {parity['grad_rel_diff']:.2e}"
    )
    base = case.base
    base.requires_grad_(False)
    rows = []

    def infer(m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return case.forward(m)

        return run

    def train_step(m: nn.Module) -> Callable[[], object]:
        def run() -> None:
            m.zero_grad(set_to_none=True)
            case.loss(m).backward()

        return run

    for m in (base, ours, theirs):
        m.eval()
    t = time_interleaved(
        {"omnipeft": infer(ours), "peft": infer(theirs), "base": infer(base)},
        warmup=s.warmup,
        repeats=s.repeats,
    )
    rows.append(_row(case.name, "infer", t))
    with torch.no_grad():
        reference = case.forward(ours)

    for m in (ours, theirs):
        m.train()
    steps = {"omnipeft": train_step(ours), "peft": train_step(theirs)}
    t = time_interleaved(steps, warmup=s.warmup, repeats=s.repeats)
    memory = {}
    for lib, model in (("omnipeft", ours), ("peft", theirs)):
        peaks = [peak_rss_delta_mb(steps[lib]) for _ in range(5)]
        rss = None if None in peaks else statistics.median(peaks)
        saved = saved_for_backward_mb(steps[lib], model.parameters())
        memory[lib] = {"peak_rss_delta_mb": rss, "saved_for_backward_mb": saved}
        model.zero_grad(set_to_none=True)
    rows.append(_row(case.name, "train", t, memory=memory))

    for m in (ours, theirs):
        m.eval()
    core.merge(ours)
    theirs.merge_adapter()
    with torch.no_grad():
        merged_diff = max((case.forward(m) - reference).abs().max().item() for m in (ours, theirs))
    if not merged_diff <= OUTPUT_TOL:
        raise ParityError(f"{case.name}: merged outputs differ by {merged_diff:.3g}")
    t = time_interleaved(
        {"omnipeft": infer(ours), "peft": infer(theirs), "base": infer(base)},
        warmup=s.warmup,
        repeats=s.repeats,
    )
    rows.append(_row(case.name, "merged", t, merged_max_abs_diff=merged_diff))
    core.unmerge(ours)
    theirs.unmerge_adapter()
    return {"case": case.name, "parity": parity, "rows": rows}


def bench_inject(s: Sizes) -> dict:
    """Time the injection call on a LLaMA-7B-shaped model (``LlamaConfig()``) on ``meta``."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        template = LlamaForCausalLM(LlamaConfig())
    config = core.LoRA(r=s.r, alpha=s.alpha, targets=LLAMA_TARGETS)
    peft_config = peft_lora_config(s, LLAMA_TARGETS)

    def fresh() -> nn.Module:
        return copy.deepcopy(template)

    fns = {
        "omnipeft": lambda m: core.inject(m, config),
        "peft": lambda m: get_peft_model(m, peft_config),
        "peft_low_mem": lambda m: get_peft_model(m, peft_config, low_cpu_mem_usage=True),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the meta device on every call
        counts = {}
        for lib, fn in fns.items():
            model = fn(fresh())
            counts[lib] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if len(set(counts.values())) != 1:
            raise ParityError(f"meta LLaMA-7B: trainable parameter counts differ: {counts}")
        t = time_each_fresh(fns, fresh, repeats=s.inject_repeats)
    name = "llama-7B shape on meta (q,k,v,o)"
    rows = [
        _row(name, "inject", {"omnipeft": t["omnipeft"], "peft": t["peft"]}),
        _row(
            name,
            "inject (peft low_cpu_mem_usage)",
            {"omnipeft": t["omnipeft"], "peft": t["peft_low_mem"]},
        ),
    ]
    return {"case": name, "trainable_params": counts["omnipeft"], "rows": rows}


def run(quick: bool, log: Callable[[str], None] = print) -> dict:
    """Run the LoRA benchmarks; returns a JSON-ready dict of every number."""
    s = QUICK if quick else FULL
    results = {"sizes": asdict(s), "cases": []}
    for make in (llama_case, vit_case):
        case = make(s)
        log(f"  running {case.name} ...")
        results["cases"].append(bench_case(case, s, log))
    log("  running injection on a meta-device LLaMA-7B ...")
    results["cases"].append(bench_inject(s))
    return results
