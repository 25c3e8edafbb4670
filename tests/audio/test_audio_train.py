"""AST backbone parity, parameter counts at the study's budget on an AST-base-shaped model
(meta device), and ``python -m audio.train`` fit + test + resume on a tiny AST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from audio_toy import TINY_AST, make_esc50

import core
from audio.backbones import build_ast, load_ast
from audio.methods import ConformerAdapter, bottleneck_count, conformer_count, lora_count
from audio.train import AudioCLI
from core.methods.bottleneck import Bottleneck
from core.methods.lora import LoRA
from core.methods.prompts import VPT

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "audio"
MHSA, FFN = r"(.*\.)?blocks\.\d+\.attention", r"(.*\.)?blocks\.\d+\.mlp"


def test_classifier_runs_transformers_ast_exactly():
    ast = load_ast(None, TINY_AST, 100).eval()
    torch.manual_seed(0)
    model = build_ast(None, TINY_AST, 5, 100).eval()
    model.load_state_dict(
        {
            **model.state_dict(),
            **{
                k.replace("layers.", "blocks.").replace("layernorm.", "norm."): v
                for k, v in ast.state_dict().items()
            },
        }
    )
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), ast(x).last_hidden_state)


def base_shaped():
    with torch.device("meta"):
        return build_ast(None, {}, 50, 500)  # ASTConfig defaults: 768 hidden, 12 layers


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LoRA(r=12, alpha=8, targets=["q_proj", "v_proj"]), 12 * lora_count(768, 12)),
        (Bottleneck(bottleneck=8, mode="parallel", targets=MHSA), 12 * bottleneck_count(768, 8)),
        (Bottleneck(bottleneck=8, mode="sequential", targets=MHSA), 12 * bottleneck_count(768, 8)),
        (Bottleneck(bottleneck=8, mode="parallel", targets=FFN), 12 * bottleneck_count(768, 8)),
        (Bottleneck(bottleneck=8, mode="sequential", targets=FFN), 12 * bottleneck_count(768, 8)),
        (
            ConformerAdapter(bottleneck=8, kernel_size=31, targets=FFN),
            12 * conformer_count(768, 8, 31),
        ),
        (
            VPT(num_virtual_tokens=25, deep=True, num_prefix_tokens=2, targets=["blocks"]),
            12 * 25 * 768,
        ),
    ],
)
def test_parameter_counts_at_study_budget(config, expected):
    model = base_shaped()
    model.requires_grad_(False)
    core.inject(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    assert {"lora": 442_368, "bottleneck": 156_768, "conformer_adapter": 233_856, "vpt": 230_400}[
        config.method
    ] == expected


def run_cli(root, out, config, *extra):
    cli = AudioCLI(
        args=[
            "--config",
            str(config),
            "--data.root",
            str(root),
            "--data.dataset",
            "esc50",
            "--data.max_length",
            "100",
            "--data.batch_size",
            "8",
            "--data.num_workers",
            "0",
            "--data.freq_mask",
            "8",
            "--data.time_mask",
            "10",
            "--model.pretrained",
            "null",
            "--model.ast_config",
            json.dumps(TINY_AST),
            "--trainer.default_root_dir",
            str(out),
            "--trainer.max_epochs",
            "2",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32-true",
            *extra,
        ],
        run=False,
    )
    return cli


@pytest.mark.parametrize("config", ["lora.yaml", "adapter_ffn_parallel.yaml"])
def test_cli_fit_test_checkpoint_resume(tmp_path, config):
    root = make_esc50(tmp_path / "ESC-50")
    cli = run_cli(root, tmp_path / "run", CONFIGS / config)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (result,) = cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert 0.0 <= result["test_acc"] <= 1.0
    log = Path(cli.trainer.log_dir)
    metrics = json.loads((log / "metrics.json").read_text())
    assert metrics["test_acc"] == pytest.approx(result["test_acc"])
    assert metrics["folds"] == {"train": [3, 4, 5], "val": [2], "test": [1]}
    ckpt_path = next(log.glob("checkpoints/*.ckpt"))
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert set(state) <= trainable | {k for k in state if "adapters" in k}
    assert not any("q_proj.base_layer.weight" in k or k.endswith("fc1.weight") for k in state)
    assert any("head" in k for k in state)
    assert (log / "adapter").is_dir()
    # resume: one more epoch continues from the checkpoint's step
    again = run_cli(root, tmp_path / "resume", CONFIGS / config, "--trainer.max_epochs", "3")
    again.trainer.fit(again.model, datamodule=again.datamodule, ckpt_path=str(ckpt_path))
    assert again.trainer.global_step == cli.trainer.global_step * 3 // 2
    for key, value in state.items():
        if key in dict(again.model.named_parameters()):
            assert not torch.equal(again.model.state_dict()[key], value) or "norm" in key
