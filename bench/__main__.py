"""``python -m bench [--quick] [--json PATH] [--markdown PATH] [--threads N] [--clock C]``:
run every benchmark, print tables.

Ratios are peer / omnipeft, measured in the same process on the same inputs: > 1 means
omnipeft is faster (or uses less memory). Sections:

    lora       LoRA vs HF PEFT on a small LLaMA and ViT: inference, training, merged,
               injection on a meta-device LLaMA-7B (bench/lora.py)
    methods    every registered method's training step on a ViT-B/16 shape, against HF
               PEFT where it has the method and against omnipeft's LoRA for all; BOFT and
               FourierFT inference (bench/methods.py)
    inference  LoRA inference on a ViT-S/16 shape unmerged / merged / as mixed batches of
               16 adapters, against PEFT and the base model (bench/inference.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from . import inference, lora, methods
from .common import (
    CpuContention,
    Table,
    clock_name,
    environment,
    ratio,
    use_clock,
)
from .peft_bridge import ParityError

SECTIONS = {"lora": lora, "methods": methods, "inference": inference}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller models and fewer repeats (< 2 min)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every number here")
    parser.add_argument(
        "--markdown", type=Path, metavar="PATH", help="also write every table here as markdown"
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) before measuring (default: leave torch's setting)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall: time.perf_counter (default); thread: the calling thread's CPU time, "
        "steady on a busy machine, needs --threads 1",
    )
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {sorted(SECTIONS)}")
    return args


# --- the LoRA section's tables ---------------------------------------------------------------


def lora_timing_table(results: dict, clock: str) -> Table:
    rows = []
    for case in results["cases"]:
        for row in case["rows"]:
            rows.append(
                [
                    row["case"],
                    row["mode"],
                    row["omnipeft_ms"],
                    row["peft_ms"],
                    row["ratio"],
                    row["ratio_of_mins"],
                    row["base_ms"],
                    f"{row['omnipeft_iqr_ms']:.2f} / {row['peft_iqr_ms']:.2f}",
                ]
            )
    headers = ["model", "mode", "omni ms", "peft ms", "peft/omni", "(of mins)", "base ms"]
    headers.append("IQR omni/peft")
    what = {"wall": "wall time", "thread": "thread CPU time"}[clock]
    title = (
        f"LoRA vs HF PEFT: median {what}, ms (peft/omni > 1: omnipeft faster; "
        "'of mins' is the same ratio over the fastest repeats)"
    )
    return Table(title, headers, rows)


def lora_memory_table(results: dict) -> Table:
    rows = []
    for case in results["cases"]:
        for row in case["rows"]:
            mem = row.get("memory")
            if not mem:
                continue
            o, p = mem["omnipeft"], mem["peft"]
            for key, label in (
                ("saved_for_backward_mb", "saved for backward"),
                ("peak_rss_delta_mb", "peak RSS delta"),
            ):
                rows.append([row["case"], label, o[key], p[key], ratio(p[key], o[key])])
    headers = ["model", "training step", "omnipeft MB", "peft MB", "peft/omni"]
    return Table("LoRA vs HF PEFT: training-step memory", headers, rows)


def tables_of(section: str, results: dict, clock: str) -> list[Table]:
    if section == "lora":
        return [lora_timing_table(results, clock), lora_memory_table(results)]
    return results.pop("table_objects")


# --- output -----------------------------------------------------------------------------------


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "?"
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def conditions(env: dict, elapsed: float, share: float | None, load_at_start: str) -> list[str]:
    """The header lines of results.md: what ran, where, and how busy the machine was."""
    cpu = sum(os.times()[:2])
    clock = clock_name()
    lines = [
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        "command: python -m bench " + " ".join(sys.argv[1:]),
        "versions: " + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "peft", "timm")),
        f"machine: {env['processor']}, {env['cpu_count']} CPUs, torch threads "
        f"{env['torch_threads']}",
        f"clock: {clock}"
        + (
            " (the thread's CPU time: time spent waiting for a core is not counted)"
            if clock == "thread"
            else " (wall time)"
        ),
        f"run time: {elapsed:.0f} s wall, {cpu:.0f} s CPU (user + system) in this process",
        f"load average (1 / 5 / 15 min) at the start: {load_at_start}; at the end: "
        f"{load_average()}",
    ]
    if share is not None:
        lines.append(f"other processes used {share:.0%} of the machine's CPU during the run")
    return lines


def write_markdown(path: Path, header: list[str], tables: list[Table], quick: bool) -> None:
    title = "# omnipeft benchmarks" + (" (--quick)" if quick else "")
    parts = [title, "", *(f"- {line}" for line in header), ""]
    parts.append(
        "Ratios are peer / omnipeft, measured in the same process on the same inputs, "
        "contenders interleaved round-robin: > 1 means omnipeft is faster."
    )
    if clock_name() == "thread":
        parts.append(
            "\nMeasured with one torch thread and the thread CPU-time clock "
            "(`--threads 1 --clock thread`), the steady setting when other processes share "
            "the machine: times are single-core times, ratios compare the same work."
        )
    for table in tables:
        parts += ["", table.markdown()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        use_clock(args.clock)
    except ValueError as err:
        print(f"python -m bench: {err}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.perf_counter()
    load_at_start = load_average()
    contention = CpuContention()
    env = environment("peft", "transformers", "timm")
    mode = " (--quick)" if args.quick else ""
    print(f"omnipeft benchmarks{mode}, clock: {clock_name()}")
    print("  " + ", ".join(f"{k} {v}" for k, v in env.items()))
    sys.stdout.flush()

    def log(message: str) -> None:
        print(message, flush=True)

    results: dict = {"environment": env, "quick": args.quick, "clock": clock_name()}
    tables: list[Table] = []
    try:
        for section in args.sections:
            log(f"[{section}]")
            results[section] = SECTIONS[section].run(args.quick, log)
            tables += tables_of(section, results[section], clock_name())
    except ParityError as err:
        print(f"\nPARITY FAILURE, nothing timed is comparable: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    results["elapsed_s"] = elapsed
    for table in tables:
        print()
        print(table.text())
    share = contention.others_share()
    results["other_processes_cpu_share"] = share
    busy = "" if share is None else f"; other processes used {share:.0%} of the CPU meanwhile"
    print(f"\ntotal {elapsed:.1f} s{busy}")
    warning = contention.warning()
    if warning:
        print(warning)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    if args.markdown:
        header = conditions(env, elapsed, share, load_at_start)
        if warning:
            header.append(warning)
        write_markdown(args.markdown, header, tables, args.quick)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
