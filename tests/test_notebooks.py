"""The course notebooks: each runs top to bottom, none is committed with outputs, each keeps
the course's conventions (title with timings, Colab setup cell, one parameters cell).

Every ``notebooks/*.ipynb`` is picked up, including ones added later. The notebooks run on
the model the parameters cell chooses: the embedded "shapes" model unless
``MAG_EXPLORE_MODEL`` is set, at their own default steps (``MAG_EXPLORE_STEPS`` overrides), so
that the claims their text makes about its figures are checked (``course.Claims``); and again
under the Colab configurations, tiny SD 1.5 / SDXL / Flux.1 / SD3 folders in float16
(``tests/notebook_configs.py``).
"""
import os
import re
import subprocess
from pathlib import Path

import nbclient  # noqa: F401  (declared test dependencies: a missing one is a failure, not a skip)
import nbformat
import pytest

from mag_explore.course import nbcache
from mag_explore.course.nbtools import colab_url, links, outputs_of, run_notebook
from notebook_configs import configuration_env, runs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
RUNS = runs(NOTEBOOKS)  # (configuration, notebook): the embedded model and the Colab ones (tests/notebook_configs.py)
# Per notebook, on a busy 2-core CPU at the notebooks' defaults (the slowest, 05, takes about 4 minutes idle).
NOTEBOOK_TIMEOUT_S = int(os.environ.get("MAG_EXPLORE_NOTEBOOK_TIMEOUT", "900"))
# A cell that draws: the course's plots, pyplot, or a figure of evaluate's.
DRAWS = re.compile(r"\b(plot_\w+|plt\.(show|subplots|figure|imshow))\(")


def test_the_course_is_there():
    names = [p.stem for p in NOTEBOOKS]
    for expected in ("00_first_image", "01_capturing_cross_attention", "02_exploring_attention_maps",
                     "03_naive_attention_swapping", "04_masked_attention_guidance", "05_comparing_methods",
                     "07_prototype_your_own"):
        assert expected in names


@pytest.mark.slow
@pytest.mark.parametrize("config,path", RUNS, ids=[f"{c}-{p.stem}" for c, p in RUNS])
def test_notebook_runs_top_to_bottom(config, path, monkeypatch, tmp_path_factory):
    if os.environ.get("MAG_EXPLORE_STEPS"):
        monkeypatch.setenv("MAG_EXPLORE_STEPS", os.environ["MAG_EXPLORE_STEPS"])
    for name, value in configuration_env(config, tmp_path_factory).items():  # the Colab configurations
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # a failing cell raises CellExecutionError, which fails the test with the cell and traceback
    nb, seconds = run_notebook(path, cell_timeout=NOTEBOOK_TIMEOUT_S)
    if os.environ.get("MAG_EXPLORE_EXECUTED_DIR"):  # keep the executed notebook, to read it as a student would
        kept = Path(os.environ["MAG_EXPLORE_EXECUTED_DIR"]) / ("" if config == "embedded" else config)
        kept.mkdir(parents=True, exist_ok=True)
        if config == "embedded":  # with its cache key, so that the site build adopts it instead of running it again
            nbcache.stamp(nb, path)
        nbformat.write(nb, kept / path.name)
    assert seconds < NOTEBOOK_TIMEOUT_S, f"{path.name} took {seconds:.0f} s (limit {NOTEBOOK_TIMEOUT_S} s)"
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert_every_figure_shown(nb, path.name)
    assert_claims_checked(nb, path.name)
    # quiet: no third-party warnings or loading bars that a newcomer reads as errors
    streams = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    for noise in ("torchvision", "Loading pipeline components", "Loading weights"):
        assert noise not in streams, f"{path.name} printed {noise!r}"


def assert_every_figure_shown(nb, name: str) -> None:
    """Every cell that draws shows a picture, and no figure is left as bare ``<Figure ...>`` text
    (the symptom of a notebook whose inline backend stopped showing figures)."""
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    drawing = [i for i, c in code if DRAWS.search(c.source)]
    assert drawing, f"{name} draws no figure"
    for i, cell in code:
        outputs = cell.get("outputs", [])
        shown = any("image/png" in o.get("data", {}) for o in outputs)
        bare = [o["data"]["text/plain"] for o in outputs if "data" in o and "image/png" not in o["data"]
                and str(o["data"].get("text/plain", "")).startswith("<Figure")]
        assert not bare, f"{name} cell {i} printed {bare[0]!r} instead of showing the figure"
        pictures = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
        assert len(set(pictures)) == len(pictures), f"{name} cell {i} shows a figure twice (end its last plot call with ';')"
        if i in drawing:
            assert shown, f"{name} cell {i} draws but shows no figure:\n{cell.source[:300]}"


def assert_claims_checked(nb, name: str) -> None:
    """The text's claims about its figures are checked in the notebook (``claims.expect``): on the
    embedded model at the defaults every one prints ✓; elsewhere each says it was not checked."""
    calls = sum(c.source.count("claims.expect(") for c in nb.cells if c.cell_type == "code")
    assert calls >= 1, f"{name} checks none of the claims its text makes"
    streams = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    lines = [line for line in streams.splitlines() if line.startswith(("✓ ", "– not checked here"))]
    if not os.environ.get("MAG_EXPLORE_MODEL") and not os.environ.get("MAG_EXPLORE_STEPS"):
        assert lines and all(line.startswith("✓ ") for line in lines), f"{name}: {lines}"


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
    assert not found, f"{path.name} carries outputs ({found}); run `python -m mag_explore.course.nbtools strip {path}`"


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
        assert colab_url(path.name, ROOT) in readme


def test_colab_links_and_setup_cells_agree_with_pyproject():
    """One setting names the repository ([project.urls] Repository); `make links` rewrites the rest."""
    assert links(ROOT, check=True) == [], "run `make links` (python -m mag_explore.course.nbtools links)"
    from mag_explore.course.nbtools import repository_url

    url = repository_url(ROOT)
    for path in NOTEBOOKS:
        setup = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert f'REPO = "{url}"' in setup.source, path.name


def test_the_notebooks_call_the_exercise_checks():
    """Learners write the core: the notebooks call at least six distinct checks, every check in
    ``mag_explore.course.exercises`` is used by some notebook, and the learner cells ship unwritten."""
    import re

    from mag_explore.course import exercises

    called, unwritten = set(), 0
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                called |= set(re.findall(r"exercises\.(check_\w+)\(", cell.source))
                unwritten += cell.source.count("raise NotImplementedError")
    defined = {name for name in dir(exercises) if name.startswith("check_")}
    assert len(called) >= 6, called
    assert called <= defined, called - defined
    assert defined <= called, f"checks no notebook uses: {defined - called}"
    assert unwritten >= 6, "the learner cells are left for the learner (raise NotImplementedError)"
