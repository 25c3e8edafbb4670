"""The clinicians' notebook parses as nbformat 4 and its code cells run end to end on
generated data (with nbclient when installed, else by executing the cells in order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from med_toy import single_thread  # noqa: F401

NOTEBOOK = Path(__file__).resolve().parents[2] / "medical" / "notebooks" / "cxr_lora.ipynb"
pytestmark = pytest.mark.usefixtures("single_thread")


def test_notebook_is_valid_nbformat():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert kinds.count("code") >= 7 and kinds[0] == "markdown"
    for cell in nb["cells"]:
        assert isinstance(cell["source"], list) and "id" in cell
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            compile("".join(cell["source"]), "cell", "exec")


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDICAL_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_EPOCHS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("CXR_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    nb = json.loads(NOTEBOOK.read_text())
    namespace: dict = {"__name__": "__main__"}
    for number, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            exec(
                compile("".join(cell["source"]), f"{NOTEBOOK.name} cell {number}", "exec"),
                namespace,
            )
    assert [row["finding"] for row in namespace["table"]][-1] == "mean"
    assert len(namespace["table"]) == 15
    assert namespace["ROC_PNG"].stat().st_size > 1000
    assert len(namespace["OVERLAYS"]) == 4 and all(p.is_file() for p in namespace["OVERLAYS"])
    assert namespace["MAX_DIFF"] < 1e-5
    assert (tmp_path / "nih" / "Data_Entry_2017_v2020.csv").is_file()
