"""The loss options (v-prediction, Min-SNR, prior preservation), gradient checkpointing,
EMA of adapter tensors and the merged-pipeline export, on a tiny Stable Diffusion."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion import export
from diffusion.models import write_tiny_pipeline
from diffusion.module import DiffusionModule, min_snr_weight

LORA = {"class_path": "core.LoRA", "init_args": {"r": 2, "targets": ["to_q", "to_v"]}}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("sd") / "sd")


def batch(prior: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {
        "pixel_values": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1,
        "caption": ["sks dog", "sks dog"],
        "label": torch.tensor([-1, -1]),
    }
    if prior:
        out["prior_pixel_values"] = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
        out["prior_caption"] = ["a dog", "a dog"]
    return out


def test_min_snr_weights(sd):
    module = DiffusionModule(method=LORA, pretrained=str(sd), snr_gamma=5.0)
    sched = module.noise_scheduler
    t = torch.tensor([10, 999])
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    assert snr[0] > 5 > snr[1]
    w = min_snr_weight(sched, t, 5.0)
    assert torch.allclose(w, torch.stack([5.0 / snr[0], torch.tensor(1.0)]))
    sched.register_to_config(prediction_type="v_prediction")
    assert torch.allclose(min_snr_weight(sched, t, 5.0), snr.clamp(max=5) / (snr + 1))


def test_v_prediction_target(sd, tmp_path):
    cfg = sd / "scheduler" / "scheduler_config.json"
    folder = tmp_path / "v"
    import shutil

    shutil.copytree(sd, folder)
    data = json.loads(cfg.read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**data, "prediction_type": "v_prediction"})
    )
    module = DiffusionModule(method=LORA, pretrained=str(folder))
    assert module.noise_scheduler.config.prediction_type == "v_prediction"
    seen = {}
    original = module.model.forward

    def spy(x, t, cond):
        seen["t"] = t
        out = original(x, t, cond)
        seen["pred"] = out
        return out

    module.model.forward = spy
    torch.manual_seed(0)
    loss = module.denoising_loss(torch.randn(2, 4, 8, 8), module.condition({}, ["a", "b"], None))
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(x0)
    v = module.noise_scheduler.get_velocity(x0, noise, seen["t"])
    expected = ((seen["pred"] - v) ** 2).flatten(1).mean(1)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_prior_preservation_adds_weighted_class_loss(sd):
    module = DiffusionModule(method=LORA, pretrained=str(sd), prior_loss_weight=0.5)
    torch.manual_seed(0)
    loss, logs = module.compute_loss(batch(prior=True))
    assert "prior_loss" in logs
    module.hparams.prior_loss_weight = 0.0
    torch.manual_seed(0)
    instance_only, _ = module.compute_loss(batch(prior=True))
    assert torch.allclose(loss - instance_only, 0.5 * logs["prior_loss"], atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients(sd):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # the same adapter init
        module = DiffusionModule(method=LORA, pretrained=str(sd), gradient_checkpointing=ckpt)
        module.train()
        assert module.model.unet.is_gradient_checkpointing == ckpt
        torch.manual_seed(0)
        module.compute_loss(batch())[0].backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in module.model.parameters() if p.requires_grad])
        )
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_ema_tracks_and_swaps(sd):
    module = DiffusionModule(method=LORA, pretrained=str(sd), ema_decay=0.5)
    module.ema = {k: v.detach().clone() for k, v in module.trainable_tensors().items()}
    name, param = next(iter(module.trainable_tensors().items()))
    start = param.detach().clone()
    with torch.no_grad():
        param.add_(2.0)
    module.on_train_batch_end(None, None, 0)
    assert torch.allclose(module.ema[name], start + 1.0)
    module.swap_ema()
    assert torch.allclose(param, start + 1.0)
    module.swap_ema()
    assert torch.allclose(param, start + 2.0)


def test_merge_and_save_writes_a_loadable_pipeline(sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    module = DiffusionModule(method=LORA, pretrained=str(sd))
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 16, 32)
    ours = module.model.unet(x, t, encoder_hidden_states=h).sample
    folder = export.merge_and_save(module, tmp_path / "merged")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert torch.allclose(pipe.unet(x, t, encoder_hidden_states=h).sample, ours, atol=1e-5)


def test_sdxl_two_text_encoders_and_time_ids(tmp_path):
    folder = write_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    module = DiffusionModule(method=LORA, pretrained=str(folder))
    assert module.parts.kind == "sdxl" and len(module.text_encoder_list) == 2
    hidden, added = module.encode_text(["a", "b"], (16, 16))
    assert hidden.shape[-1] == 64  # both encoders' hidden states
    assert added["text_embeds"].shape == (2, 32)
    assert added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    torch.manual_seed(0)
    loss, _ = module.compute_loss(batch())
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)
