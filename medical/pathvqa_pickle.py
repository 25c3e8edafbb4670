"""PathVQA's question pickles: the one place the project reads a pickle, and the only
module that imports ``pickle``.

PathVQA (He et al., 2020) ships its questions as ``qas/{split}/{split}_qa.pkl``: a list of
dicts of strings. Unpickling can run arbitrary code (a ``__reduce__`` naming ``os.system``),
so the reader here refuses every global the stream asks for: plain lists, dicts, tuples,
strings, numbers, booleans and None load; any class or function is an error before it is
looked up, so nothing runs. Convert once to JSON and the loader prefers the JSON:

    python -m medical.pathvqa_pickle --root /data/pvqa

writes ``{split}_qa.json`` beside every ``{split}_qa.pkl`` under the root. The writer is for
the generated PathVQA folders of the tests and demo; it checks the data is plain first.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
from pathlib import Path
from typing import Any

from .data import DatasetError

PLAIN_SCALARS = (str, int, float, bool, type(None))


class PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers and scalars only: every global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise DatasetError(
            f"the pickle asks for {module}.{name}; a PathVQA question file holds only lists, "
            "dicts and strings, so it was refused and nothing was run. Replace the file with "
            "the original from PathVQA (it may be tampered with or not a question file)."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(
            "the pickle refers to a persistent object, which a PathVQA question file never "
            "holds, so it was refused. Replace the file with the original from PathVQA."
        )


def read_plain_pickle(path: str | Path) -> Any:
    """The plain data in ``path``, or a ``DatasetError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} does not exist.")
    try:
        return PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}") from None
    except Exception as err:  # truncated or not a pickle at all
        raise DatasetError(
            f"{path}: not a readable pickle ({type(err).__name__}: {err})."
        ) from None


def check_plain(value: Any, where: str = "data") -> None:
    """Raise unless ``value`` is built from lists, tuples, str-keyed dicts and scalars."""
    if isinstance(value, PLAIN_SCALARS):
        return
    if isinstance(value, list | tuple):
        for k, item in enumerate(value):
            check_plain(item, f"{where}[{k}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if not isinstance(key, str):
                raise DatasetError(f"{where} has a non-string key {key!r}.")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise DatasetError(
        f"{where} is a {type(value).__name__}; only lists, dicts, strings and numbers can be "
        "written to a PathVQA question pickle."
    )


def write_plain_pickle(value: Any, path: str | Path) -> Path:
    """Write plain ``value`` as PathVQA does (tests and demo); read back with the reader."""
    check_plain(value)
    path = Path(path)
    path.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def convert_pathvqa(root: str | Path) -> list[Path]:
    """Write ``{split}_qa.json`` beside every ``{split}_qa.pkl`` under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; give the PathVQA root (holding qas/).")
    sources = sorted(root.rglob("*_qa.pkl"))
    if not sources:
        raise DatasetError(f"no *_qa.pkl under {root}; PathVQA keeps them in qas/{{split}}/.")
    written = []
    for path in sources:
        target = path.with_suffix(".json")
        target.write_text(json.dumps(read_plain_pickle(path), ensure_ascii=False))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medical.pathvqa_pickle",
        description="Convert PathVQA's question pickles to JSON (restricted unpickling).",
    )
    parser.add_argument("--root", required=True, help="the PathVQA folder (holding qas/)")
    args = parser.parse_args(argv)
    try:
        written = convert_pathvqa(args.root)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
