"""The analysis notebooks execute end to end on a tiny store (so they cannot rot)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from _smoke import smoke_method_study, smoke_study  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "analysis_notebooks"
NAMES = ["appendix_c_correlations", "table1", "figure2_figure3", "tradeoff_pareto"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    store, study_dir, _ = smoke_method_study() if name == "tradeoff_pareto" else smoke_study()
    monkeypatch.setenv("TVDIAG_STORE", str(store.root))
    monkeypatch.setenv("TVDIAG_STUDY_DIR", str(study_dir))
    monkeypatch.setenv("TVDIAG_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("TVDIAG_N_BOOT", "50")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # the kernel must be this interpreter (jupyter_client maps the native "python3" spec to sys.executable)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    first = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert os.path.realpath(first) == os.path.realpath(sys.executable)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    expected = {"appendix_c_correlations": ["figure6.png"], "table1": [],
                "figure2_figure3": ["figure2.png", "figure3.png"], "tradeoff_pareto": ["pareto.png"]}[name]
    assert pngs == expected
    if name == "table1":
        assert len(list(tmp_path.glob("table1-*.csv"))) == 1
