"""Med-VQA with a multimodal LLM in the PeFoMed shape (He et al., 2024, "PeFoMed:
Parameter Efficient Fine-tuning of Multimodal Large Language Models for Medical Imaging").

A frozen ViT (timm, or an open_clip tower such as BiomedCLIP; PeFoMed: EVA-ViT-g at
448 px) encodes the image; every 4 adjacent patch tokens are concatenated (MiniGPT-v2's
token merge, ``medical.vqa_vision``) and a trainable Linear projects them into the
embedding space of a LLaMA-style decoder from transformers (Llama-2-7b-chat in
the paper) that LoRA (r=64, alpha=16, dropout 0.05 on q_proj and v_proj) adapts. Answers
come from ``generate`` (KV cache, greedy or beam search). Two stages as in the paper:
caption pre-alignment (``--data.dataset captions``), then VQA starting from the saved
adapter (``--model.init_adapter <stage 1 log dir>/adapter``).

    python -m medical.vqa fit --config configs/medical/vqa_lora.yaml \\
        --data.root /data/VQA_RAD --data.dataset vqa-rad --model.llm /weights/Llama-2-7b-chat-hf

``test`` writes ``vqa_predictions.jsonl`` and ``vqa_report.json`` (closed accuracy, open
recall / F1, BLEU-1, per answer type and overall) in the log folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from core.domain import PeftCLI
from core.errors import ConfigError
from core.lightning import MethodArg, PeftModule

from .metrics import vqa_scores
from .vqa_data import VQADataModule
from .vqa_vision import build_vision, merge_tokens

IMAGE_SLOT = "<ImageHere>"
TEMPLATES = {
    "vqa": "[INST] <Img>" + IMAGE_SLOT + "</Img> [vqa] Based on the image, respond to this "
    "question with a short answer: {question} [/INST]",
    "caption": "[INST] <Img>"
    + IMAGE_SLOT
    + "</Img> [caption] Briefly describe this image. [/INST]",
}


class MedVQAModel(nn.Module):
    """Vision tower -> token merge -> projector -> LLaMA decoder.

    ``vision`` maps images to patch tokens (B, N, width) and has a ``width`` attribute
    (``medical.vqa_vision``: a timm ViT or an open_clip tower).
    """

    def __init__(self, vision: nn.Module, llm: nn.Module, tokenizer: Any, merge: int = 4) -> None:
        super().__init__()
        self.vision, self.llm, self.tokenizer, self.merge = vision, llm, tokenizer, merge
        width = vision.width * merge
        self.projector = nn.Linear(width, llm.get_input_embeddings().embedding_dim)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N / merge, hidden): patch tokens, ``merge`` adjacent ones concatenated."""
        return self.projector(merge_tokens(self.vision(images), self.merge))

    def _embed(self, text: str, bos: bool) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos:
            ids = [self.tokenizer.bos_token_id, *ids]
        device = self.llm.get_input_embeddings().weight.device
        return self.llm.get_input_embeddings()(torch.tensor(ids, device=device, dtype=torch.long))

    def assemble(self, images, prompts, answers=None):
        """(embeds, attention mask, labels): prompt | image | prompt | answer+eos, padded
        right for training (labels only on the answer) and left for generation."""
        visual = self.image_tokens(images)
        rows, labels = [], []
        for k, prompt in enumerate(prompts):
            before, after = prompt.split(IMAGE_SLOT)
            parts = [self._embed(before, bos=True), visual[k], self._embed(after, bos=False)]
            prefix = sum(p.shape[0] for p in parts)
            label = [-100] * prefix
            if answers is not None:
                ids = self.tokenizer(" " + answers[k], add_special_tokens=False)["input_ids"]
                ids = [*ids, self.tokenizer.eos_token_id]
                parts.append(
                    self.llm.get_input_embeddings()(torch.tensor(ids, device=visual.device))
                )
                label += ids
            rows.append(torch.cat(parts))
            labels.append(torch.tensor(label, device=visual.device))
        return _pad(rows, labels, left=answers is None)

    def forward(self, images, prompts, answers) -> torch.Tensor:
        embeds, mask, labels = self.assemble(images, prompts, answers)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens: int = 16, num_beams: int = 1) -> list[str]:
        embeds, mask, _ = self.assemble(images, prompts)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def _pad(rows, labels, left: bool):
    length = max(r.shape[0] for r in rows)
    width = rows[0].shape[1]
    embeds = rows[0].new_zeros(len(rows), length, width)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    target = torch.full((len(rows), length), -100, dtype=torch.long, device=rows[0].device)
    for k, (row, label) in enumerate(zip(rows, labels, strict=True)):
        span = slice(length - row.shape[0], length) if left else slice(0, row.shape[0])
        embeds[k, span], mask[k, span], target[k, span] = row, 1, label
    return embeds, mask, target


def load_llm(path: str, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """LlamaForCausalLM (or any causal LM) and its tokenizer from a local folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), tokenizer


class MedVQAModule(PeftModule):
    """Med-VQA fine-tuning: LoRA on the LLM, the projector trained, the vision tower frozen.

    Args:
        method: the method config (LoRA r=64, alpha=16, dropout 0.05 on q_proj, v_proj).
        llm: local folder or hub id of the LLaMA-style decoder and its tokenizer.
        llm_dtype: torch dtype name for the LLM weights (e.g. "bfloat16"), or None.
        vision: the frozen tower: a timm ViT name, or an open_clip vision tower as
            ``open_clip:<arch>[:<tag>]``, ``open_clip:hf-hub:<org>/<repo>`` (BiomedCLIP) or
            ``open_clip:local-dir:/folder``; vision_kwargs go to ``timm.create_model`` or
            ``open_clip.create_model`` (e.g. a ``vision_cfg``), vision_checkpoint is a local
            weights file, vision_pretrained false builds it random on purpose.
        image_size: input side (linked from the data module).
        merge: adjacent patch tokens concatenated before the projection (PeFoMed: 4).
        max_new_tokens, num_beams: generation settings.
        init_seed: seed of the projector's (and a random tower's) initialisation.
    """

    def __init__(
        self,
        method: MethodArg | None = None,
        llm: str = "meta-llama/Llama-2-7b-chat-hf",
        llm_dtype: str | None = None,
        vision: str = "eva_giant_patch14_560.m30m_ft_in22k_in1k",
        vision_kwargs: dict[str, Any] | None = None,
        vision_pretrained: bool = True,
        vision_checkpoint: str | None = None,
        image_size: int = 448,
        merge: int = 4,
        max_new_tokens: int = 16,
        num_beams: int = 1,
        init_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if method is None:
            raise ConfigError("MedVQAModule needs a method (e.g. configs/medical/vqa_lora.yaml).")
        super().__init__(method, **kwargs)
        self._predictions: dict[str, list[dict[str, Any]]] = {"val": [], "test": []}
        self.report: dict[str, Any] | None = None

    def build_model(self) -> nn.Module:
        import dataclasses

        hp = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.init_seed)
            vision = build_vision(
                hp.vision,
                hp.image_size,
                hp.vision_pretrained,
                hp.vision_checkpoint,
                dict(hp.vision_kwargs or {}),
            )
            llm, tokenizer = load_llm(hp.llm, hp.llm_dtype)
            model = MedVQAModel(vision, llm, tokenizer, hp.merge)
        saved = tuple(self.method.modules_to_save or ())
        if "projector" not in saved:
            self.method = dataclasses.replace(self.method, modules_to_save=(*saved, "projector"))
            self.save_hyperparameters({"method": self.method_spec()})
        return model

    def prompts(self, batch: dict[str, Any]) -> list[str]:
        return [
            TEMPLATES[t].format(question=q)
            for t, q in zip(batch["task"], batch["question"], strict=True)
        ]

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(batch["image"], self.prompts(batch), batch["answer"])

    def _evaluate(self, stage: str, batch: dict[str, Any]) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log(f"{stage}_loss", loss, batch_size=len(batch["answer"]))
        answers = self.model.generate(
            batch["image"], self.prompts(batch), self.hparams.max_new_tokens, self.hparams.num_beams
        )
        for k, prediction in enumerate(answers):
            self._predictions[stage].append(
                {
                    "question": batch["question"][k],
                    "answer": batch["answer"][k],
                    "prediction": prediction,
                    "answer_type": batch["answer_type"][k],
                }
            )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate("test", batch)

    def _scores(self, stage: str) -> dict[str, float]:
        rows = self._predictions[stage]
        scores = vqa_scores(
            [r["prediction"] for r in rows],
            [r["answer"] for r in rows],
            [r["answer_type"] for r in rows],
        )
        for key in (
            "overall_accuracy",
            "closed_accuracy",
            "open_recall",
            "open_f1",
            "overall_bleu1",
        ):
            if key in scores:
                self.log(f"{stage}_{key}", scores[key])
        return scores

    def on_validation_epoch_end(self) -> None:
        if self._predictions["val"]:
            self._scores("val")
            self._predictions["val"] = []

    def on_test_epoch_end(self) -> None:
        if not self._predictions["test"]:
            return
        self.report = self._scores("test")
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        lines = "\n".join(json.dumps(r) for r in self._predictions["test"])
        (folder / "vqa_predictions.jsonl").write_text(lines + "\n")
        (folder / "vqa_report.json").write_text(json.dumps(self.report, indent=2))
        self.test_predictions = self._predictions["test"]
        self._predictions["test"] = []


class VQACLI(PeftCLI):
    """LightningCLI over ``MedVQAModule`` and ``VQADataModule``."""

    model_class = MedVQAModule
    datamodule_class = VQADataModule
    max_epochs = 10

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.image_size", "model.image_size")


def write_tiny_llama(
    folder: str | Path, texts: list[str], hidden: int = 64, layers: int = 2, seed: int = 0
) -> Path:
    """A random LLaMA (tests, demo) with a word-level tokenizer over ``texts``, saved with
    ``save_pretrained`` so it loads through the same ``from_pretrained`` path as real weights."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {w: i for i, w in enumerate(specials + words)}
    core_tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core_tok.normalizer = __import__("tokenizers").normalizers.Lowercase()
    core_tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core_tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # The final RMSNorm (frozen) fixes the hidden norm at sqrt(hidden); with the default
    # 0.02-std head the logits then stay within about +-1.3, so no adapter below the head
    # can make an answer likely. A pretrained head has large rows; std 0.2 stands in for it.
    torch.nn.init.normal_(model.lm_head.weight, std=0.2)
    model.save_pretrained(folder)
    return folder


def main(args: list[str] | None = None) -> VQACLI:
    return VQACLI(args=args)


if __name__ == "__main__":
    main()
