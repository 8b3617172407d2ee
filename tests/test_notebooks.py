"""Every notebook under notebooks/ executes top to bottom (small settings), so the notebooks cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import REPO, need_data_file

from qafel.report.plots import PLOT_FILES

nbformat = pytest.importorskip("nbformat", reason="needs the dev extra: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="needs the dev extra: pip install -e '.[dev]'")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def execute(path: Path, out: Path, data_root: Path, **settings: str) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    keep = {k: v for k, v in os.environ.items()
            if k not in ("QAFEL_LR_STEPS", "QAFEL_GRID_STEPS", "QAFEL_BITGRID")}  # the small, default settings
    env = {**keep, **settings, "QAFEL_FULL": "0", "QAFEL_NOTEBOOK_OUT": str(out), "QAFEL_DATA_ROOT": str(data_root),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "MPLBACKEND": "Agg", "WANDB_MODE": "disabled"}
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)
    return nb


def test_there_is_a_paper_reproduction_notebook():
    assert REPO / "notebooks" / "paper_reproduction.ipynb" in NOTEBOOKS


@pytest.mark.slow
@pytest.mark.needs_data
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_top_to_bottom(path, tmp_path):
    data_root = need_data_file("mushrooms.libsvm").parent.resolve()
    nb = execute(path, tmp_path, data_root)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    if path.stem == "paper_reproduction":
        reports = tmp_path / "small" / "reports"
        assert {d.name for d in reports.iterdir()} == {"lr_qsgd", "lr_topk", "lr_local_steps", "bitgrid_digits"}
        for d in reports.iterdir():
            assert (d / "table.md").stat().st_size > 0 and (d / "table.csv").stat().st_size > 0
            assert len(list(d.glob("*.png"))) == len(PLOT_FILES)
        shown = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert len(shown) >= 8
        text = "".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells for o in c.get("outputs", []))
        assert "26,057" in text and "| QAFeL 4/4 × fewer MB up | 7.1× |" in text


@pytest.mark.slow
def test_a_copy_outside_the_repository_executes(tmp_path):
    """The notebook finds its configs through the installed package (qafel.config_dir()), not the working
    directory: a copy in a folder outside the checkout runs there (the fewest steps; the data root as given)."""
    copy = tmp_path / "elsewhere" / "paper_reproduction.ipynb"
    copy.parent.mkdir()
    copy.write_bytes((REPO / "notebooks" / "paper_reproduction.ipynb").read_bytes())
    assert not copy.resolve().is_relative_to(REPO.resolve())
    data_root = Path(os.environ.get("QAFEL_DATA_ROOT", tmp_path / "no-data")).resolve()
    nb = execute(copy, tmp_path / "out", data_root, QAFEL_LR_STEPS="2", QAFEL_GRID_STEPS="2")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors[0] if errors else ""
    assert (tmp_path / "out" / "small_lr2_grid2" / "reports").is_dir()
    assert not (copy.parent / "outputs").exists()  # QAFEL_NOTEBOOK_OUT took the outputs
