"""Med-VQA: the VQA-RAD / SLAKE / PathVQA readers on generated folders, and a fit of the
PeFoMed-shaped model (tiny timm ViT + tiny LLaMA built from configs) with generation,
metrics, adapter-only checkpoints and the two-stage continuation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from med_toy import QUIET

from core.checkpoint import read_checkpoint
from medical.data import DatasetError
from medical.vqa import TEMPLATES, VQACLI, write_tiny_llama
from medical.vqa_data import (
    VQADataModule,
    read_pathvqa,
    read_slake,
    read_vqa_rad,
)
from medical.vqa_synthetic import (
    vocabulary_texts,
    write_captions,
    write_pathvqa,
    write_slake,
    write_vqa_rad,
)

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "medical"


def test_vqa_rad_split_by_phrase_type_without_leak(tmp_path):
    root = write_vqa_rad(tmp_path, images=6, test_images=2)
    splits = read_vqa_rad(root)
    assert len(splits["test"]) == 8
    assert len(splits["train_val"]) == 4 * 4 + 1  # the leaked test question is dropped
    test_keys = {(q.image.name, q.question) for q in splits["test"]}
    assert not any((q.image.name, q.question) in test_keys for q in splits["train_val"])
    numeric = next(q for q in splits["train_val"] if q.question.startswith("how many"))
    assert numeric.answer == "2" and numeric.answer_type == "OPEN"
    assert {q.answer_type for q in splits["test"]} == {"CLOSED", "OPEN"}


def test_vqa_rad_bad_field_names_the_entry(tmp_path):
    root = write_vqa_rad(tmp_path, images=2, test_images=1)
    path = root / "VQA_RAD Dataset Public.json"
    entries = json.loads(path.read_text())
    del entries[3]["question"]
    path.write_text(json.dumps(entries))
    with pytest.raises(
        DatasetError, match=r"VQA_RAD Dataset Public.json\[3\]: missing field 'question'"
    ):
        read_vqa_rad(root)


def test_slake_keeps_english_by_default(tmp_path):
    root = write_slake(tmp_path, images=3)
    assert {k: len(v) for k, v in read_slake(root).items()} == {"train": 12, "val": 12, "test": 12}
    assert len(read_slake(root, language="")["train"]) == 15
    item = read_slake(root)["train"][0]
    assert item.image.is_file() and item.image.parent.name == "xmlabtrain0"


def test_pathvqa_reads_the_question_pickles(tmp_path):
    root = write_pathvqa(tmp_path, images=2)
    splits = read_pathvqa(root)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "val": 8, "test": 8}
    item = splits["test"][0]
    assert item.image.is_file() and item.image.parent.name == "test"
    assert item.answer in ("yes", "no") and item.answer_type == "CLOSED"


@pytest.mark.parametrize(
    ("content", "found"),
    [({"image": "x"}, "it holds a dict"), ([{"image": "x"}, "oops"], "entry 1 is a str")],
)
def test_pathvqa_question_file_of_the_wrong_shape_names_what_it_holds(tmp_path, content, found):
    root = write_pathvqa(tmp_path, images=1)
    target = root / "pvqa" / "qas" / "val" / "val_qa.json"  # preferred over the pickle
    target.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=rf"val_qa\.json: expected a list .* but {found}"):
        read_pathvqa(root)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("vqa")
    llama = write_tiny_llama(base / "llama", vocabulary_texts())
    common = [
        "--config",
        str(CONFIGS / "vqa_demo.yaml"),
        "--model.llm",
        str(llama),
        "--trainer.max_epochs",
        "1",
        "--trainer.check_val_every_n_epoch",
        "1",
        *QUIET,
    ]
    stage1 = VQACLI(
        args=[
            *common,
            "--data.root",
            str(write_captions(base / "cap", images=8)),
            "--data.dataset",
            "captions",
            "--trainer.default_root_dir",
            str(base / "s1"),
        ],
        run=False,
    )
    stage1.trainer.fit(stage1.model, datamodule=stage1.datamodule)
    adapter = Path(stage1.trainer.log_dir) / "adapter"
    stage2 = VQACLI(
        args=[
            *common,
            "--data.root",
            str(write_vqa_rad(base / "rad", images=8, test_images=2)),
            "--model.init_adapter",
            str(adapter),
            "--trainer.default_root_dir",
            str(base / "s2"),
        ],
        run=False,
    )
    start = {k: v.clone() for k, v in stage2.model.adapter_state_dict().items()}
    stage2.trainer.fit(stage2.model, datamodule=stage2.datamodule)
    results = stage2.trainer.test(stage2.model, datamodule=stage2.datamodule)
    return stage1, stage2, start, results


def test_stage_two_starts_from_stage_one_adapter(stage_runs):
    stage1, _, start, _ = stage_runs
    trained = stage1.model.adapter_state_dict()
    assert set(trained) == set(start)
    assert all(torch.equal(trained[k], start[k]) for k in trained)
    assert any("projector" in k for k in trained) and any("q_proj" in k for k in trained)


def test_vqa_fit_generates_and_scores(stage_runs):
    _, stage2, _, results = stage_runs
    log_dir = Path(stage2.trainer.log_dir)
    report = json.loads((log_dir / "vqa_report.json").read_text())
    predictions = [
        json.loads(line) for line in (log_dir / "vqa_predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 8 and report["overall_count"] == 8
    assert {"closed_accuracy", "open_recall", "open_f1", "overall_bleu1"} <= set(report)
    assert results[0]["test_overall_accuracy"] == pytest.approx(report["overall_accuracy"])
    assert all(isinstance(p["prediction"], str) for p in predictions)


def test_vqa_checkpoint_is_adapter_only_and_vision_frozen(stage_runs):
    _, stage2, _, _ = stage_runs
    model = stage2.model
    assert not any(p.requires_grad for p in model.model.vision.parameters())
    assert all(p.requires_grad for p in model.model.projector.parameters())
    ckpt = next(Path(stage2.trainer.log_dir).rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("embed_tokens" in k or "vision" in k for k in state)
    meta, tensors = read_checkpoint(Path(stage2.trainer.log_dir) / "adapter")
    assert meta["config"]["r"] == 16 and "q_proj" in meta["config"]["targets"]


def test_token_merge_template_and_beam_generation(stage_runs):
    _, stage2, _, _ = stage_runs
    model = stage2.model.model.eval()
    images = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1)
    tokens = model.image_tokens(images)
    assert tokens.shape == (2, 16 // 4, model.llm.config.hidden_size)  # 4x4 patches merged by 4
    prompts = [TEMPLATES["vqa"].format(question="which organ is shown?")] * 2
    assert "[vqa] Based on the image, respond to this question with a short answer:" in prompts[0]
    greedy = model.generate(images, prompts, max_new_tokens=3)
    beams = model.generate(images, prompts, max_new_tokens=3, num_beams=2)
    assert len(greedy) == len(beams) == 2 and greedy[0] == greedy[1]
    embeds, mask, labels = model.assemble(images, prompts, ["liver", "left lung"])
    answer_ids = labels[labels != -100]
    assert answer_ids.numel() == 1 + 1 + 2 + 1  # liver </s> left lung </s>
    assert mask.sum(1)[1] - mask.sum(1)[0] == 1


def test_vqa_datamodule_rejects_unknown_dataset():
    with pytest.raises(DatasetError, match="vqa-rad"):
        VQADataModule(dataset="vqarad")


def test_vqa_image_that_fails_to_decode_names_file_and_question(tmp_path):
    from medical.vqa_data import VQADataset

    root = write_vqa_rad(tmp_path, images=2, test_images=1)
    question = read_vqa_rad(root)["test"][0]
    question.image.write_bytes(b"\xff\xd8 not a jpeg")
    expected = re.escape(f"{question.source}: {question.image.name} cannot be decoded")
    with pytest.raises(DatasetError, match=expected):
        VQADataset([question], 32)[0]
