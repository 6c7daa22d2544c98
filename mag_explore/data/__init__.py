"""The data shipped inside the package: the embedded "shapes" model (``models/shapes``),
example layouts (``layouts``), the evaluation suite (``suites``) and model configs (``configs``).

Found with ``importlib.resources``, so it is the same in a checkout, an editable install
and a wheel installed into site-packages. ``$MAG_EXPLORE_DATA`` points elsewhere.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

#: Environment variable: a data folder to use instead of the package's own.
DATA_ENV = "MAG_EXPLORE_DATA"


def data_dir() -> Path:
    """The data folder: ``$MAG_EXPLORE_DATA`` if set, else the package's ``mag_explore/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    folder = files(__name__)
    if not isinstance(folder, Path):  # a zip import: the model folder must be a real folder
        raise FileNotFoundError(f"mag_explore's data is inside an archive ({folder}); install the package "
                                "unzipped (pip does) or set $MAG_EXPLORE_DATA to a data folder")
    return folder


def data_path(*parts: str) -> Path:
    """A file or folder of the shipped data, e.g. ``data_path("suites", "shapes.json")``."""
    return data_dir().joinpath(*parts)
