"""The nlp LightningModule: a transformers causal LM tuned on instruction data
(LLaMA-Reviewer, Lu et al., 2023) with one core method, or fully fine-tuned (method=None).

The loss is the next-token cross-entropy on the response tokens (labels are -100 on the
prompt). Validation and test log that loss and the response perplexity (exp of the
token-weighted mean loss over the epoch), then decode the prompts greedily (left-padded,
KV cache) and score them with the task's metrics (``nlp.metrics.review_scores``);
``decode_in_validation=False`` skips the decoding in validation (teacher-forced loss and
perplexity only, much faster), test always decodes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from core.errors import ConfigError
from core.lightning import MethodArg, PeftModule

from .data import TASKS
from .metrics import check_metrics, review_scores

QUANTIZE = (None, "4bit", "8bit")


def load_causal_lm(
    backbone: str,
    *,
    config: dict[str, Any] | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """A causal LM: random init from ``config`` (``{"model_type": "llama", ...}``, for tiny
    models), else ``from_pretrained(backbone)`` (local path or hub id), optionally 4/8-bit."""
    import transformers

    if config:
        cfg = dict(config)
        model_type = cfg.pop("model_type", "llama")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            auto = transformers.AutoConfig.for_model(model_type, **cfg)
            return transformers.AutoModelForCausalLM.from_config(auto).eval()
    kwargs: dict[str, Any] = {}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    if quantize:
        kwargs["quantization_config"] = _bnb_config(quantize, kwargs.get("dtype"))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(backbone, **kwargs)
    except OSError as err:
        raise ConfigError(
            f"cannot load a causal LM from {backbone!r}: {err}. Give a local folder with "
            "config.json and weights, or a hub id (needs network)."
        ) from None
    return model.eval()


def _bnb_config(quantize: str, dtype: torch.dtype | None):
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize must be one of {QUANTIZE}, got {quantize!r}.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"quantize={quantize!r} (QLoRA-style loading) needs bitsandbytes and a CUDA GPU: "
            "pip install bitsandbytes, or drop --model.quantize."
        ) from None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype or torch.bfloat16,
    )


class ReviewLM(PeftModule):
    """Instruction tuning of a causal LM for one code-review task.

    Args:
        method: the method config (``{"class_path", "init_args"}`` in YAML); None fully
            fine-tunes the model (the reference of small models).
        backbone: a local path or hub id for ``AutoModelForCausalLM`` (LLaMA, CodeLlama,
            Qwen2, GPT-2, ...).
        pretrained: weights to load instead of ``backbone`` (a local path or hub id);
            ``backbone`` stays the name in logs.
        backbone_config: build a random-init model from this config instead
            (``{"model_type": "llama", "hidden_size": 64, ...}``; demos and tests).
        tokenizer: "byte" or a path / hub id; None uses ``pretrained`` or ``backbone``.
        task: "necessity", "comment", "refine" or "codegen" (linked from the data).
        dtype: load dtype, e.g. "bfloat16" on GPU.
        quantize: None, "4bit" (NF4, QLoRA) or "8bit", via bitsandbytes.
        gradient_checkpointing: recompute activations in backward (long prompts on GPU).
        max_new_tokens / num_beams: decoding in validation and test.
        init_seed: seed of a random-init backbone, so every rebuild is identical.
        decode_in_validation: False logs only val_loss and val_ppl in validation (no
            generation); test still decodes and scores.
        extra_metrics: optional metrics besides the task's table, e.g. ["codebleu"]
            (checked at construction: a missing package fails before training).
        code_lang: language of the code for CodeBLEU.
        **kwargs: ``PeftModule`` arguments (lr, weight_decay, warmup_steps, scheduler,
            adapter_name, init_adapter, betas).
    """

    def __init__(
        self,
        method: MethodArg | None = None,
        backbone: str = "meta-llama/Llama-2-7b-hf",
        pretrained: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        task: str = "comment",
        dtype: str | None = None,
        quantize: str | None = None,
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        init_seed: int = 0,
        decode_in_validation: bool = True,
        extra_metrics: list[str] | None = None,
        code_lang: str = "python",
        **kwargs: Any,
    ) -> None:
        if task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {task!r}.")
        if quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {QUANTIZE}, got {quantize!r}.")
        check_metrics(extra_metrics or [])
        super().__init__(method, **kwargs)
        self.outputs: dict[str, list[tuple[str, str]]] = {"val": [], "test": []}
        # per stage: summed response-token NLL and token count, for the epoch's perplexity
        self.nll: dict[str, list[torch.Tensor]] = {"val": [], "test": []}

    # -- building -------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        hp = self.hparams
        model = load_causal_lm(
            hp.pretrained or hp.backbone,
            config=hp.backbone_config,
            dtype=hp.dtype,
            quantize=hp.quantize,
            seed=hp.init_seed,
        )
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        model.requires_grad_(self.method is None)  # inject() freezes the base itself
        return model

    @property
    def tokenizer(self):
        from .tokenizer import load_tokenizer

        hp = self.hparams
        return load_tokenizer(hp.tokenizer or hp.pretrained or hp.backbone)

    # -- steps ----------------------------------------------------------------------------

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
        return out.loss, {}

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs
    ) -> list[str]:
        """Decode left-padded prompts (KV cache; greedy unless kwargs say otherwise)."""
        tok = self.tokenizer
        options = {
            "max_new_tokens": self.hparams.max_new_tokens,
            "num_beams": self.hparams.num_beams,
            "do_sample": False,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "use_cache": True,
            **kwargs,
        }
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        return tok.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)

    def _evaluate(self, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True)
        tokens = (batch["labels"][:, 1:] != -100).sum()  # the targets the mean loss covers
        self.nll[stage].append(torch.stack([loss.detach().float() * tokens, tokens.float()]))
        if stage == "val" and not self.hparams.decode_in_validation:
            return loss
        predictions = self.generate(batch["prompt_ids"], batch["prompt_mask"])
        references = self._references(batch)
        self.outputs[stage].extend(zip(predictions, references, strict=True))
        return loss

    def _references(self, batch: dict[str, torch.Tensor]) -> list[str]:
        labels = batch["labels"]
        rows = [row[row != -100] for row in labels]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate("test", batch)

    def _log_scores(self, stage: str) -> None:
        self._log_perplexity(stage)
        pairs, self.outputs[stage] = self.outputs[stage], []
        if not pairs:
            return
        predictions, references = zip(*pairs, strict=True)
        hp = self.hparams
        scores = review_scores(
            hp.task, predictions, references, extra=hp.extra_metrics or (), lang=hp.code_lang
        )
        for name, value in scores.items():
            self.log(f"{stage}_{name}", value)

    def _log_perplexity(self, stage: str) -> None:
        """exp(summed NLL / tokens) over the epoch (and over processes)."""
        parts, self.nll[stage] = self.nll[stage], []
        if not parts:
            return
        total = self.all_gather(torch.stack(parts).sum(0)).reshape(-1, 2).sum(0)
        self.log(f"{stage}_ppl", torch.exp(total[0] / total[1].clamp(min=1)).item())

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")


__all__ = ["QUANTIZE", "ReviewLM", "load_causal_lm"]
