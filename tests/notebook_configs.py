"""The configurations the course's notebooks run under in CI (tests/test_notebooks.py).

* ``embedded``: the environment as given: by default the embedded "shapes" model in float32 at
  the notebooks' own steps, where every claim of the text is checked (``course.Claims``).
* ``sd15-fp16``, ``sdxl-fp16``: the Colab configuration. A user on Colab sets
  ``MAG_EXPLORE_MODEL`` and gets the model in float16; here a tiny random folder of the same
  family (``python -m mag_explore.testing.folders``) is loaded with ``MAG_EXPLORE_DTYPE=fp16`` on
  the CPU, so the float16 path of every notebook and exercise runs without a GPU.
* ``flux-fp16``, ``sd3-fp16``: notebook 08 only (the MMDiT notebook), with the tiny folder in
  ``MAG_EXPLORE_FLUX``.

The tiny configurations run ``TINY_STEPS`` steps: enough for every method's default step range to
select a step (layout guidance guides while t > 800: 4 steps start at t = 751), few enough to keep
CI short. ``MAG_EXPLORE_NOTEBOOK_CONFIGS=embedded,sd15-fp16`` runs only those.
"""
from __future__ import annotations

import os
from pathlib import Path

TINY_STEPS = "8"
#: configuration -> (the tiny folder's kind, the environment variable it goes in); None: as given
CONFIGS = {
    "embedded": None,
    "sd15-fp16": ("sd15", "MAG_EXPLORE_MODEL"),
    "sdxl-fp16": ("sdxl", "MAG_EXPLORE_MODEL"),
    "flux-fp16": ("flux", "MAG_EXPLORE_FLUX"),
    "sd3-fp16": ("sd3", "MAG_EXPLORE_FLUX"),
}
MMDIT_ONLY = {"flux-fp16", "sd3-fp16"}  # notebook 08 is the one that reads MAG_EXPLORE_FLUX
MMDIT_NOTEBOOK = "08_beyond_cross_attention"


def runs(notebooks: list[Path]) -> list[tuple[str, Path]]:
    """(configuration, notebook) pairs: every notebook under the first three, 08 under the MMDiT ones."""
    chosen = os.environ.get("MAG_EXPLORE_NOTEBOOK_CONFIGS")
    names = [c for c in CONFIGS if not chosen or c in chosen.split(",")]
    return [(c, p) for c in names for p in notebooks if c not in MMDIT_ONLY or p.stem == MMDIT_NOTEBOOK]


_FOLDERS: dict[str, Path] = {}


def tiny_folder(kind: str, tmp_path_factory) -> Path:
    """The tiny ``kind`` folder of this test session, written on first use."""
    from mag_explore.testing.folders import write_tiny_folder

    if kind not in _FOLDERS:
        _FOLDERS[kind] = write_tiny_folder(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
    return _FOLDERS[kind]


def configuration_env(config: str, tmp_path_factory) -> dict[str, str]:
    """The environment variables a user would set for ``config`` (none for ``embedded``)."""
    if CONFIGS[config] is None:
        return {}
    kind, variable = CONFIGS[config]
    env = {variable: str(tiny_folder(kind, tmp_path_factory)), "MAG_EXPLORE_DTYPE": "fp16",
           "MAG_EXPLORE_STEPS": TINY_STEPS, "MAG_EXPLORE_QUICK": "1"}  # QUICK: notebook 05 on 2 layouts, 1 seed
    if kind == "sdxl":  # notebook 09 compares SD with SDXL: both sides are the tiny SDXL here
        env["MAG_EXPLORE_SDXL_MODEL"] = env[variable]
    if variable == "MAG_EXPLORE_FLUX":  # 08's UNet side: the tiny SD 1.5, as a Colab user's SD 1.5
        env["MAG_EXPLORE_MODEL"] = str(tiny_folder("sd15", tmp_path_factory))
    return env
