"""Shared measuring tools for the benchmarks: timing, memory, environment, tables.

Timing runs the contenders interleaved (round-robin, order rotated every round) so that
drift on a busy machine -- other processes, frequency scaling -- falls on all of them
alike, and reports the median of the repeats measured with ``time.perf_counter`` (or,
with ``use_clock("thread")`` and one torch thread, the calling thread's CPU time, which
other processes hardly disturb). The thread count is whatever ``torch.get_num_threads()``
says; the benchmarks never change it (``python -m bench --threads N`` sets it up front).

Memory is measured two ways, both honest about what they are:

* ``peak_rss_delta_mb``: the process's peak resident set size during one call minus its
  RSS just before (Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``,
  with freed heap memory handed back to the OS first via ``malloc_trim``). It counts
  every byte the call touched -- torch's allocator and Python's -- but it is one process
  number, so small differences (< 1 MB) are noise.
* ``saved_for_backward_mb``: the bytes of the distinct tensors autograd keeps for the
  backward pass (parameters excluded), via ``torch.autograd.graph.saved_tensors_hooks``.
  Deterministic; it is the activation memory a training step holds at its peak.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

MB = 1024 * 1024

# What the timers read: wall time by default. "thread" reads the CPU time of the calling
# thread instead, which a busy machine hardly disturbs (time spent waiting for a core is
# not counted); it sees all of torch's work only when torch runs on that one thread, so
# it requires torch.get_num_threads() == 1.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_clock = {"name": "wall", "read": time.perf_counter}


def use_clock(name: str) -> None:
    """Time with ``"wall"`` (``time.perf_counter``) or ``"thread"`` (``time.thread_time``)."""
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {name!r}")
    if name == "thread" and torch.get_num_threads() != 1:
        raise ValueError(
            f"the thread clock misses work done on torch's other threads "
            f"({torch.get_num_threads()} in use); run with --threads 1."
        )
    _clock.update(name=name, read=CLOCKS[name])


def clock_name() -> str:
    return _clock["name"]


@dataclass
class Timing:
    """Wall-clock samples of one contender, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min(self) -> float:
        return min(self.samples_ms)

    @property
    def iqr(self) -> float:
        """Interquartile range: how much the middle half of the samples spread."""
        if len(self.samples_ms) < 4:
            return max(self.samples_ms) - min(self.samples_ms)
        q = statistics.quantiles(self.samples_ms, n=4)
        return q[2] - q[0]

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median,
            "min_ms": self.min,
            "iqr_ms": self.iqr,
            "samples_ms": self.samples_ms,
        }


@contextlib.contextmanager
def _gc_paused():
    """Keep Python's cyclic GC out of the timed calls (as ``timeit`` does).

    A full collection takes ~0.2 s with transformers imported, so it runs once here and
    only the young generation is collected between calls (``between()``), untimed.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield lambda: gc.collect(0)
    finally:
        if was_enabled:
            gc.enable()


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int
) -> dict[str, Timing]:
    """Median-ready timings of each callable, run round-robin ``warmup`` + ``repeats`` times.

    Each round runs every contender once; the order rotates each round so none is always
    first or last.
    """
    names, clock = list(fns), _clock["read"]
    out = {n: Timing() for n in names}
    with _gc_paused() as between:
        for i in range(warmup + repeats):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                between()
                start = clock()
                fns[name]()
                elapsed = (clock() - start) * 1e3
                if i >= warmup:
                    out[name].samples_ms.append(elapsed)
    return out


def time_each_fresh(
    fns: dict[str, Callable[[object], object]],
    setup: Callable[[], object],
    *,
    repeats: int,
) -> dict[str, Timing]:
    """Time ``fn(setup())`` for each contender, the untimed ``setup`` giving a fresh input
    every call (for operations that change their input, like injection)."""
    names, clock = list(fns), _clock["read"]
    out = {n: Timing() for n in names}
    with _gc_paused() as between:
        for i in range(repeats):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                arg = setup()
                between()
                start = clock()
                fns[name](arg)
                out[name].samples_ms.append((clock() - start) * 1e3)
                del arg
    return out


# --- memory ---------------------------------------------------------------------------


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            text = handle.read()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_rss_delta_mb(fn: Callable[[], object]) -> float | None:
    """Peak RSS during ``fn()`` minus RSS just before, in MB; None where Linux's
    ``/proc`` interface is not available."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)  # freed heap memory back to the OS, so reuse is not hidden
    before = _status_kb("VmRSS")
    if before is None or not _reset_peak_rss():
        return None
    fn()
    peak = _status_kb("VmHWM")
    return None if peak is None else (peak - before) / 1024


def saved_for_backward_mb(fn: Callable[[], object], params: Iterable[torch.Tensor]) -> float:
    """MB of distinct non-parameter tensors autograd saves while ``fn()`` runs."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and t.layout == torch.strided:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip:
                storages[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / MB


# --- environment and output -----------------------------------------------------------


def versions(*modules: str) -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in modules:
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            found[name] = "not installed"
    return found


def environment(*modules: str) -> dict[str, object]:
    return {
        **versions(*modules),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
    }


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (Linux)."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return total - values[3] - values[4], total


class CpuContention:
    """How much of the machine's CPU other processes used while the benchmark ran.

    On a shared machine other work can oversubscribe torch's threads and slow single
    calls 10-100x; interleaving keeps ratios fair, but absolute times and noise suffer.
    """

    def __init__(self) -> None:
        self.start = _cpu_jiffies()
        self.own_start = sum(os.times()[:2])

    def others_share(self) -> float | None:
        """Fraction (0..1) of all cores' time spent by other processes since start."""
        now = _cpu_jiffies()
        if self.start is None or now is None or now[1] <= self.start[1]:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        own = (sum(os.times()[:2]) - self.own_start) * tick
        others = (now[0] - self.start[0]) - own
        return max(0.0, others / (now[1] - self.start[1]))

    def warning(self) -> str | None:
        share = self.others_share()
        if share is None or share < 0.10:
            return None
        head = f"other processes used {share:.0%} of this machine's CPU during the run"
        if clock_name() == "thread":
            return (
                f"NOTE: {head}; thread CPU time does not count waiting for a core, but "
                "shared caches still add some noise. Peak RSS is unaffected."
            )
        return (
            f"WARNING: {head}; wall times are inflated and noisy (ratios are interleaved, "
            "so fairer). Rerun on an idle machine, or with --threads 1 --clock thread."
        )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def ratio(peer: float | None, ours: float | None) -> float | None:
    if peer is None or ours is None or ours <= 0:
        return None
    return peer / ours


def paired_ratio(peer: Timing, ours: Timing) -> float:
    """Median over rounds of peer / ours, each round's pair timed back to back.

    ``time_interleaved`` runs every contender once per round, so sample i of each comes
    from the same round; a load that drifts between rounds then cancels in each round's
    ratio, which a ratio of medians taken over different rounds does not do.
    """
    return statistics.median(p / o for p, o in zip(peer.samples_ms, ours.samples_ms, strict=True))


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_table(headers: list[str], rows: list[list[object]], title: str = "") -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [values[0].ljust(widths[0])]
        parts += [v.rjust(w) for v, w in zip(values[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(headers))
    out = [title, rule] if title else [rule]
    out += [line(headers), rule, *(line(r) for r in cells), rule]
    return "\n".join(out)


def render_markdown(
    headers: list[str], rows: list[list[object]], title: str = "", notes: Iterable[str] = ()
) -> str:
    """The same table as GitHub markdown: a bold title, the table, notes as a list."""

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    align = ["---"] + ["---:"] * (len(headers) - 1)
    out = [f"**{title}**", ""] if title else []
    out += [line(headers), "| " + " | ".join(align) + " |"]
    out += [line([fmt(c) for c in row]) for row in rows]
    notes = list(notes)
    if notes:
        out += ["", *(f"- {note}" for note in notes)]
    return "\n".join(out)


@dataclass
class Table:
    """One result table, printable as plain text or markdown."""

    title: str
    headers: list[str]
    rows: list[list[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        body = render_table(self.headers, self.rows, self.title)
        return "\n".join([body, *(f"  * {note}" for note in self.notes)])

    def markdown(self) -> str:
        return render_markdown(self.headers, self.rows, self.title, self.notes)

    def as_dict(self) -> dict:
        return {
            "title": self.title,
            "headers": self.headers,
            "rows": self.rows,
            "notes": self.notes,
        }


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are the original's objects.

    Injection wraps modules and never copies base weights, so many adapted copies of one
    base cost one set of weights. Only for contenders that leave the base weights alone
    (no merging): a merge would write into every copy at once.
    """
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)
