"""PathVQA's question pickles: the restricted reader refuses every global before anything
runs (hand-written opcode streams, so this test imports no pickle module), the writer
only writes plain data, and the conversion command writes JSON the loader then reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medical.data import DatasetError
from medical.pathvqa_pickle import (
    check_plain,
    convert_pathvqa,
    main,
    read_plain_pickle,
    write_plain_pickle,
)
from medical.vqa_data import read_pathvqa
from medical.vqa_synthetic import write_pathvqa

ROOT = Path(__file__).resolve().parents[2]


def _short(text: str) -> bytes:
    """SHORT_BINUNICODE: opcode, one length byte, UTF-8 bytes."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def reduce_global_protocol0(module: str, name: str, argument: str) -> bytes:
    """``module.name(argument)`` as GLOBAL, MARK, STRING, TUPLE, REDUCE, STOP (protocol 0),
    what ``pickle.dumps`` writes for an object whose ``__reduce__`` returns that call."""
    return f"c{module}\n{name}\n(S'{argument}'\ntR.".encode()


def reduce_stack_global_protocol4(module: str, name: str, argument: str) -> bytes:
    """The same call with protocol 4's STACK_GLOBAL and TUPLE1."""
    return b"\x80\x04" + _short(module) + _short(name) + b"\x93" + _short(argument) + b"\x85R."


@pytest.mark.parametrize("encode", [reduce_global_protocol0, reduce_stack_global_protocol4])
@pytest.mark.parametrize(("module", "name"), [("os", "system"), ("posix", "system")])
def test_a_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path, encode, module, name):
    marker = tmp_path / "ran"
    evil = tmp_path / "train_qa.pkl"
    evil.write_bytes(encode(module, name, f"touch {marker}"))
    with pytest.raises(DatasetError) as caught:
        read_plain_pickle(evil)
    message = str(caught.value)
    assert str(evil) in message and f"asks for {module}.{name}" in message
    assert "nothing was run" in message
    assert not marker.exists()


def test_builtins_and_container_classes_are_refused_too(tmp_path):
    for module, name in (("builtins", "eval"), ("collections", "OrderedDict")):
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(reduce_stack_global_protocol4(module, name, "1"))
        with pytest.raises(DatasetError, match=rf"asks for {module}\.{name}"):
            read_plain_pickle(path)


def test_a_persistent_reference_is_refused(tmp_path):
    path = tmp_path / "train_qa.pkl"
    path.write_bytes(b"Pobject-1\n.")  # PERSID (protocol 0), STOP
    with pytest.raises(DatasetError, match=r"train_qa\.pkl: the pickle refers to a persistent"):
        read_plain_pickle(path)


def test_a_tampered_question_file_stops_the_pathvqa_loader(tmp_path):
    root = write_pathvqa(tmp_path, images=1)
    target = root / "pvqa" / "qas" / "val" / "val_qa.pkl"
    target.write_bytes(reduce_global_protocol0("os", "system", "true"))
    with pytest.raises(DatasetError, match=r"val_qa\.pkl: the pickle asks for os\.system"):
        read_pathvqa(root)


def test_truncated_and_non_pickle_files_are_named(tmp_path):
    path = tmp_path / "test_qa.pkl"
    path.write_bytes(b"\x80\x04\x8c\x05ab")
    with pytest.raises(DatasetError, match=r"test_qa\.pkl: not a readable pickle"):
        read_plain_pickle(path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_plain_pickle(tmp_path / "missing.pkl")


def test_plain_data_round_trips_and_the_writer_refuses_objects(tmp_path):
    data = [{"image": "train_0000", "question": "is it left?", "answer": "yes", "n": 2.5}]
    path = write_plain_pickle(data, tmp_path / "train_qa.pkl")
    assert read_plain_pickle(path) == data
    with pytest.raises(DatasetError, match=r"data\[0\]\['when'\] is a PosixPath"):
        check_plain([{"when": Path("x")}])
    with pytest.raises(DatasetError, match="non-string key 1"):
        write_plain_pickle({1: "a"}, tmp_path / "bad.pkl")
    assert not (tmp_path / "bad.pkl").exists()


def test_conversion_writes_json_the_loader_then_reads(tmp_path, capsys):
    root = write_pathvqa(tmp_path, images=2)
    before = read_pathvqa(root)
    assert main(["--root", str(root)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and all(line.endswith("_qa.json") for line in printed)
    for pickled in (root / "pvqa" / "qas").rglob("*_qa.pkl"):
        assert json.loads(pickled.with_suffix(".json").read_text()) == read_plain_pickle(pickled)
        pickled.unlink()  # the loader must now read the JSON
    after = read_pathvqa(root)
    assert [(q.question, q.answer) for q in after["train"]] == [
        (q.question, q.answer) for q in before["train"]
    ]
    with pytest.raises(DatasetError, match=r"no \*_qa\.pkl under"):
        convert_pathvqa(root)


def test_conversion_command_refuses_a_tampered_file(tmp_path, capsys):
    root = write_pathvqa(tmp_path, images=1)
    evil = root / "pvqa" / "qas" / "test" / "test_qa.pkl"
    evil.write_bytes(reduce_global_protocol0("os", "system", f"touch {tmp_path / 'ran'}"))
    assert main(["--root", str(root)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "test_qa.pkl: the pickle asks for os.system" in error
    assert not (tmp_path / "ran").exists()


def test_only_one_module_of_the_medical_domain_imports_pickle():
    users = [
        path.relative_to(ROOT).as_posix()
        for folder in ("medical", "tests/medical")
        for path in (ROOT / folder).rglob("*.py")
        if any(
            line.strip() in ("import pickle", "import _pickle") or line.startswith("from pickle")
            for line in path.read_text().splitlines()
        )
    ]
    assert users == ["medical/pathvqa_pickle.py"]
