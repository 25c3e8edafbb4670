"""The diffusion module on tiny diffusers models built from configs: training changes only
adapter tensors and lowers the loss (LoRA, SODA, DiffFit on DiT, StyleInject), SODA stays
orthogonal, DiffFit's DiT-XL/2 count, LoRA export to diffusers' load_lora_weights and
kohya keys and back, reproducible sampling, weighted adapter mixes, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import core
from core.methods.style import StyleInject  # noqa: F401  (registers styleinject)
from core.optim import StiefelAdam
from diffusion import export
from diffusion.demo import base_bytes, fixed_loss, write_shapes
from diffusion.models import write_tiny_pipeline
from diffusion.module import DiffusionModule, Trainable
from diffusion.sample import load_mix
from diffusion.sample import main as sample_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "diffusion"
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
LORA = {"class_path": "core.LoRA", "init_args": {"r": 4, "alpha": 4, "targets": ATTN}}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusion")
    return {
        "sd": write_tiny_pipeline(root / "sd", "sd"),
        "dit": write_tiny_pipeline(root / "dit", "dit"),
        "data": write_shapes(root / "data", size=16),
        "root": root,
    }


def sd_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1,
        "caption": ["a red circle", "a blue square"],
        "label": torch.tensor([-1, -1]),
    }


def train_steps(module: DiffusionModule, batch: dict, steps: int = 6) -> None:
    """AdamW steps on one batch with the same noise and timesteps every step."""
    optimizer = module.configure_optimizers()
    module.train()
    for _ in range(steps):
        torch.manual_seed(0)
        loss, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "method",
    [
        LORA,
        {"class_path": "core.SODA", "init_args": {"targets": r".*attn[12]\.(to_q|to_v)$"}},
        {
            "class_path": "core.SODA",
            "init_args": {"targets": r".*attn[12]\.(to_q|to_v)$", "orthogonal": "stiefel"},
        },
        {
            "class_path": "core.methods.style.StyleInject",
            "init_args": {"r": 2, "num_styles": 2, "targets": ATTN},
        },
    ],
    ids=["lora", "soda", "soda_stiefel", "styleinject"],
)
def test_training_changes_only_adapter_and_lowers_loss(tiny, method):
    module = DiffusionModule(
        method=method, pretrained=str(tiny["sd"]), lr=1e-2, scheduler="constant", weight_decay=0.0
    )
    batch = sd_batch()
    frozen, before = base_bytes(module), fixed_loss(module, batch)
    train_steps(module, batch)
    assert fixed_loss(module, batch) < before
    assert base_bytes(module) == frozen
    saved = module.adapter_state_dict()
    assert saved and all(".adapters." in k for k in saved)


def test_difffit_on_dit_trains_scales_biases_and_class_table(tiny):
    cfg = {
        "class_path": "core.DiffFit",
        "init_args": {"targets": r".*(attn1\.to_out\.0|ff\.net\.2|norm1\.linear)$"},
    }
    module = DiffusionModule(
        method=cfg,
        pretrained=str(tiny["dit"]),
        num_classes=3,
        lr=1e-2,
        scheduler="constant",
        weight_decay=0.0,
    )
    table = "model.transformer.transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    assert module.get_parameter(table).shape == (4, 32)  # 3 classes + the null class
    assert table in module.adapter_state_dict()
    g = torch.Generator().manual_seed(2)
    batch = {
        "pixel_values": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1,
        "caption": ["0", "2"],
        "label": torch.tensor([0, 2]),
    }
    frozen = {
        k: v.clone()
        for k, v in module.model.state_dict().items()
        if "adapters" not in k and "class_embedder" not in k
    }
    before = fixed_loss(module, batch)
    train_steps(module, batch)
    assert fixed_loss(module, batch) < before
    now = module.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("orthogonal", ["stiefel", "cayley"])
def test_soda_rotation_stays_orthogonal_in_its_own_group(tiny, orthogonal):
    method = {
        "class_path": "core.SODA",
        "init_args": {"targets": r".*attn1\.to_q$", "kron_factors": 2, "orthogonal": orthogonal},
    }
    module = DiffusionModule(
        method=method,
        pretrained=str(tiny["sd"]),
        lr=5e-2,
        rotation_lr=1e-1,
        scheduler="constant",
        weight_decay=0.0,
    )
    optimizer = module.configure_optimizers()
    names = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert names == {"spectrum": 5e-2, "rotation": 1e-1}
    stiefel = orthogonal == "stiefel"
    assert isinstance(optimizer, StiefelAdam) == stiefel
    rotation = next(g for g in optimizer.param_groups if g["name"] == "rotation")
    assert rotation["stiefel"] == stiefel
    assert {id(p) for p in rotation["params"]} == {
        id(p) for n, p in module.named_parameters() if (".factors." if stiefel else ".skew.") in n
    }
    train_steps(module, sd_batch(), steps=4)
    for _, wrapper in core.targeting.adapted_modules(module.model):
        adapter = wrapper.adapters["default"]
        rot = adapter.rotation().detach()
        assert not torch.allclose(rot, torch.eye(rot.shape[0]), atol=1e-3)  # it did rotate
        for factor in adapter.rotation_factors():
            gram = factor.detach().double().T @ factor.detach().double()
            assert torch.linalg.matrix_norm(gram - torch.eye(len(gram))) < 1e-5


def test_soda_stiefel_ema_stays_orthogonal(tiny):
    method = {
        "class_path": "core.SODA",
        "init_args": {"targets": r".*attn1\.to_q$", "orthogonal": "stiefel"},
    }
    module = DiffusionModule(method=method, pretrained=str(tiny["sd"]), ema_decay=0.5)
    module.ema = {k: v.detach().clone() for k, v in module.trainable_tensors().items()}
    name = next(k for k in module.ema if ".factors." in k)
    factor = module.get_parameter(name)
    with torch.no_grad():  # a random rotation: the plain average of I and it is not one
        a = torch.randn(factor.shape, generator=torch.Generator().manual_seed(0))
        rotation = torch.linalg.matrix_exp(a - a.T)
        factor.copy_(rotation)
        plain = (torch.eye(len(rotation)) + rotation) / 2
    assert torch.linalg.matrix_norm(plain.T @ plain - torch.eye(len(plain))) > 0.1
    module.on_train_batch_end(None, None, 0)
    ema = module.ema[name].double()
    assert torch.linalg.matrix_norm(ema.T @ ema - torch.eye(len(ema))) < 1e-5
    assert not torch.allclose(ema, torch.eye(len(ema)).double(), atol=1e-2)  # it moved


def dit_xl2_meta(num_classes: int) -> Trainable:
    """DiT-XL/2 on the meta device with tied embedders (the original 675 M model) and a new
    class table for ``num_classes`` classes (+ the null class), as the module builds it."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    from diffusion.models import tie_embeddings

    with torch.device("meta"):
        dit = DiTTransformer2DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
        assert sum(p.numel() for p in dit.parameters()) > 675e6  # untied: one copy per block
        tie_embeddings(dit)
        assert abs(sum(p.numel() for p in dit.parameters()) - 675e6) < 0.5e6  # paper's 675M
        table = LabelEmbedding(num_classes, 1152, 0.1)
    for block in dit.transformer_blocks:
        block.norm1.emb.class_embedder = table
    return Trainable("dit", dit, None)


@pytest.mark.parametrize("gamma_blocks", [28, 14])
def test_difffit_dit_xl2_share_matches_the_paper(gamma_blocks):
    """DiffFit's Table 1 (Xie et al., ICCV 2023): 0.83 M trainable, "0.12%", of DiT-XL/2
    adapted to Food-101 (101 classes; the model with that class table has 673.8 M, as the
    paper's full fine-tuning row). The count, d = 1152, 28 blocks:

      biases    d (patch embed) + 2d (timestep MLP) + 28 * 15d (q,k,v,out 4d + MLP 4d + d
                + adaLN 6d) + 2d (final adaLN) + 2*2*8 (final linear)    = 489,632
      classes   (101 + 1 null) * d, the new domain's table, trained in full = 117,504
      gamma     5d per block: q, k, v (3d), attention out (d: gamma_1 of the residual
                branch, which is this layer's output) and MLP fc2 (d: gamma_2)

    First half (blocks 0-13, configs/diffusion/difffit_dit.yaml's default depth): 687,776 =
    0.102%; all 28 blocks (the depth option): 768,416 = 0.114% of 673.8 M, within 5% of the
    paper's 0.12%. (The
    paper's 0.83 M leaves 0.226 M = 7d per block for its gammas over 28 blocks: it keeps
    separate gammas where ours would multiply the same features.)
    """
    d, blocks, classes = 1152, 28, 101
    model = dit_xl2_meta(classes)
    total = sum(p.numel() for p in model.parameters())
    method = yaml.safe_load((CONFIGS / "difffit_dit.yaml").read_text())["model"]["method"]
    args = dict(method["init_args"])
    if gamma_blocks == 28:  # the depth option: gamma in every block
        args["scale_modules"] = args["scale_modules"].replace(r"(\d|1[0-3])", r"\d+", 1)
    table = "transformer.transformer_blocks.0.norm1.emb.class_embedder"
    core.inject(model, core.DiffFit(**args, modules_to_save=[table]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    biases = d + 2 * d + blocks * 15 * d + 2 * d + 2 * 2 * 8
    formula = biases + (classes + 1) * d + gamma_blocks * 5 * d
    assert trainable == formula
    share = trainable / total
    if gamma_blocks == 28:
        assert abs(share - 0.0012) / 0.0012 < 0.06  # the paper's "0.12%"
    else:
        assert 0.00095 < share < 0.00105


def test_lora_export_loads_in_diffusers_and_back(tiny):
    from diffusers import StableDiffusionPipeline

    module = DiffusionModule(
        method={
            **LORA,
            "init_args": {**LORA["init_args"], "alpha": 8, "targets": [*ATTN, "conv1"]},
        },
        pretrained=str(tiny["sd"]),
    )
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    ours = module.model.unet(x, t, encoder_hidden_states=h).sample
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny["sd"]))
    base = pipe.unet(x, t, encoder_hidden_states=h).sample
    assert (ours - base).abs().max() > 1e-2
    for fmt in export.FORMATS:
        file = export.save_lora(module.model, tiny["root"] / f"l_{fmt}.safetensors", fmt)
        pipe.load_lora_weights(str(file))
        theirs = pipe.unet(x, t, encoder_hidden_states=h).sample
        assert torch.allclose(theirs, ours, atol=1e-5), fmt
        pipe.unload_lora_weights()
        fresh = DiffusionModule(tuning="full", pretrained=str(tiny["sd"]))
        export.load_lora(fresh.model, file)
        assert torch.allclose(
            fresh.model.unet(x, t, encoder_hidden_states=h).sample, ours, atol=1e-6
        )
    keys = export.lora_state_dict(module.model, "kohya")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys


def test_sampling_reproducible_and_mix_is_weighted_sum(tiny):
    module = DiffusionModule(tuning="full", pretrained=str(tiny["sd"]))
    a = module.generate(["a red circle"], steps=3, seed=7)[0]
    b = module.generate(["a red circle"], steps=3, seed=7)[0]
    assert list(a.getdata()) == list(b.getdata())
    files = []
    for i in range(2):
        src = DiffusionModule(method=LORA, pretrained=str(tiny["sd"]))
        with torch.no_grad():
            for p in src.model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
        files.append(export.save_lora(src.model, tiny["root"] / f"mix{i}.safetensors"))
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    load_mix(module.model, [f"{files[0]}:0.7", f"{files[1]}:0.5"])
    wrapper = module.model.get_submodule(layer)
    x = torch.randn(3, 32)
    mixed = wrapper(x) - wrapper.base_layer(x)
    deltas = [
        wrapper.adapters[n].delta_weight() / wrapper.adapters[n].scale for n in ("style0", "style1")
    ]
    assert torch.allclose(mixed, x @ (0.7 * deltas[0] + 0.5 * deltas[1]).T, atol=1e-5)


def test_cli_fit_resume_cache_and_sample(tiny, tmp_path):
    from diffusion.train import main

    cfg = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    cfg["trainer"].update(max_steps=2, enable_progress_bar=False, default_root_dir=str(tmp_path))
    cfg["model"].update(pretrained=str(tiny["sd"]), val_steps=2, val_grid_every=1)
    cfg["trainer"]["check_val_every_n_epoch"] = 1
    cfg["trainer"]["limit_val_batches"] = 1
    cfg["data"].update(
        root=str(tiny["data"]), resolution=16, cache_latents=True, cache_dir=str(tmp_path / "cache")
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(config)])
    log = Path(cli.trainer.log_dir)
    adapter = cli.model.exported_adapter
    assert (adapter / "adapter.json").is_file() and (adapter / "adapter.safetensors").is_file()
    assert list((tmp_path / "cache").glob("latents-*.pt"))
    assert list((log / "grids").glob("*.png"))
    ckpt = next(log.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and all(".adapters." in k for k in state)
    assert sum(v.numel() for v in state.values()) < 20_000  # adapter only, not the UNet
    cli2 = main(
        ["fit", "--config", str(config), "--trainer.max_steps", "4", "--ckpt_path", str(ckpt)]
    )
    assert cli2.trainer.global_step == 4
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = sample_main(
        [
            "--pretrained",
            str(tiny["sd"]),
            "--adapter",
            str(adapter),
            "--prompts",
            str(prompts),
            "--num-images",
            "2",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    from PIL import Image

    assert Image.open(out[0]).size == (2 * 16, 2 * 16)  # 2 images x (without, with)


def test_demo_runs_end_to_end(tmp_path, capsys):
    """``make demo-diffusion`` in short: LoRA and SODA (Stiefel Adam) trained through the CLI
    with the fixed-batch loss going down, grids written, LoRA exported and re-imported."""
    from diffusion.demo import run

    assert run(tmp_path, steps=4)
    printed = capsys.readouterr().out
    assert "lora: fixed-batch loss" in printed and "max ||Q^T Q - I||" in printed
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    for fmt in export.FORMATS:
        assert (tmp_path / f"lora_{fmt}.safetensors").stat().st_size > 0


def test_metrics_fid_and_clip(tmp_path):
    import numpy as np
    import open_clip
    from PIL import Image

    from diffusion.metrics import ClipScorer, fid

    class Pool(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            return x.float().mean(dim=(2, 3))

    gen = torch.Generator().manual_seed(0)
    imgs = [
        Image.fromarray((torch.rand(16, 16, 3, generator=gen) * 255).byte().numpy())
        for _ in range(6)
    ]
    red = [Image.new("RGB", (16, 16), (255, 0, 0)) for _ in range(6)]
    assert fid(imgs, imgs, feature=Pool()) < 1e-3 < fid(imgs, red, feature=Pool())
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    )

    def pre(img):
        arr = np.asarray(img.resize((16, 16)), dtype="float32")
        return torch.from_numpy(arr).permute(2, 0, 1) / 255

    def tok(texts):
        return torch.tensor([[ord(c) % 100 for c in t[:16].ljust(16)] for t in texts])

    scorer = ClipScorer(model, pre, tok)
    assert 0.0 <= scorer.score(imgs[:2], ["a", "b"]) <= 100.0
    assert abs(scorer.image_similarity(red[:1], red[:1]) - 1.0) < 1e-5


def test_lycoris_loha_and_lokr_import(tiny, tmp_path):
    import safetensors.torch

    module = DiffusionModule(tuning="full", pretrained=str(tiny["sd"]))
    g = torch.Generator().manual_seed(0)
    q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    k = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    loha = {
        f"hada_{n}": torch.randn(*s, generator=g)
        for n, s in {"w1_a": (32, 2), "w1_b": (2, 32), "w2_a": (32, 2), "w2_b": (2, 32)}.items()
    }
    lokr = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2": torch.randn(8, 8, generator=g)}
    state = {f"lora_unet_{q}.{n}": v for n, v in loha.items()}
    state[f"lora_unet_{q}.alpha"] = torch.tensor(1.0)
    state.update({f"lora_unet_{k}.{n}": v for n, v in lokr.items()})
    file = tmp_path / "lyco.safetensors"
    safetensors.torch.save_file(state, str(file))
    names = export.load_lora(module.model, file)
    assert names == ["default_loha", "default_lokr"]
    x = torch.randn(2, 32)
    for layer, expected in (
        (
            "to_q",
            0.5 * (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"]),
        ),
        ("to_k", torch.kron(lokr["lokr_w1"], lokr["lokr_w2"])),
    ):
        wrapper = module.model.get_submodule(
            f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.{layer}"
        )
        assert torch.allclose(wrapper(x) - wrapper.base_layer(x), x @ expected.T, atol=1e-4)


@pytest.mark.parametrize(
    "method",
    [
        {"class_path": "core.LoHa", "init_args": {"r": 2, "alpha": 4, "targets": ATTN}},
        {"class_path": "core.LoKr", "init_args": {"r": 2, "alpha": 4, "targets": ATTN}},
        {"class_path": "core.LoKr", "init_args": {"r": 16, "alpha": 4, "targets": ATTN}},
    ],
    ids=["loha", "lokr", "lokr_full_factors"],
)
def test_lycoris_export_reimports_with_equal_outputs(tiny, method):
    import safetensors.torch

    module = DiffusionModule(method=method, pretrained=str(tiny["sd"]))
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    ours = module.model.unet(x, t, encoder_hidden_states=h).sample
    base = DiffusionModule(tuning="full", pretrained=str(tiny["sd"]))
    assert (ours - base.model.unet(x, t, encoder_hidden_states=h).sample).abs().max() > 1e-3
    file = export.save_lora(module.model, tiny["root"] / "lyco_out.safetensors", "kohya")
    keys = safetensors.torch.load_file(str(file))
    prefix = "hada_" if "LoHa" in method["class_path"] else "lokr_"
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert f"{q}.{prefix}w1_a" in keys or f"{q}.{prefix}w1" in keys
    assert (f"{q}.alpha" in keys) == (method["init_args"]["r"] == 2)  # full LoKr: scale 1
    names = export.load_lora(base.model, file)
    assert names == ["default"]
    theirs = base.model.unet(x, t, encoder_hidden_states=h).sample
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_evaluate_table(tiny):
    from diffusion.evaluate import evaluate, format_table

    class Scorer:
        def score(self, images, texts):
            return float(len(images))

        def image_similarity(self, images, refs):
            return 0.5

    module = DiffusionModule(tuning="full", pretrained=str(tiny["sd"]))
    src = DiffusionModule(method=LORA, pretrained=str(tiny["sd"]))
    file = export.save_lora(src.model, tiny["root"] / "eval.safetensors")
    rows = evaluate(module, ["none", str(file)], ["a red circle"], Scorer(), ["ref"], n=2, steps=2)
    assert [r["adapter"] for r in rows] == ["none", str(file)]
    assert rows[0]["clip_score"] == 2.0 and rows[1]["clip_i"] == 0.5
    assert core.adapter_names(module.model) == []  # evaluated adapters are removed again
    assert "clip_score" in format_table(rows)
