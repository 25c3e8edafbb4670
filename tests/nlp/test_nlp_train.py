import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nlp_toy import TINY

import core
from nlp import evaluate, generate
from nlp.synth import write_release
from nlp.train import main

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = "configs/nlp"
METHODS = {
    "lora": "review_comment_lora.yaml",
    "llama_adapter": "review_comment_llama_adapter.yaml",
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("cr"), sizes=(8, 4, 4))


def tiny_args(config, root, out, *extra):
    return [
        "--config", f"{CONFIGS}/{config}",
        "--model.backbone", "tiny", "--model.tokenizer", "byte",
        "--model.backbone_config", json.dumps(TINY),
        "--model.max_new_tokens", "4", "--model.warmup_steps", "0",
        "--data.root", str(root), "--data.max_length", "400",
        "--data.batch_size", "2", "--data.eval_batch_size", "2",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.accumulate_grad_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fit_generate_evaluate(tmp_path, release, method):
    cli = main(tiny_args(METHODS[method], release, tmp_path), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and all(".adapters." in k for k in state)  # adapter-only checkpoint
    assert cli.trainer.callback_metrics["val_bleu4"] >= 0
    preds = tmp_path / "preds.jsonl"
    generate.main(
        ["--pretrained", "tiny", "--backbone-config", json.dumps(TINY), "--tokenizer", "byte",
         "--adapter", str(cli.model.exported_adapter), "--task", "comment",
         "--input", str(release / "Comment_Generation" / "msg-test.jsonl"),
         "--output", str(preds), "--max-length", "420", "--max-new-tokens", "6",
         "--batch-size", "2"]
    )  # fmt: skip
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["prediction"], str) for r in rows)
    scores = evaluate.main(["--task", "comment", "--predictions", str(preds)])
    assert set(scores) == {"bleu4", "bleu4_no_stopwords"}


def test_validation_without_decoding_logs_loss_and_perplexity_only(tmp_path, release, monkeypatch):
    from nlp.module import ReviewLM

    def no_generate(*args, **kwargs):
        raise AssertionError("validation must not decode with decode_in_validation=false")

    monkeypatch.setattr(ReviewLM, "generate", no_generate)
    args = tiny_args(METHODS["lora"], release, tmp_path, "--model.decode_in_validation", "false",
                     "--data.eval_batch_size", "1", "--trainer.limit_val_batches", "2")  # fmt: skip
    cli = main(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logged = cli.trainer.callback_metrics
    assert "val_bleu4" not in logged and "val_loss" in logged
    # perplexity over every response token of the epoch, by hand: summed NLL / token count
    # of the two validation batches (of different lengths, so not exp of the mean batch loss)
    model, nll, counts = cli.model.model.eval(), 0.0, []
    with torch.no_grad():
        for batch in list(cli.datamodule.val_dataloader())[:2]:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            targets = batch["labels"][:, 1:].flatten()
            step = logits.logits[:, :-1].flatten(0, 1).float()
            nll += F.cross_entropy(step, targets, ignore_index=-100, reduction="sum").item()
            counts.append(int((targets != -100).sum()))
    assert len(counts) == 2 and counts[0] != counts[1]
    assert float(logged["val_ppl"]) == pytest.approx(math.exp(nll / sum(counts)), rel=1e-4)
    assert float(logged["val_ppl"]) != pytest.approx(math.exp(float(logged["val_loss"])), rel=1e-4)


def test_missing_codebleu_fails_at_model_construction(monkeypatch):
    import sys

    from nlp.metrics import MetricError
    from nlp.module import ReviewLM

    monkeypatch.setitem(sys.modules, "codebleu", None)
    with pytest.raises(MetricError, match="pip install codebleu"):
        ReviewLM(backbone="tiny", backbone_config=TINY, task="refine", extra_metrics=["codebleu"])


def test_resume_continues_from_checkpoint(tmp_path, release):
    first = main(tiny_args(METHODS["lora"], release, tmp_path), run=False)
    first.trainer.fit(first.model, datamodule=first.datamodule)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    trained = first.model.adapter_state_dict()
    second = main(
        tiny_args(METHODS["lora"], release, tmp_path, "--trainer.max_epochs", "2"), run=False
    )
    second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path=str(ckpt))
    assert second.trainer.global_step == 4 and second.trainer.current_epoch == 2
    after = second.model.adapter_state_dict()
    assert any(not torch.equal(trained[k], after[k]) for k in trained)


def test_two_stage_tuning_starts_from_the_first_adapter(tmp_path, release):
    """The paper's ablation: instruction-tune an adapter, then continue on the task."""
    first = main(tiny_args(METHODS["lora"], release, tmp_path / "one"), run=False)
    first.trainer.fit(first.model, datamodule=first.datamodule)
    stage_one = first.model.adapter_state_dict()
    args = tiny_args(METHODS["lora"], release, tmp_path / "two", "--data.task", "refine",
                     "--model.init_adapter", str(first.model.exported_adapter))  # fmt: skip
    second = main(args, run=False)
    second.model.configure_model()
    loaded = second.model.adapter_state_dict()
    assert loaded.keys() == stage_one.keys()
    assert all(torch.equal(loaded[k], stage_one[k]) for k in stage_one)
    second.trainer.fit(second.model, datamodule=second.datamodule)
    after = second.model.adapter_state_dict()
    assert any(not torch.equal(after[k], stage_one[k]) for k in stage_one)


@pytest.mark.parametrize(
    "cfg",
    [
        core.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]),
        core.LlamaAdapter(adapter_len=3, targets=r"model\.layers\.\d+"),
    ],
)
def test_cached_generation_equals_no_cache_greedy_decode(cfg):
    from conftest import randomise
    from nlp.module import load_causal_lm

    model = load_causal_lm("tiny", config=TINY)
    core.inject(model, cfg)
    randomise(model, std=0.3)
    ids = torch.tensor([[0, 0, 7, 8, 9], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cached = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
        use_cache=True, pad_token_id=0, eos_token_id=None,
    )[:, 5:]  # fmt: skip
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(6):
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=seq, attention_mask=m, position_ids=pos, use_cache=False
            ).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(cached, seq[:, 5:])


def _llama7b_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, vocab_size=32000)  # fmt: skip
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_llama7b_trainable_counts_equal_the_formulas():
    import yaml

    from core.lightning import method_from_spec

    for name, expected in (
        ("review_comment_lora.yaml", 32 * 2 * 8 * (4096 + 4096)),
        ("review_comment_llama_adapter.yaml", 10 * 4096 * 30 + 30),
    ):
        spec = yaml.safe_load(Path(CONFIGS, name).read_text())["model"]["method"]
        model = core.inject(_llama7b_meta(), method_from_spec(spec))
        assert _trainable(model) == expected, name
