"""The medical demo, end to end on CPU in about a minute, on data the project generates.

    python -m medical.demo [--out runs/medical_demo] [--epochs 12] [--no-notebook]

1. Writes a ChestX-ray14-format folder (real CSV header, list files, images_00N/ PNGs).
2. ``python -m medical.train`` fit + test: LoRA on a tiny ViT (configs/medical/cxr_demo.yaml);
   prints per-finding AUROC with bootstrap 95% intervals.
3. ``python -m medical.explain``: occlusion-sensitivity overlays as PNGs.
4. The clinicians' notebook (``medical/notebooks/cxr_lora.ipynb``: DenseNet LoRA, AUROC
   table, ROC curves, Grad-CAM, adapter save / reload) executed with nbclient in a Jupyter
   kernel; the executed copy, with its outputs, is written to ``<out>/cxr_lora.ipynb``.
   The kernel is a separate process, so it runs beside step 5 on the second core.
5. Med-VQA in PeFoMed's two stages on a tiny random LLaMA: caption pre-alignment, then
   VQA-RAD-format fine-tuning from the stage-1 adapter; prints the VQA scores.

Every model here is tiny, and tiny models run fastest on one intra-op thread: with two,
each small matmul pays a thread hand-off that costs more than the arithmetic.

No weights can be downloaded here, so the backbones are random and tiny: the numbers show
the pipeline works, not what a pretrained foundation model reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

import torch

from .explain import load_run, write_overlays
from .synthetic import write_nih
from .train import CXRCLI
from .vqa import VQACLI, write_tiny_llama
from .vqa_synthetic import vocabulary_texts, write_captions, write_vqa_rad

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "medical"
NOTEBOOK = Path(__file__).resolve().parent / "notebooks" / "cxr_lora.ipynb"
QUIET = ["--trainer.enable_model_summary", "false"]


def run_cxr(out: Path, epochs: int) -> Path:
    root = write_nih(out / "data" / "nih", patients=48, test_patients=12, size=32)
    cli = CXRCLI(
        args=[
            "--config",
            str(CONFIGS / "cxr_demo.yaml"),
            "--data.root",
            str(root),
            "--trainer.default_root_dir",
            str(out / "cxr"),
            "--trainer.max_epochs",
            str(epochs),
            *QUIET,
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    report = cli.model.test_report
    print(f"\n{'finding':<20}{'AUROC':>8}   95% CI")
    for name, a, lo, hi in zip(
        report["findings"], report["auroc"], report["low"], report["high"], strict=True
    ):
        print(f"{name:<20}{a:>8.3f}   [{lo:.3f}, {hi:.3f}]")
    print(
        f"{'mean':<20}{report['mean']:>8.3f}   [{report['mean_low']:.3f}, {report['mean_high']:.3f}]"
    )
    return Path(cli.trainer.log_dir)


def run_explain(run: Path, out: Path) -> list[Path]:
    module, data = load_run(run)
    written = write_overlays(module, data, out / "saliency", finding=0, images=4)
    print(f"saliency overlays: {[p.name for p in written]}")
    return written


def run_notebook(out: Path, epochs: int, notebook: Path = NOTEBOOK, timeout: int = 600) -> Path:
    """Execute ``notebook`` with nbclient in a fresh kernel on generated data under ``out``
    and write the executed copy (outputs included) to ``out / notebook.name``."""
    import nbformat
    from nbclient import NotebookClient

    out.mkdir(parents=True, exist_ok=True)
    work = out / "notebook"
    env = {
        **os.environ,
        "MEDICAL_NOTEBOOK_DIR": str(work),
        "CXR_EPOCHS": str(epochs),
        "OMP_NUM_THREADS": "1",
    }
    # always the generated folder here; the kernel's inline backend draws the ROC figure
    for name in ("CXR_ROOT", "MPLBACKEND"):
        env.pop(name, None)
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(out)}}
    )
    client.execute(env=env)
    executed = out / notebook.name
    nbformat.write(nb, executed)
    return executed


def start_notebook(out: Path, epochs: int) -> tuple[threading.Thread, dict]:
    """``run_notebook`` on a thread (the kernel is its own process); join, then read
    ``result["path"]`` or re-raise ``result["error"]``."""
    result: dict = {}

    def target() -> None:
        try:
            result["path"] = run_notebook(out, epochs)
        except BaseException as err:  # handed to the main thread
            result["error"] = err

    thread = threading.Thread(target=target, name="cxr-notebook", daemon=True)
    thread.start()
    return thread, result


def run_vqa(out: Path, epochs: int) -> dict:
    llama = write_tiny_llama(out / "tiny_llama", vocabulary_texts())
    common = ["--config", str(CONFIGS / "vqa_demo.yaml"), "--model.llm", str(llama), *QUIET]
    stage1 = VQACLI(
        args=[
            *common,
            "--data.root",
            str(write_captions(out / "data" / "captions")),
            "--data.dataset",
            "captions",
            "--trainer.max_epochs",
            "2",
            "--trainer.default_root_dir",
            str(out / "vqa_stage1"),
        ],
        run=False,
    )
    stage1.trainer.fit(stage1.model, datamodule=stage1.datamodule)
    adapter = Path(stage1.trainer.log_dir) / "adapter"
    stage2 = VQACLI(
        args=[
            *common,
            "--data.root",
            str(write_vqa_rad(out / "data" / "vqa_rad", images=24, test_images=6)),
            "--model.init_adapter",
            str(adapter),
            "--trainer.max_epochs",
            str(epochs),
            "--trainer.default_root_dir",
            str(out / "vqa_stage2"),
        ],
        run=False,
    )
    stage2.trainer.fit(stage2.model, datamodule=stage2.datamodule)
    stage2.trainer.test(stage2.model, datamodule=stage2.datamodule)
    print(json.dumps(stage2.model.report, indent=2))
    return stage2.model.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="omnipeft medical demo")
    parser.add_argument("--out", default="runs/medical_demo")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument(
        "--notebook-epochs", type=int, default=3, help="epochs of the notebook's DenseNet LoRA"
    )
    parser.add_argument("--no-notebook", action="store_true", help="skip the notebook")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    run = run_cxr(out, args.epochs)
    run_explain(run, out)
    if not args.no_notebook:
        notebook, result = start_notebook(out, args.notebook_epochs)
    run_vqa(out, args.epochs)
    if not args.no_notebook:
        notebook.join()
        if "error" in result:
            raise result["error"]
        print(f"notebook executed with its outputs: {result['path']}")
    print(f"done: logs, adapters, reports and overlays under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
