"""The diffusion LightningModule: a frozen diffusers denoiser with one tuning method.

``self.model`` holds what can train, under the names diffusers pipelines use: ``unet``
(Stable Diffusion 1.x/2.x/SDXL) or ``transformer`` (DiT), plus ``text_encoder`` when
``train_text_encoder`` is set, so adapter paths read ``unet.down_blocks...to_q`` as in
diffusers' LoRA files. The VAE, the other text encoders and the noise scheduler stay
frozen beside it (half precision on a GPU) and are never saved.

Loss (Ho et al., 2020, DDPM): ``|| target - model(x_t, t, c) ||^2`` with target the noise
(epsilon-prediction), ``alpha_t eps - sigma_t x_0`` (v-prediction, Salimans & Ho, 2022)
or x_0, as the scheduler's ``prediction_type`` says; optional Min-SNR-gamma weighting
(Hang et al., 2023: min(SNR, gamma) / SNR, or / (SNR + 1) for v) and DreamBooth prior
preservation (Ruiz et al., 2023: + lambda * the same loss on class images).

``tuning="full"`` fine-tunes the whole denoiser (the reference; no method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import ConfigError
from core.lightning import MethodArg, PeftModule
from core.optim import StiefelAdam, polar, stiefel_parameters
from core.report import param_report

from .models import Parts, load_parts, tie_embeddings
from .sampling import denoise, make_scheduler, save_grid, to_images

TUNINGS = ("peft", "full")
# SODA's skew-parameterised rotation factors (core.methods.spectral.SODAAdapter); its
# orthogonal="stiefel" factors declare themselves (core.optim.stiefel_parameters).
ROTATION_KEYS = (".skew.",)


class Trainable(nn.Module):
    """The trainable part: the denoiser (``unet`` / ``transformer``), maybe ``text_encoder``."""

    def __init__(self, kind: str, denoiser: nn.Module, text_encoder: nn.Module | None) -> None:
        super().__init__()
        self.denoiser_name = "transformer" if kind == "dit" else "unet"
        self.add_module(self.denoiser_name, denoiser)
        if text_encoder is not None:
            self.text_encoder = text_encoder

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.denoiser_name)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if self.denoiser_name == "transformer":
            return self.denoiser(x, timestep=t, class_labels=cond).sample
        hidden, added = cond
        return self.denoiser(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def min_snr_weight(scheduler: Any, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for timesteps ``t`` (Hang et al., 2023, eq. 4)."""
    alphas = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alphas / (1 - alphas)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


class DiffusionModule(PeftModule):
    """Fine-tune a Stable Diffusion UNet or a class-conditional DiT with one method.

    Args:
        method: the method config (``{"class_path", "init_args"}`` in YAML); None with
            ``tuning="full"``.
        tuning: "peft" or "full".
        pretrained: a diffusers pipeline folder or hub id (SD 1.x/2.x, SDXL, DiT).
        train_text_encoder: put the (first) text encoder in ``self.model`` so the method's
            targets can reach it (e.g. add ``q_proj``/``v_proj``); full tuning trains it.
        snr_gamma: Min-SNR-gamma weighting (5.0 in the paper); None for plain MSE.
        prior_loss_weight: lambda of DreamBooth prior preservation (with class images).
        gradient_checkpointing: trade compute for memory in the denoiser.
        ema_decay: keep an EMA of the trainable tensors (exported at fit end); None: off.
        num_classes: DiT only: classes of the new domain (linked from the data); a count
            other than the checkpoint's gets a new class-embedding table.
        tie_embeddings: DiT only: share block 0's timestep / class embedder across blocks,
            as the original DiT has them (see ``models.tie_embeddings``).
        train_class_embedding: DiT only: train the class table in full (DiffFit does).
        rotation_lr: learning rate of SODA's rotation group (None: ``lr``); the spectral
            shift and everything else use ``lr``.
        val_grid_every: write (and log) a sample grid every this many epochs (0: never).
        val_steps / val_guidance / val_seed: settings of that grid.
        init_seed: seed of anything random in the base (new class tables).
        **kwargs: ``PeftModule`` arguments (lr, weight_decay, scheduler, init_adapter, ...).
    """

    def __init__(
        self,
        method: MethodArg | None = None,
        tuning: str = "peft",
        pretrained: str = "stabilityai/stable-diffusion-2-1-base",
        train_text_encoder: bool = False,
        snr_gamma: float | None = None,
        prior_loss_weight: float = 1.0,
        gradient_checkpointing: bool = False,
        ema_decay: float | None = None,
        num_classes: int = 0,
        tie_embeddings: bool = True,
        train_class_embedding: bool = True,
        rotation_lr: float | None = None,
        val_grid_every: int = 1,
        val_steps: int = 20,
        val_guidance: float = 5.0,
        val_seed: int = 0,
        init_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if tuning not in TUNINGS:
            raise ConfigError(f"tuning must be one of {TUNINGS}, got {tuning!r}.")
        if (tuning == "peft") != (method is not None):
            raise ConfigError(
                "tuning='peft' needs --model.method (e.g. --config configs/diffusion/lora.yaml); "
                "tuning='full' takes no method."
            )
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in (0, 1), got {ema_decay}.")
        self.parts: Parts | None = None
        super().__init__(method, **kwargs)
        self.ema: dict[str, torch.Tensor] | None = None

    # -- building -------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        hp = self.hparams
        parts = load_parts(hp.pretrained)
        self.parts = parts
        denoiser = parts.denoiser
        if parts.kind == "dit":
            self._prepare_dit(denoiser)
        trained_te = (
            parts.text_encoders[0] if hp.train_text_encoder and parts.text_encoders else None
        )
        for enc in parts.text_encoders:
            enc.requires_grad_(False).eval()
        parts.vae.requires_grad_(False).eval()
        # The frozen text encoders are registered (moved with the module, never saved);
        # the VAE is not, so it can stay off the accelerator when latents are cached.
        self.text_encoders = nn.ModuleList(e for e in parts.text_encoders if e is not trained_te)
        model = Trainable(parts.kind, denoiser, trained_te)
        model.requires_grad_(hp.tuning == "full")
        if hp.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self._add_class_embedding_to_method(model)
        return model

    def _prepare_dit(self, transformer: nn.Module) -> None:
        from diffusers.models.embeddings import LabelEmbedding

        hp = self.hparams
        if hp.tie_embeddings:
            tie_embeddings(transformer)
        blocks = transformer.transformer_blocks
        current = blocks[0].norm1.emb.class_embedder
        if hp.num_classes and hp.num_classes != current.num_classes:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hp.init_seed)
                table = LabelEmbedding(hp.num_classes, current.embedding_table.embedding_dim, 0.1)
            for block in blocks:
                block.norm1.emb.class_embedder = table

    def _add_class_embedding_to_method(self, model: Trainable) -> None:
        hp = self.hparams
        if (
            self.method is None
            or model.denoiser_name != "transformer"
            or not hp.train_class_embedding
        ):
            return
        import dataclasses

        table = "transformer.transformer_blocks.0.norm1.emb.class_embedder"
        saved = tuple(self.method.modules_to_save or ())
        if table not in saved:
            self.method = dataclasses.replace(self.method, modules_to_save=(*saved, table))
            self.save_hyperparameters({"method": self.method_spec()})

    @property
    def vae(self) -> nn.Module:
        return self.parts.vae

    def vae_scale(self) -> int:
        """Pixels per latent side (8 for SD's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoder_list(self) -> list[nn.Module]:
        te = getattr(self.model, "text_encoder", None)
        return ([te] if te is not None else []) + list(self.text_encoders)

    @property
    def noise_scheduler(self) -> Any:
        return self.parts.scheduler

    # -- conditioning ---------------------------------------------------------------------

    def encode_text(self, captions: list[str], size: tuple[int, int] | None = None) -> Any:
        """(hidden states, SDXL added conditions or None) for ``captions``."""
        hiddens, pooled = [], None
        for tok, enc in zip(self.parts.tokenizers, self.text_encoder_list, strict=True):
            ids = tok(
                list(captions),
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = enc(ids, output_hidden_states=self.parts.kind == "sdxl")
            if self.parts.kind == "sdxl":
                hiddens.append(out.hidden_states[-2])
                pooled = out[0]
            else:
                hiddens.append(out[0])
        hidden = torch.cat(hiddens, dim=-1)
        added = None
        if self.parts.kind == "sdxl":
            h, w = size or (1024, 1024)
            ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=hidden.dtype)
            added = {"text_embeds": pooled, "time_ids": ids.repeat(len(captions), 1)}
        return hidden, added

    def condition(self, batch: dict[str, Any], captions: list[str], size) -> Any:
        if self.parts.kind == "dit":
            return batch["label"].to(self.device)
        hidden, added = self.encode_text(captions, size)
        dtype = self._denoiser_dtype()
        return hidden.to(dtype), (
            None if added is None else {k: v.to(dtype) for k, v in added.items()}
        )

    def _denoiser_dtype(self) -> torch.dtype:
        return next(self.model.denoiser.parameters()).dtype

    # -- latents --------------------------------------------------------------------------

    def vae_to(self, device: torch.device) -> nn.Module:
        self.parts.vae.to(device)
        return self.parts.vae

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior (mean, std) stacked on channels: what the latent cache holds."""
        vae = self.vae_to(self.device)
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    def latents_from(self, batch: dict[str, Any], key: str = "pixel_values") -> torch.Tensor:
        """Scaled latents x_0 from cached moments or by encoding pixels (no gradient)."""
        if key == "pixel_values" and "latents" in batch:
            moments = batch["latents"].to(self.device)
        else:
            moments = self.latent_moments(batch[key])
        mean, std = moments.chunk(2, dim=1)
        x0 = mean + std * torch.randn_like(std)
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (x0 - shift) * cfg.scaling_factor

    # -- the loss -------------------------------------------------------------------------

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x0 = self.latents_from(batch)
        captions = list(batch["caption"])
        n = x0.shape[0]
        if "prior_pixel_values" in batch:
            x0 = torch.cat([x0, self.latents_from(batch, "prior_pixel_values")])
            captions += list(batch["prior_caption"])
            batch = {**batch, "label": torch.cat([batch["label"], batch["label"]])}
        f = self.vae_scale()
        size = (x0.shape[-2] * f, x0.shape[-1] * f)
        per_sample = self.denoising_loss(x0, self.condition(batch, captions, size))
        loss = per_sample[:n].mean()
        logs: dict[str, Any] = {}
        if per_sample.shape[0] > n:
            prior = per_sample[n:].mean()
            logs["prior_loss"] = prior
            loss = loss + self.hparams.prior_loss_weight * prior
        return loss, logs

    def denoising_loss(self, x0: torch.Tensor, cond: Any) -> torch.Tensor:
        """Per-sample (Min-SNR weighted) MSE between the model output and its target."""
        sched = self.noise_scheduler
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noisy = sched.add_noise(x0, noise, t)
        kind = sched.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = sched.get_velocity(x0, noise, t)
        else:
            target = x0
        pred = self.model(noisy.to(self._denoiser_dtype()), t, cond)
        pred = pred[:, : x0.shape[1]]  # DiT's learned-sigma channels are not trained here
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        if self.hparams.snr_gamma is not None:
            loss = loss * min_snr_weight(sched, t, self.hparams.snr_gamma)
        return loss

    # -- fit hooks: latent cache, half-precision frozen parts, EMA ------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and dm is not None and dm.hparams.get("cache_latents"):
            tag = f"{type(self.vae).__name__}{self.vae.config.latent_channels}"
            dm.cache_latents(lambda px: self.latent_moments(px), tag)
            self.vae_to(torch.device("cpu"))  # not in training memory from here on

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.freeze_frozen_parts()
        if self.hparams.ema_decay is not None and self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in self.trainable_tensors().items()}

    def freeze_frozen_parts(self) -> None:
        """Frozen parts in eval mode; in half precision on a GPU (adapters stay fp32)."""
        for enc in self.text_encoders:
            enc.eval()
        self.vae.eval()
        if self.device.type != "cuda":
            return
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        for enc in self.text_encoders:
            enc.to(half)
        self.vae.to(half)
        for p in self.model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(half)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA update. An average of orthogonal matrices is not orthogonal, so the EMA of
        a Stiefel parameter (SODA's factors) is projected back (polar factor, the nearest
        orthogonal matrix) after each update and stays a valid rotation."""
        if self.ema is None:
            return
        decay = self.hparams.ema_decay
        stiefel = {id(p) for p in stiefel_parameters(self.model).values()}
        with torch.no_grad():
            for name, p in self.trainable_tensors().items():
                avg = self.ema[name].lerp_(p.detach(), 1.0 - decay)
                if id(p) in stiefel:
                    avg.copy_(polar(avg.double()).to(avg.dtype))

    def swap_ema(self) -> None:
        """Exchange the live trainable tensors with their EMA (call twice to undo)."""
        if self.ema is None:
            return
        with torch.no_grad():
            for name, p in self.trainable_tensors().items():
                live = p.detach().clone()
                p.copy_(self.ema[name])
                self.ema[name] = live

    def on_train_end(self) -> None:
        self.swap_ema()  # export the EMA weights
        super().on_train_end()
        self.swap_ema()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ema is not None:
            checkpoint["diffusion_ema"] = {k: v.cpu() for k, v in self.ema.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "diffusion_ema" in checkpoint:
            self.ema = dict(checkpoint["diffusion_ema"])

    # -- optimiser: SODA's two groups -----------------------------------------------------

    def configure_optimizers(self) -> Any:
        """PeftModule's AdamW, except with SODA: its rotation factors form their own group
        (``rotation_lr``, no weight decay) beside the spectral shift. With
        ``orthogonal="stiefel"`` the optimiser is ``core.optim.StiefelAdam``: momentum
        Stiefel Adam on the factors, AdamW on everything else, as the SODA recipe trains
        them (one optimiser, so one LR schedule drives both groups)."""
        out = super().configure_optimizers()
        optimizer = out["optimizer"] if isinstance(out, dict) else out
        stiefel = {id(p) for p in stiefel_parameters(self.model).values()}
        skew = {id(p) for n, p in self.named_parameters() if any(k in n for k in ROTATION_KEYS)}
        rotation = stiefel | skew
        if not rotation:
            return out
        hp = self.hparams
        rot_lr = hp.rotation_lr or hp.lr
        groups = []
        for group in optimizer.param_groups:
            rest = [p for p in group["params"] if id(p) not in rotation]
            if rest:
                groups.append(
                    {"params": rest, "weight_decay": group["weight_decay"], "lr": hp.lr}
                    | {"initial_lr": hp.lr, "name": "spectrum", "stiefel": False}
                )
        rot = [p for g in optimizer.param_groups for p in g["params"] if id(p) in rotation]
        groups.append(
            {"params": rot, "weight_decay": 0.0, "lr": rot_lr, "initial_lr": rot_lr}
            | {"name": "rotation", "stiefel": bool(stiefel)}
        )
        if stiefel:
            new = StiefelAdam(groups, lr=hp.lr, betas=tuple(hp.betas), stiefel=False)
        else:
            new = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        if not isinstance(out, dict):
            return new
        schedule = out["lr_scheduler"]["scheduler"].lr_lambdas[0]
        scheduler = torch.optim.lr_scheduler.LambdaLR(new, schedule)
        return {
            **out,
            "optimizer": new,
            "lr_scheduler": {**out["lr_scheduler"], "scheduler": scheduler},
        }

    # -- validation: a sample grid per epoch ----------------------------------------------

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.val_grid_every
        if not every or self.trainer.sanity_checking or (self.current_epoch + 1) % every:
            return
        dm = getattr(self.trainer, "datamodule", None)
        prompts = getattr(dm, "val_prompts", None) or ["a photo"]
        images = self.generate(prompts, steps=self.hparams.val_steps)
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        path = save_grid(images, root / "grids" / f"epoch{self.current_epoch:03d}.png")
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                import numpy as np

                arr = np.asarray(images[0].__class__.open(path).convert("RGB"))
                experiment.add_image("val_grid", arr, self.global_step, dataformats="HWC")

    @torch.no_grad()
    def generate(
        self,
        prompts: list[Any],
        *,
        steps: int = 20,
        guidance: float | None = None,
        seed: int | None = None,
        scheduler: str = "ddim",
        size: int | None = None,
    ) -> list:
        """One image per prompt (SD) or class label (DiT) with the active adapters."""
        guidance = self.hparams.val_guidance if guidance is None else guidance
        seed = self.hparams.val_seed if seed is None else seed
        was_training = self.training
        self.eval()
        sched = make_scheduler(scheduler, self.noise_scheduler)
        denoiser = self.model.denoiser
        side = size or denoiser.config.sample_size
        channels = denoiser.config.in_channels
        shape = (len(prompts), channels, side, side)
        if self.parts.kind == "dit":
            labels = torch.tensor([int(p) for p in prompts], device=self.device)
            null = torch.full_like(
                labels, denoiser.transformer_blocks[0].norm1.emb.class_embedder.num_classes
            )
            cond, uncond = labels, null
        else:
            pixel = (side * self.vae_scale(),) * 2
            cond = self.condition({}, list(prompts), pixel)
            uncond = self.condition({}, [""] * len(prompts), pixel)

        def predict(x, t, c):
            tt = t.expand(x.shape[0]) if t.dim() == 0 else t
            return self.model(x, tt.to(self.device), c)[:, :channels]

        latents = denoise(
            predict,
            cond,
            uncond,
            shape,
            sched,
            steps=steps,
            guidance=guidance,
            seed=seed,
            device=self.device,
            dtype=self._denoiser_dtype(),
        )
        images = to_images(self.decode(latents))
        self.train(was_training)
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae_to(self.device)
        cfg = vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return vae.decode((latents / cfg.scaling_factor + shift).to(vae.dtype)).sample

    # -- reporting ------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        report = param_report(self.model)
        return {"trainable": report.trainable, "total": report.total}


__all__ = ["DiffusionModule", "Trainable", "TUNINGS", "min_snr_weight"]
