"""The clinicians' notebook parses as nbformat 4, and executes end to end with nbclient in a
Jupyter kernel on generated data (``medical.demo.run_notebook``, as ``make demo-medical``
runs it) with its outputs checked: the AUROC table with intervals, the ROC figure, four
Grad-CAM overlays, and the adapter reloading to the same scores."""

from __future__ import annotations

import json
import re

from medical.demo import NOTEBOOK, run_notebook


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


def _outputs(cell: dict, kind: str) -> list[dict]:
    return [o for o in cell["outputs"] if o["output_type"] == kind]


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)  # nbformat splits lines


def _stdout(cell: dict) -> str:
    return "".join(_text(o["text"]) for o in _outputs(cell, "stream") if o["name"] == "stdout")


def _cell_with(nb: dict, text: str) -> dict:
    return next(c for c in nb["cells"] if c["cell_type"] == "code" and text in "".join(c["source"]))


def test_notebook_executes_with_nbclient_and_shows_its_results(tmp_path):
    executed = run_notebook(tmp_path, epochs=1)
    assert executed == tmp_path / NOTEBOOK.name
    nb = json.loads(executed.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert not any(_outputs(c, "error") for c in code)

    table = _stdout(_cell_with(nb, "auroc_table(report"))
    rows = re.findall(r"^(\S[\w ]*?)\s+(\d\.\d{3}|nan)\s+\[(\S+), (\S+)\]$", table, re.M)
    assert [r[0] for r in rows][-1] == "mean" and len(rows) == 15
    for _, auroc, low, high in rows:
        if auroc != "nan":
            assert float(low) <= float(auroc) <= float(high)
    roc = _cell_with(nb, "roc_curve")
    assert any("image/png" in o["data"] for o in _outputs(roc, "display_data"))
    assert (tmp_path / "notebook" / "roc.png").stat().st_size > 1000
    gradcam = _outputs(_cell_with(nb, "write_overlays"), "display_data")
    assert len(gradcam) == 4 and all("image/png" in o["data"] for o in gradcam)
    assert len(list((tmp_path / "notebook" / "gradcam").glob("*.png"))) == 4
    reload = re.search(r"largest difference after reloading: (\S+)", _stdout(code[-1]))
    assert reload and float(reload.group(1)) < 1e-5
    assert (tmp_path / "notebook" / "nih" / "Data_Entry_2017_v2020.csv").is_file()
