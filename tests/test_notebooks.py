"""The course notebooks: each runs top to bottom, none is committed with outputs, each keeps
the course's conventions (title with timings, Colab setup cell, one parameters cell).

Every ``notebooks/*.ipynb`` is picked up, including ones added later. The notebooks run on
the model the parameters cell chooses: the embedded "shapes" model unless
``MAG_EXPLORE_MODEL`` is set, with ``MAG_EXPLORE_STEPS`` (default here: 8) denoising steps,
so that the whole series stays quick in CI.
"""
import os
import subprocess
from pathlib import Path

import nbclient  # noqa: F401  (declared test dependencies: a missing one is a failure, not a skip)
import nbformat
import pytest

from mag_explore.nbtools import outputs_of, run_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TEST_STEPS = os.environ.get("MAG_EXPLORE_TEST_STEPS", "8")
# Per notebook, on a busy 2-core CPU with the tiny step count (the slowest takes well under a minute).
NOTEBOOK_TIMEOUT_S = int(os.environ.get("MAG_EXPLORE_NOTEBOOK_TIMEOUT", "300"))


def test_the_course_is_there():
    names = [p.stem for p in NOTEBOOKS]
    for expected in ("00_first_image", "01_capturing_cross_attention", "02_exploring_attention_maps",
                     "03_naive_attention_swapping", "04_masked_attention_guidance", "05_comparing_methods",
                     "07_prototype_your_own"):
        assert expected in names


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    monkeypatch.setenv("MAG_EXPLORE_STEPS", os.environ.get("MAG_EXPLORE_STEPS") or TEST_STEPS)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # a failing cell raises CellExecutionError, which fails the test with the cell and traceback
    nb, seconds = run_notebook(path, cell_timeout=NOTEBOOK_TIMEOUT_S)
    assert seconds < NOTEBOOK_TIMEOUT_S, f"{path.name} took {seconds:.0f} s (limit {NOTEBOOK_TIMEOUT_S} s)"
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images > 0, f"{path.name} showed no figure"
    # quiet: no third-party warnings or loading bars that a newcomer reads as errors
    streams = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    for noise in ("torchvision", "Loading pipeline components", "Loading weights"):
        assert noise not in streams, f"{path.name} printed {noise!r}"


def _tracked_notebooks() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "notebooks/*.ipynb"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        return NOTEBOOKS
    return [ROOT / name for name in listed]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    if path not in _tracked_notebooks():
        pytest.skip(f"{path.name} is not in git yet")
    found = outputs_of(nbformat.read(path, as_version=4))
    assert not found, f"{path.name} carries outputs ({found}); run `python -m mag_explore.nbtools strip {path}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_follows_the_course_conventions(path):
    nb = nbformat.read(path, as_version=4)
    title = nb.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    assert "CPU" in title.source and "GPU" in title.source, "the title cell says how long it takes on CPU and GPU"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert '"google.colab" in sys.modules' in code[0].source, "the first code cell is the Colab setup"
    parameters = [c for c in code if "parameters" in c.metadata.get("tags", []) or "MAG_EXPLORE_MODEL" in c.source]
    assert len(parameters) == 1, "exactly one parameters cell (the one that reads MAG_EXPLORE_MODEL)"
    assert "MAG_EXPLORE_STEPS" in parameters[0].source
    assert any("exercise" in c.source.lower() for c in nb.cells if c.cell_type == "markdown")


def test_readme_links_every_notebook_to_colab():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"https://colab.research.google.com/github/OWNER/mag-explore/blob/main/notebooks/{path.name}" in readme
