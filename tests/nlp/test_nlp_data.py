import json

import pytest

from nlp.data import (
    IGNORE,
    CodeReviewDataModule,
    DatasetError,
    collate,
    encode,
    old_and_new,
    read_jsonl,
    read_records,
    render_prompt,
    response,
    split_files,
    strip_markers,
)
from nlp.synth import write_release
from nlp.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")
PATCH = "@@ -1,3 +1,3 @@\n def f(x):\n-    return x == 1\n+    return x is 1"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("cr"), sizes=(12, 4, 4))


def test_byte_tokenizer_round_trips_any_text():
    tok = load_tokenizer("byte")
    text = "def f(x):\n\treturn 'é' + x  # ∑"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, 260)


def test_trained_bpe_round_trips_and_shortens_the_prompts(tmp_path, release):
    from nlp.tokenizer import train_bpe

    records = read_jsonl(split_files(release, "comment", "train")[0], "comment")
    texts = [render_prompt(r, "comment") + response(r, "comment") for r in records]
    tok = load_tokenizer(str(train_bpe(texts, 400, tmp_path / "bpe")))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, 400)
    unseen = "def g(ω):\n\treturn ω  # never in the corpus"
    for text in (texts[0], unseen):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok(texts[0], add_special_tokens=False)["input_ids"]) < len(texts[0].encode()) / 2


def test_synthetic_release_balances_the_defect_kinds(tmp_path):
    from collections import Counter

    from nlp.synth import DEFECTS, make_examples

    examples = make_examples(4 * len(DEFECTS), context=1)
    comments = Counter(e["msg"] for e in examples if e["y"] == 1)
    assert sorted(comments.values()) == [2] * len(DEFECTS)
    assert all(e["patch"].count("\n") == 4 for e in examples)  # header, 1 + - + 1 lines


def test_release_files_parse_per_task(release):
    assert split_files(release, "necessity", "train")[0].name == "cls-train-chunk-0.jsonl"
    cls = read_jsonl(split_files(release, "necessity", "test")[0], "necessity")
    assert {r["y"] for r in cls} == {0, 1}
    assert all((r["y"] == 1) == bool(r["msg"]) for r in cls)
    ref = read_jsonl(split_files(release, "refine", "valid")[0], "refine")
    assert not any(line.startswith(("+", "-")) for line in response(ref[0], "refine").split("\n"))


def test_prompt_template_and_representations():
    record = {"patch": PATCH, "msg": "use =="}
    prompt = render_prompt(record, "comment")
    assert "### Instruction:\nReview the given diff hunk" in prompt
    assert prompt.endswith(f"### Input:\n{PATCH}\n\n### Response:\n")
    assert old_and_new(PATCH) == ("def f(x):\n    return x == 1", "def f(x):\n    return x is 1")
    assert "Old code:\ndef f(x):\n    return x == 1\nNew code:" in render_prompt(
        record, "comment", "oldnew"
    )
    assert strip_markers("-a\n+b\n c") == "a\nb\nc"


def test_labels_mask_the_prompt_and_truncation_keeps_hunk_end_and_response():
    tok = load_tokenizer("byte")
    long_hunk = PATCH + "\n" + "\n".join(f" line{i}" for i in range(200)) + "\n+END_OF_HUNK"
    enc = encode(tok, "comment", long_hunk, "use == here", max_length=400)
    assert len(enc.input_ids) == 400
    answer = tok("use == here", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.labels[enc.prompt_len :] == answer == enc.input_ids[enc.prompt_len :]
    assert set(enc.labels[: enc.prompt_len]) == {IGNORE}
    prompt = tok.decode(enc.input_ids[: enc.prompt_len], skip_special_tokens=True)
    assert "END_OF_HUNK\n\n### Response:\n" in prompt and "### Instruction:" in prompt
    assert "@@ -1,3" not in prompt  # the start of the input went


def test_collate_pads_right_for_training_left_for_prompts():
    items = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "prompt_ids": [5], "index": 0},
        {"input_ids": [8], "labels": [8], "prompt_ids": [8, 9], "index": 1},
    ]
    batch = collate(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["prompt_ids"].tolist() == [[0, 5], [8, 9]]
    assert batch["prompt_mask"].tolist() == [[0, 1], [1, 1]]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"patch": "@@ -1 +1 @@\\n-a", "msg": "x"}', "missing field 'y'"),
        ('{"patch": "@@ -1 +1 @@\\n-a", "y": 0, "msg": "fix"}', "non-empty 'msg' means y = 1"),
        ('{"patch": "diff --git", "y": 1, "msg": "x"}', "must start with '@@"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "cls-test.jsonl"
    good = json.dumps({"patch": PATCH, "y": 1, "msg": "x"})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=message) as err:
        read_jsonl(path, "necessity")
    assert f"{path}:2" in str(err.value)


@pytest.mark.parametrize(
    ("task", "record", "field"),
    [
        ("comment", {"patch": PATCH}, "msg"),
        ("refine", {"old": "-a", "comment": "fix"}, "new"),
        ("codegen", {"prompt": "def f():\n"}, "test"),
    ],
)
def test_each_task_names_its_missing_field(tmp_path, task, record, field):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DatasetError, match=rf"{path}:1: missing field '{field}'"):
        read_jsonl(path, task)


def test_codegen_file_parsed_and_rendered(tmp_path):
    row = {"prompt": "def add(a, b):\n", "test": "assert add(1, 2) == 3", "entry_point": "add",
           "canonical_solution": "    return a + b\n"}  # fmt: skip
    (tmp_path / "codegen-test.jsonl").write_text(json.dumps(row) + "\n")
    (record,) = read_jsonl(split_files(tmp_path, "codegen", "test")[0], "codegen")
    prompt = render_prompt(record, "codegen")
    assert "Complete the given Python function." in prompt
    assert prompt.endswith("### Input:\ndef add(a, b):\n\n\n### Response:\n")
    assert response(record, "codegen") == "    return a + b\n"


def test_missing_release_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="Comment_Generation/msg-"):
        split_files(tmp_path, "comment", "train")


def test_data_module_batches(release):
    dm = CodeReviewDataModule(str(release), task="refine", max_length=512, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    assert (batch["labels"] != IGNORE).sum() > 0


# --- Tufano et al. code refinement ---------------------------------------------------------

BUGGY = [
    "public TYPE_1 METHOD_1 ( ) { return VAR_1 ; }",
    "<code>public void METHOD_2 ( int VAR_2 ) { <START> if ( VAR_2 = 0 ) <END> return ; }"
    "</code><technical_language>use == here</technical_language>",
]
FIXED = [
    "public TYPE_1 METHOD_1 ( ) { return this . VAR_1 ; }",
    "public void METHOD_2 ( int VAR_2 ) { if ( VAR_2 == 0 ) return ; }",
]


def write_tufano(folder, buggy=BUGGY, fixed=FIXED, splits=("train", "valid", "test")):
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"{split}.buggy-fixed.buggy").write_text("\n".join(buggy) + "\n")
        (folder / f"{split}.buggy-fixed.fixed").write_text("\n".join(fixed) + "\n")
    return folder


def test_tufano_parallel_files_become_refinement_examples(tmp_path):
    root = write_tufano(tmp_path / "small")
    dm = CodeReviewDataModule(str(root), task="refine", data_format="tufano", batch_size=2)
    plain, tagged = dm.records("train")
    assert (plain["old"], plain["comment"], plain["new"]) == (BUGGY[0], "", FIXED[0])
    assert tagged["comment"] == "use == here" and tagged["old"].startswith("public void")
    assert "<START> if ( VAR_2 = 0 ) <END>" in tagged["old"]  # the marked span is kept
    assert tagged["_where"].endswith("train.buggy-fixed.buggy:2")
    assert "Review comment:\nuse == here\n\n### Response:\n" in render_prompt(tagged, "refine")
    assert "Review comment" not in render_prompt(plain, "refine")
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    tok = dm.tokenizer
    targets = [tok.decode(row[row != IGNORE], skip_special_tokens=True) for row in batch["labels"]]
    assert targets == FIXED  # the fixed code verbatim, no diff-marker column stripped


def test_tufano_mismatched_line_counts_name_both_files(tmp_path):
    root = write_tufano(tmp_path, fixed=FIXED[:1], splits=("train",))
    with pytest.raises(DatasetError, match="has 2 lines but .* has 1") as err:
        CodeReviewDataModule(str(root), task="refine", data_format="tufano").records("train")
    assert "train.buggy-fixed.buggy" in str(err.value)
    assert "train.buggy-fixed.fixed" in str(err.value)


@pytest.mark.parametrize(
    ("buggy", "message"),
    [
        ([BUGGY[0], "<code>int x ;</code>"], r"buggy:2: a tagged input must be"),
        ([BUGGY[0], "   "], r"buggy:2: empty input"),
    ],
)
def test_tufano_malformed_lines_name_file_and_line(tmp_path, buggy, message):
    root = write_tufano(tmp_path, buggy=buggy, splits=("valid",))
    with pytest.raises(DatasetError, match=message):
        read_records(root / "valid.buggy-fixed.buggy", "refine", "tufano")


def test_tufano_missing_files_and_wrong_task_are_clear_errors(tmp_path):
    write_tufano(tmp_path, splits=("train",))
    (tmp_path / "train.buggy-fixed.fixed").unlink()
    with pytest.raises(DatasetError, match=r"train.buggy-fixed.fixed does not exist"):
        CodeReviewDataModule(str(tmp_path), task="refine", data_format="tufano").records("train")
    with pytest.raises(DatasetError, match="needs its .buggy-fixed.fixed pair"):
        read_records(tmp_path / "train.buggy-fixed.buggy", "refine", "tufano")
    with pytest.raises(DatasetError, match="code refinement only; use task 'refine'"):
        CodeReviewDataModule(str(tmp_path), task="comment", data_format="tufano")
    with pytest.raises(DatasetError, match="data_format must be one of"):
        CodeReviewDataModule(str(tmp_path), task="refine", data_format="csv")


def test_tufano_tsv_release(tmp_path):
    rows = [f"{b}\t{f}" for b, f in zip(BUGGY, FIXED, strict=True)]
    for name in ("train", "val", "test"):
        (tmp_path / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    dm = CodeReviewDataModule(str(tmp_path), task="refine", data_format="tufano_tsv")
    valid = dm.records("valid")  # the release names it val.tsv
    assert [r["new"] for r in valid] == FIXED and valid[1]["comment"] == "use == here"
    (tmp_path / "test.tsv").write_text(rows[0] + "\n" + BUGGY[0] + "\n")
    with pytest.raises(DatasetError, match=r"test.tsv:2: expected 2 tab-separated columns"):
        dm.records("test")
