"""The core demo: adapt a small backbone of each domain's family end to end on CPU.

    python -m core.demo                      # timm ViT (the default; ``make demo``)
    python -m core.demo --backbone llama     # or: unet, ast, monai-vit

Each run builds a backbone from a config (no weights are downloaded), injects LoRA,
trains a few steps on generated data, saves the adapter, reloads it into a fresh copy
of the base, merges and unmerges, exports to HF PEFT when peft is installed, checks
every output against the trained model and prints the parameter report. It exits
non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import core


@dataclass
class Backbone:
    """What the demo needs from a family: a model, what to adapt and a small task."""

    build: Callable[[], nn.Module]
    targets: list[str]
    modules_to_save: list[str] | None
    batch: Callable[[torch.Generator], tuple]  # -> ((inputs, ...), target)
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    forward: Callable[[nn.Module, tuple], torch.Tensor]


def _class_images(g: torch.Generator, channels: int, size: int, classes: int, n: int = 32):
    """Images whose class is a fixed pattern under noise: learnable in a few steps."""
    patterns = torch.randn(
        classes, channels, size, size, generator=torch.Generator().manual_seed(7)
    )
    labels = torch.randint(0, classes, (n,), generator=g)
    images = patterns[labels] + 0.5 * torch.randn(n, channels, size, size, generator=g)
    return (images,), labels


def _vit() -> Backbone:
    import timm

    def build():
        return timm.create_model(
            "vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
            embed_dim=64, depth=4, num_heads=4, num_classes=10,
        )  # fmt: skip

    return Backbone(
        build,
        ["qkv", "attn.proj", "fc1", "fc2"],
        ["head"],
        lambda g: _class_images(g, 3, 32, 10),
        lambda m, b: F.cross_entropy(m(b[0][0]), b[1]),
        lambda m, b: m(b[0][0]),
    )


def _python_bytes(g: torch.Generator, n: int = 16, length: int = 48):
    """Windows of real Python source (this library's own), one token a byte."""
    text = inspect.getsource(core.inject).encode() + inspect.getsource(F).encode()[:20000]
    data = torch.tensor(list(text), dtype=torch.long)
    starts = torch.randint(0, len(data) - length - 1, (n,), generator=g)
    return (torch.stack([data[s : s + length] for s in starts]),), None


def _llama() -> Backbone:
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        cfg = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)

    return Backbone(
        build,
        ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        None,
        _python_bytes,
        lambda m, b: m(input_ids=b[0][0], labels=b[0][0]).loss,
        lambda m, b: m(input_ids=b[0][0]).logits,
    )


def _unet() -> Backbone:
    from diffusers import UNet2DConditionModel

    def build():
        return UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8,
        )  # fmt: skip

    def batch(g):
        latents = torch.randn(8, 4, 16, 16, generator=g)
        noise = torch.randn(8, 4, 16, 16, generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        text = torch.randn(8, 5, 32, generator=g)
        noisy = 0.8 * latents + 0.6 * noise
        return (noisy, t, text), noise

    def run(m, b):
        return m(b[0][0], b[0][1], encoder_hidden_states=b[0][2]).sample

    return Backbone(
        build,
        ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],  # attention + LoCon convs
        None,
        batch,
        lambda m, b: F.mse_loss(run(m, b), b[1]),
        run,
    )


def _ast() -> Backbone:
    from transformers import ASTConfig, ASTForAudioClassification

    def build():
        cfg = ASTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            num_mel_bins=32, max_length=64, num_labels=5,
        )  # fmt: skip
        return ASTForAudioClassification(cfg)

    def batch(g):
        (x,), y = _class_images(g, 1, 32, 5)
        spec = F.interpolate(x, size=(64, 32)).squeeze(1)  # (batch, frames, mel bins)
        return (spec,), y

    return Backbone(
        build,
        ["q_proj", "v_proj"],
        ["classifier"],
        batch,
        lambda m, b: F.cross_entropy(m(input_values=b[0][0]).logits, b[1]),
        lambda m, b: m(input_values=b[0][0]).logits,
    )


def _monai_vit() -> Backbone:
    from monai.networks.nets import ViT

    def build():
        return ViT(
            in_channels=1, img_size=(32, 32), patch_size=(8, 8), hidden_size=64, mlp_dim=128,
            num_layers=2, num_heads=4, spatial_dims=2, classification=True, num_classes=14,
        )  # fmt: skip

    def batch(g):
        (x,), y = _class_images(g, 1, 32, 14)
        return (x,), F.one_hot(y, 14).float()  # multi-label target, as for chest X-rays

    return Backbone(
        build,
        ["qkv", "linear1", "linear2"],
        ["classification_head"],
        batch,
        lambda m, b: F.binary_cross_entropy_with_logits(m(b[0][0])[0], b[1]),
        lambda m, b: m(b[0][0])[0],
    )


BACKBONES = {"vit": _vit, "llama": _llama, "unet": _unet, "ast": _ast, "monai-vit": _monai_vit}


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def close(self, label: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
        diff = (got - want).abs().max().item()
        ok = diff <= atol
        self.failed += not ok
        print(f"  {'ok ' if ok else 'FAIL'} {label:<44} max |diff| = {diff:.2e}")


def run(name: str, steps: int, out: Path, seed: int = 0) -> int:
    spec = BACKBONES[name]()
    torch.manual_seed(seed)
    base = spec.build().eval()
    pristine = copy.deepcopy(base)  # the "pretrained" weights every reload starts from
    model = base
    cfg = core.LoRA(r=8, alpha=16, targets=spec.targets, modules_to_save=spec.modules_to_save)
    core.inject(model, cfg)
    print(f"== omnipeft core demo: LoRA on a {name} backbone ==")
    print(core.param_report(model))

    g = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = spec.loss(model, spec.batch(g))
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    model.eval()
    print(
        f"\ntrained {steps} steps in {time.perf_counter() - start:.1f}s: "
        f"loss {losses[0]:.4f} -> {sum(losses[-5:]) / min(5, len(losses)):.4f} (mean of last 5)"
    )
    checks = Checks()
    checks.failed += not losses[-1] < losses[0]

    probe = spec.batch(torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        want = spec.forward(model, probe)
        folder = core.save_adapter(model, out / "adapter")
        print(
            f"\nsaved adapter to {folder}: " + ", ".join(p.name for p in sorted(folder.iterdir()))
        )
        fresh = copy.deepcopy(pristine)
        core.load_adapter(fresh, folder)
        checks.close("reloaded into a fresh base", spec.forward(fresh, probe), want, 1e-5)
        core.merge(model)
        checks.close("merged into the base weights", spec.forward(model, probe), want, 1e-4)
        core.unmerge(model)
        checks.close("unmerged again", spec.forward(model, probe), want, 1e-5)
        try:
            import peft
        except ImportError:
            print("  (peft not installed: HF PEFT export check skipped)")
        else:
            core.interop.save_peft(model, out / "peft")
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), out / "peft")
            checks.close("exported, loaded by HF PEFT", spec.forward(theirs, probe), want, 1e-4)
    print("\nall checks passed" if not checks.failed else f"\n{checks.failed} check(s) FAILED")
    return 1 if checks.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="vit")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="where to write the adapter")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.out is not None:
        return run(args.backbone, args.steps, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        return run(args.backbone, args.steps, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
