"""CodeReviewer data on disk and its instruction-tuning examples (LLaMA-Reviewer).

The CodeReviewer release (Li et al., 2022, "Automating Code Review Activities by
Large-Scale Pre-training") as published, one JSON object per line:

    <root>/Diff_Quality_Estimation/cls-train-chunk-*.jsonl  cls-valid.jsonl  cls-test.jsonl
        oldf, patch ("@@ -a,b +c,d @@" hunk), y (0/1), msg (non-empty means y = 1)
    <root>/Comment_Generation/msg-{train,valid,test}.jsonl      oldf, patch, msg
    <root>/Code_Refinement/ref-{train,valid,test}.jsonl         old, comment, new
        (each line of old/new carries a leading diff-marker character, stripped here)

plus a HumanEval/MBPP-style code-generation file ``<root>/codegen-{split}.jsonl``
(prompt, test, entry_point, optional canonical_solution), and for refinement the data of
Tufano et al. (``data_format="tufano"`` / ``"tufano_tsv"``, read by ``nlp.tufano``).

Each record becomes the Alpaca-style prompt LLaMA-Reviewer (Lu et al., 2023) fine-tunes
on (instruction, input, response). The input of a diff task is the hunk with its +/-
markers (``representation="diff"``) or the old and new code side by side ("oldnew"), the
input representation the paper ablates. Too long an example loses the start of its input,
never the end of the hunk nor the response; the loss covers the response tokens only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, Dataset

from core.errors import OmniPeftError

TASKS = ("necessity", "comment", "refine", "codegen")
REPRESENTATIONS = ("diff", "oldnew")
SPLITS = ("train", "valid", "test")
DATA_FORMATS = ("codereviewer", "tufano", "tufano_tsv")
IGNORE = -100
HUNK_HEADER = re.compile(r"^@@ -\d+(,\d+)? \+\d+(,\d+)? @@")

PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)
INSTRUCTIONS = {
    "necessity": "Determine whether the provided diff hunk requires a code review comment. "
    "Respond with 'yes' or 'no'.",
    "comment": "Review the given diff hunk and write a code review comment.",
    "refine": "Refine the given code according to the code review comment.",
    "codegen": "Complete the given Python function.",
}
# Fields each task reads; files per (task, split) as the release names them.
FIELDS = {
    "necessity": ("patch", "y"),
    "comment": ("patch", "msg"),
    "refine": ("old", "comment", "new"),
    "codegen": ("prompt", "test"),
}
FOLDERS = {
    "necessity": ("Diff_Quality_Estimation", "cls"),
    "comment": ("Comment_Generation", "msg"),
    "refine": ("Code_Refinement", "ref"),
}


class DatasetError(OmniPeftError, ValueError):
    """A data file, line or field is missing or malformed."""


# --- files and records ----------------------------------------------------------------


def split_files(root: str | Path, task: str, split: str) -> list[Path]:
    """The release's file(s) for ``task`` and ``split`` (train of necessity is chunked)."""
    _check_choice("task", task, TASKS)
    _check_choice("split", split, SPLITS)
    root = Path(root)
    if task == "codegen":
        files = [root / f"codegen-{split}.jsonl"]
    else:
        folder, prefix = FOLDERS[task]
        base = root / folder if (root / folder).is_dir() else root
        files = sorted(base.glob(f"{prefix}-{split}-chunk-*.jsonl")) if split == "train" else []
        files = files or [base / f"{prefix}-{split}.jsonl"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetError(
            f"{missing[0]} does not exist. For task {task!r} the CodeReviewer release holds "
            f"{_layout(task)}; point --data.root at the folder holding it."
        )
    return files


def _layout(task: str) -> str:
    if task == "codegen":
        return "codegen-{train,valid,test}.jsonl (prompt, test, entry_point)"
    folder, prefix = FOLDERS[task]
    return f"{folder}/{prefix}-{{train,valid,test}}.jsonl"


def read_jsonl(path: Path, task: str) -> list[dict[str, Any]]:
    """Records of one file, each checked for the task's fields; errors name file:line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                records.append(parse_record(line, task, f"{path}:{number}"))
    if not records:
        raise DatasetError(f"{path} holds no records.")
    return records


def parse_record(line: str, task: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    for field in FIELDS[task]:
        if field not in record or record[field] is None:
            raise DatasetError(
                f"{where}: missing field {field!r}; task {task!r} needs {list(FIELDS[task])}."
            )
    if task == "necessity":
        record["y"] = _label(record, where)
    if task in ("necessity", "comment") and not HUNK_HEADER.match(record["patch"]):
        raise DatasetError(f"{where}: field 'patch' must start with '@@ -a,b +c,d @@'.")
    record["_where"] = where
    return record


def _label(record: dict[str, Any], where: str) -> int:
    y = record["y"]
    if y not in (0, 1) or isinstance(y, float) and not y.is_integer():
        raise DatasetError(f"{where}: field 'y' must be 0 or 1, got {y!r}.")
    if str(record.get("msg") or "").strip() and int(y) != 1:
        raise DatasetError(f"{where}: a non-empty 'msg' means y = 1, but y is {y!r}.")
    return int(y)


# --- input representations --------------------------------------------------------------


def strip_markers(code: str) -> str:
    """Drop the leading diff-marker character (' ', '+', '-') of every line."""
    return "\n".join(line[1:] if line[:1] in " +-" else line for line in code.split("\n"))


def old_and_new(patch: str) -> tuple[str, str]:
    """The old and new code of a hunk: context and '-' lines, context and '+' lines."""
    old, new = [], []
    for line in patch.split("\n")[1:]:
        marker, text = line[:1], line[1:]
        if marker in (" ", "-"):
            old.append(text)
        if marker in (" ", "+"):
            new.append(text)
    return "\n".join(old), "\n".join(new)


def render_input(record: dict[str, Any], task: str, representation: str = "diff") -> str:
    """The prompt's input part for ``record``."""
    if task in ("necessity", "comment"):
        if representation == "diff":
            return record["patch"]
        old, new = old_and_new(record["patch"])
        return f"Old code:\n{old}\nNew code:\n{new}"
    if task == "refine":
        code = _code(record, "old")
        comment = record["comment"]
        return f"Code:\n{code}\nReview comment:\n{comment}" if comment else f"Code:\n{code}"
    return record["prompt"]


def _code(record: dict[str, Any], field: str) -> str:
    """A refinement record's code; CodeReviewer's lines carry a diff-marker column,
    Tufano et al.'s (``_plain``) do not."""
    return record[field] if record.get("_plain") else strip_markers(record[field])


def response(record: dict[str, Any], task: str) -> str:
    """The target text (empty for a codegen record without a reference solution)."""
    if task == "necessity":
        return "yes" if record["y"] == 1 else "no"
    if task == "comment":
        return record["msg"]
    if task == "refine":
        return _code(record, "new")
    return record.get("canonical_solution") or ""


def prompt_parts(task: str, text: str) -> tuple[str, str, str]:
    """(head, input, tail) of the Alpaca template; truncation cuts ``input`` only."""
    head = f"{PREAMBLE}### Instruction:\n{INSTRUCTIONS[task]}\n\n### Input:\n"
    return head, text, "\n\n### Response:\n"


def render_prompt(record: dict[str, Any], task: str, representation: str = "diff") -> str:
    return "".join(prompt_parts(task, render_input(record, task, representation)))


# --- tokenisation ------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int


def encode(
    tokenizer, task: str, text: str, target: str, max_length: int, *, with_response: bool = True
) -> Encoded:
    """[bos] head + input (cut from the left to fit) + tail [+ response + eos]; labels are
    -100 outside the response. The response is cut only when it alone exceeds the budget."""
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, body, tail = (ids(p) for p in prompt_parts(task, text))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    answer = ids(target) + [tokenizer.eos_token_id] if with_response else []
    fixed = len(bos) + len(head) + len(tail)
    if fixed + 1 > max_length:
        raise DatasetError(
            f"max_length {max_length} cannot hold the {fixed}-token prompt template; raise it."
        )
    answer = answer[: max_length - fixed - 1]
    room = max_length - fixed - len(answer)
    body = body[len(body) - room :] if len(body) > room else body
    prompt = bos + head + body + tail
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, len(prompt))


class ReviewDataset(Dataset):
    """Encoded examples of one split; an item is a dict with ``input_ids``, ``labels``,
    ``prompt_ids`` (the prompt alone, for generation) and ``index``."""

    def __init__(self, records, task, tokenizer, max_length=512, representation="diff"):
        self.records, self.task = list(records), task
        self.tokenizer, self.max_length, self.representation = tokenizer, max_length, representation

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        text = render_input(record, self.task, self.representation)
        enc = encode(self.tokenizer, self.task, text, response(record, self.task), self.max_length)
        return {
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "prompt_ids": enc.input_ids[: enc.prompt_len],
            "index": index,
        }


def pad(rows: Sequence[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(width - len(row), width) if left else slice(0, len(row))
            out[i, span] = torch.tensor(row)
    return out


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training tensors plus left-padded prompts for generation."""
    ids = pad([it["input_ids"] for it in items], pad_id)
    lengths = torch.tensor([len(it["input_ids"]) for it in items])
    prompts = pad([it["prompt_ids"] for it in items], pad_id, left=True)
    plen = torch.tensor([len(it["prompt_ids"]) for it in items])
    return {
        "input_ids": ids,
        "attention_mask": (torch.arange(ids.shape[1]) < lengths[:, None]).long(),
        "labels": pad([it["labels"] for it in items], IGNORE),
        "prompt_ids": prompts,
        "prompt_mask": (torch.arange(prompts.shape[1]) >= prompts.shape[1] - plen[:, None]).long(),
        "index": torch.tensor([it["index"] for it in items]),
    }


# --- the data module -----------------------------------------------------------------------


class CodeReviewDataModule(lightning.LightningDataModule):
    """One CodeReviewer task (or a codegen file) as instruction-tuning batches.

    Args:
        root: the release's folder (holding Diff_Quality_Estimation/ etc.) or a task folder.
        task: "necessity", "comment", "refine" or "codegen".
        tokenizer: "byte" or a local path / hub id (linked from the model by the CLI).
        representation: "diff" (hunk with +/- markers) or "oldnew" (old and new code).
        max_length: tokens per example; the input is cut from its start to fit.
        batch_size / eval_batch_size / num_workers: loader settings.
        limit: use only the first ``limit`` records of each split (quick runs).
        data_format: "codereviewer" (the release above), or for task "refine" the data of
            Tufano et al.: "tufano" (``{split}.buggy-fixed.buggy/.fixed`` line pairs, as
            CodeXGLUE code refinement) or "tufano_tsv" (``{train,val,test}.tsv``); see
            ``nlp.tufano``.
    """

    def __init__(
        self,
        root: str,
        task: str = "comment",
        tokenizer: str = "byte",
        representation: str = "diff",
        max_length: int = 512,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        limit: int | None = None,
        data_format: str = "codereviewer",
    ) -> None:
        super().__init__()
        _check_choice("task", task, TASKS)
        _check_choice("representation", representation, REPRESENTATIONS)
        _check_format(data_format, task)
        self.save_hyperparameters()
        self.datasets: dict[str, ReviewDataset] = {}

    def records(self, split: str) -> list[dict[str, Any]]:
        hp = self.hparams
        if hp.data_format == "codereviewer":
            files = split_files(hp.root, hp.task, split)
            out = [r for f in files for r in read_jsonl(f, hp.task)]
        else:
            from .tufano import read_split

            out = read_split(hp.root, split, hp.data_format)
        return out[: hp.limit] if hp.limit else out

    def setup(self, stage: str | None = None) -> None:
        from .tokenizer import load_tokenizer

        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        wanted = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",)}
        for split in wanted.get(stage, SPLITS):
            if split not in self.datasets:
                self.datasets[split] = ReviewDataset(
                    self.records(split), hp.task, self.tokenizer, hp.max_length, hp.representation
                )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            self.datasets[split],
            batch_size=hp.batch_size if shuffle else hp.eval_batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            collate_fn=lambda items: collate(items, self.tokenizer.pad_token_id),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def _check_format(data_format: str, task: str) -> None:
    _check_choice("data_format", data_format, DATA_FORMATS)
    if data_format != "codereviewer" and task != "refine":
        raise DatasetError(
            f"data_format {data_format!r} (Tufano et al.) holds code refinement only; use "
            f"task 'refine', or data_format 'codereviewer' for task {task!r}."
        )


def read_records(path: str | Path, task: str, data_format: str = "codereviewer") -> list[dict]:
    """The records of one input file in ``data_format`` (``nlp.generate``)."""
    _check_format(data_format, task)
    if data_format == "codereviewer":
        return read_jsonl(Path(path), task)
    from .tufano import read_file

    return read_file(path, data_format)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise DatasetError(f"{name} must be one of {list(choices)}, got {value!r}.")


def write_jsonl(path: str | Path, records: Iterator[dict[str, Any]] | list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path
