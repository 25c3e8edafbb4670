"""A small code-review data set in the CodeReviewer format, made from real Python source.

Hunks are windows of the standard library's own files. A "defect" hunk mechanically
introduces one of a few classic mistakes into a line (``==`` -> ``is``, ``is None`` ->
``== None``, ``<=`` -> ``<``, a dropped ``not``, ...) and carries the matching reviewer
comment (y = 1); a "benign" hunk renames nothing of substance (a trailing comment) and has
no comment (y = 0). The same edits give the refinement triples: old (defective) code,
comment, new (fixed) code. Deterministic for a seed.
"""

from __future__ import annotations

import random
import re
import sysconfig
from pathlib import Path

from .data import write_jsonl

# (pattern in the original line, replacement that makes the defect, reviewer comment)
DEFECTS = (
    (r" == ", " is ", "Use `==` to compare values; `is` compares identity."),
    (r" is None", " == None", "Compare with None using `is None`, not `==`."),
    (r" <= ", " < ", "Off by one: this should be `<=`, the bound is inclusive."),
    (r"if not ", "if ", "The condition is inverted: a `not` is missing here."),
    (r"\breturn (\w+)", "return", "This returns None now; the value should be returned."),
    (r"\.append\(", ".extend(", "`extend` adds the items one by one; use `append` here."),
)
CONTEXT = 3


def stdlib_files(limit: int = 60) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)[:limit]


def hunk(
    lines: list[str], start: int, old: list[str], new: list[str], context: int = CONTEXT
) -> str:
    """A unified-diff hunk: ``context`` lines, the change, ``context`` lines."""
    before, after = lines[max(0, start - context) : start], lines[start + 1 : start + 1 + context]
    body = [f" {x}" for x in before] + [f"-{x}" for x in old] + [f"+{x}" for x in new]
    body += [f" {x}" for x in after]
    a = max(0, start - context) + 1
    n_old, n_new = len(before) + len(old) + len(after), len(before) + len(new) + len(after)
    return f"@@ -{a},{n_old} +{a},{n_new} @@\n" + "\n".join(body)


def candidates(path: Path) -> list[tuple[list[str], int, int]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    found = []
    for i, line in enumerate(lines):
        for d, (pattern, _, _) in enumerate(DEFECTS):
            if re.search(pattern, line) and len(line) < 100 and not line.lstrip().startswith("#"):
                found.append((lines, i, d))
    return found


def make_examples(n: int, seed: int = 0, context: int = CONTEXT) -> list[dict]:
    """``n`` examples: half defect hunks (y = 1, with comment), half benign (y = 0)."""
    rng = random.Random(seed)
    pool = [c for f in stdlib_files() for c in candidates(f)]
    rng.shuffle(pool)
    out = []
    for lines, i, d in balanced(pool, n):
        pattern, repl, comment = DEFECTS[d]
        good = lines[i]
        bad = re.sub(pattern, repl, good, count=1)
        defect = len(out) % 2 == 0
        new = bad if defect else good + "  # reviewed"
        out.append(
            {
                "oldf": "\n".join(lines[max(0, i - 20) : i + 20]),
                "patch": hunk(lines, i, [good], [new], context),
                "y": int(defect),
                "msg": comment if defect else "",
                "old": "\n".join(f"-{x}" for x in lines[max(0, i - 2) : i] + [bad]),
                "comment": comment,
                "new": "\n".join(f"+{x}" for x in lines[max(0, i - 2) : i] + [good]),
            }
        )
    return out


def balanced(pool: list[tuple[list[str], int, int]], n: int) -> list[tuple[list[str], int, int]]:
    """``n`` candidates taking the defect kinds in turn (some patterns, e.g. ``return x``, are
    far more common in real code; an unbalanced set lets "always the commonest comment"
    score well)."""
    by_kind: list[list] = [[c for c in pool if c[2] == d] for d in range(len(DEFECTS))]
    picked, turn = [], 0
    while len(picked) < n and any(by_kind):
        kind = by_kind[(turn // 2) % len(by_kind)]  # pairs: a defect and a benign hunk
        if kind:
            picked.append(kind.pop())
        turn += 1
    return picked


def write_release(
    root: str | Path, sizes=(160, 24, 24), seed: int = 0, context: int = CONTEXT
) -> Path:
    """Write the three task folders of the release under ``root`` (hunks with ``context``
    unchanged lines on each side of the edit)."""
    root = Path(root)
    examples = make_examples(sum(sizes), seed, context)
    start = 0
    for split, size in zip(("train", "valid", "test"), sizes, strict=True):
        part, start = examples[start : start + size], start + size
        cls_name = "cls-train-chunk-0" if split == "train" else f"cls-{split}"
        write_jsonl(
            root / "Diff_Quality_Estimation" / f"{cls_name}.jsonl",
            [{k: e[k] for k in ("oldf", "patch", "y", "msg")} for e in part],
        )
        defects = [e for e in part if e["y"] == 1]
        write_jsonl(
            root / "Comment_Generation" / f"msg-{split}.jsonl",
            [{k: e[k] for k in ("oldf", "patch", "msg")} for e in defects],
        )
        write_jsonl(
            root / "Code_Refinement" / f"ref-{split}.jsonl",
            [{k: e[k] for k in ("old", "comment", "new")} for e in defects],
        )
    return root
