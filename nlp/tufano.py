"""The code-refinement data of Tufano et al. as refinement records (old, comment, new).

Two layouts, both one example per line:

* ``format="tufano"`` — parallel files, as Tufano et al. (2019, "On Learning Meaningful
  Code Changes via Neural Machine Translation") and CodeXGLUE's code-refinement
  small/medium release them: ``<root>/{train,valid,test}.buggy-fixed.buggy`` and
  ``.buggy-fixed.fixed``, line i of one the before/after of line i of the other (one
  method per line, identifiers abstracted as ``TYPE_1``, ``METHOD_2``, ``VAR_3``, ...).
* ``format="tufano_tsv"`` — the code-review variant of Tufano et al. (2021, "Towards
  Automating Code Review Activities"; 2022, "Using Pre-Trained Models to Boost Code Review
  Automation"): ``<root>/{train,val,test}.tsv``, each line ``input<TAB>target``.

In either, an input of the code-review variant carries the reviewer comment as
``<code>CODE</code><technical_language>COMMENT</technical_language>`` (CODE may mark the
commented span with ``<START>`` ... ``<END>``, kept as the model's cue); a plain input is
code alone (code-to-code, no comment).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .data import DatasetError

FORMATS = ("tufano", "tufano_tsv")
BUGGY, FIXED = ".buggy-fixed.buggy", ".buggy-fixed.fixed"
TSV_SPLITS = {"train": ("train",), "valid": ("val", "valid"), "test": ("test",)}
TAGGED = re.compile(
    r"^\s*<code>(?P<code>.*)</code>\s*"
    r"<technical_language>(?P<comment>.*)</technical_language>\s*$",
    re.DOTALL,
)


def split_paths(root: str | Path, split: str, data_format: str) -> list[Path]:
    """The file(s) of ``split``: [buggy, fixed] or [tsv]; a clear error when missing."""
    root = Path(root)
    if data_format == "tufano":
        paths = [root / f"{split}{BUGGY}", root / f"{split}{FIXED}"]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(
                f"{missing[0]} does not exist. Tufano et al. / CodeXGLUE code refinement needs "
                f"{split}{BUGGY} and {split}{FIXED} side by side; point --data.root at the "
                "folder holding them (e.g. .../code-refinement/data/small)."
            )
        return paths
    if data_format == "tufano_tsv":
        for name in TSV_SPLITS[split]:
            if (root / f"{name}.tsv").is_file():
                return [root / f"{name}.tsv"]
        raise DatasetError(
            f"{root / (TSV_SPLITS[split][0] + '.tsv')} does not exist. The Tufano et al. "
            "code-review release holds {train,val,test}.tsv per task folder (e.g. "
            "code&comment-to-code/); point --data.root at that folder."
        )
    raise DatasetError(f"data format must be one of {list(FORMATS)}, got {data_format!r}.")


def read_lines(path: Path) -> list[str]:
    """Lines split on '\\n' only (code may hold other line-break characters)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def parse_input(text: str, where: str) -> tuple[str, str]:
    """(code, comment) of one input; comment "" for a code-only input."""
    if "<code>" not in text and "<technical_language>" not in text:
        return text.strip(), ""
    match = TAGGED.match(text)
    if not match:
        raise DatasetError(
            f"{where}: a tagged input must be '<code>CODE</code><technical_language>COMMENT"
            "</technical_language>'; the tags here are incomplete or out of order."
        )
    return match["code"].strip(), match["comment"].strip()


def make_record(source: str, target: str, where: str) -> dict[str, Any]:
    if not source.strip() or not target.strip():
        side = "input" if not source.strip() else "target"
        raise DatasetError(f"{where}: empty {side}; every line must hold one example.")
    code, comment = parse_input(source, where)
    # plain code: no diff-marker column to strip (see nlp.data.strip_markers)
    return {"old": code, "comment": comment, "new": target.strip(), "_plain": True, "_where": where}


def read_parallel(buggy: Path, fixed: Path) -> list[dict[str, Any]]:
    """Records of a buggy/fixed file pair; line counts must agree."""
    sources, targets = read_lines(buggy), read_lines(fixed)
    if len(sources) != len(targets):
        raise DatasetError(
            f"{buggy} has {len(sources)} lines but {fixed} has {len(targets)}; the two files "
            "must be line-aligned (line i of one is the before/after of line i of the other)."
        )
    if not sources:
        raise DatasetError(f"{buggy} holds no examples.")
    return [
        make_record(s, t, f"{buggy}:{i}")
        for i, (s, t) in enumerate(zip(sources, targets, strict=True), start=1)
    ]


def read_tsv(path: Path) -> list[dict[str, Any]]:
    """Records of a two-column ``input<TAB>target`` file (no quoting, as released)."""
    records = []
    for number, line in enumerate(read_lines(path), start=1):
        columns = line.split("\t")
        if len(columns) != 2:
            raise DatasetError(
                f"{path}:{number}: expected 2 tab-separated columns (input, target), got "
                f"{len(columns)}."
            )
        records.append(make_record(columns[0], columns[1], f"{path}:{number}"))
    if not records:
        raise DatasetError(f"{path} holds no examples.")
    return records


def read_split(root: str | Path, split: str, data_format: str) -> list[dict[str, Any]]:
    paths = split_paths(root, split, data_format)
    return read_parallel(*paths) if data_format == "tufano" else read_tsv(paths[0])


def read_file(path: str | Path, data_format: str) -> list[dict[str, Any]]:
    """Records of one input file (``nlp.generate``): a ``.buggy`` file (its ``.fixed``
    sibling is found by name) or a ``.tsv`` file."""
    path = Path(path)
    if data_format == "tufano_tsv":
        return read_tsv(path)
    if not path.name.endswith(BUGGY):
        raise DatasetError(f"{path}: a Tufano input file ends with {BUGGY!r}.")
    fixed = path.with_name(path.name[: -len(BUGGY)] + FIXED)
    for needed in (path, fixed):
        if not needed.is_file():
            raise DatasetError(f"{needed} does not exist; {path.name} needs its {FIXED} pair.")
    return read_parallel(path, fixed)
