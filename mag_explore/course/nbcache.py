"""A cache of executed course notebooks, keyed by everything that decides their outputs.

The documentation site shows every notebook with its outputs, made by the code of today. Running
all of them takes minutes, so an executed notebook is kept under a key: a hash of the notebook's
cells, of every file of the ``mag_explore`` package (code, embedded models, layouts), of the
settings that reach its parameters cell and of the versions of the libraries that draw the
pictures. An unchanged key means the outputs would be the same, so the notebook is not run again.

The test run executes the notebooks too (``tests/test_notebooks.py``). When it keeps them
(``MAG_EXPLORE_EXECUTED_DIR``) it stamps each with its key (:func:`stamp`), and the site build
adopts a stamped notebook whose key is current instead of running it a second time.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from importlib import metadata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: The environment variables the notebooks' parameters cells read: they change the outputs.
KEY_ENV = ("MAG_EXPLORE_MODEL", "MAG_EXPLORE_STEPS", "MAG_EXPLORE_FLUX")
#: Libraries whose version can change a number or a picture in the outputs.
KEY_PACKAGES = ("torch", "diffusers", "transformers", "numpy", "matplotlib", "pillow")
PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def package_digest(root: Path = PACKAGE) -> str:
    """A hash of every file of the package (paths and bytes), compiled files left out."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if "__pycache__" in relative.parts or path.suffix == ".pyc":
            continue
        digest.update(str(relative.as_posix()).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(path: str | Path) -> str:
    """The key of one notebook's outputs (16 hex digits); see the module's docstring."""
    nb = json.loads(Path(path).read_text())
    cells = [(c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"])
             for c in nb["cells"]]
    parts = {
        "cells": cells,
        "package": package_digest(),
        "env": {name: os.environ.get(name, "") for name in KEY_ENV},
        "versions": {name: _version(name) for name in KEY_PACKAGES},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def stamp(nb, path: str | Path) -> None:
    """Record in an executed notebook the key of the source it was executed from."""
    nb.metadata.setdefault("mag_explore", {})["cache_key"] = cache_key(path)


def _stamped_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["metadata"].get("mag_explore", {}).get("cache_key")
    except (OSError, ValueError, KeyError):
        return None


def cached_path(path: str | Path, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"{Path(path).stem}-{cache_key(path)}.ipynb"


def lookup(path: str | Path, cache_dir: str | Path, adopt_from: str | Path | None = None) -> Path | None:
    """The cached executed copy of ``path`` if its key is current (adopting a stamped copy from
    ``adopt_from`` into the cache on the way), else None."""
    target = cached_path(path, cache_dir)
    if target.exists():
        return target
    candidate = Path(adopt_from) / Path(path).name if adopt_from else None
    if candidate is not None and candidate.exists() and _stamped_key(candidate) == cache_key(path):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(candidate.read_bytes())
        return target
    return None


@contextlib.contextmanager
def execution_env():
    """The environment the tests run notebooks in: this checkout's package first on the path, one
    thread per kernel (unless set), the inline backend. Kernels inherit it."""
    root = PACKAGE.parent
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS", "MPLBACKEND")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), saved["PYTHONPATH"]]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute_into_cache(path: str | Path, cache_dir: str | Path, cell_timeout: int = 900) -> Path:
    """Execute ``path`` (its folder as working directory; call it inside :func:`execution_env`)
    and store the stamped result under its key, dropping the notebook's stale entries."""
    from .nbtools import _nbformat, run_notebook

    nb, _ = run_notebook(path, cell_timeout=cell_timeout)
    stamp(nb, path)
    target = cached_path(path, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{Path(path).stem}-*.ipynb"):
        stale.unlink()
    _nbformat().write(nb, target)
    return target


def executed(paths, cache_dir: str | Path, adopt_from=None, jobs: int = 2,
             allow_execute: bool = True) -> dict[Path, tuple[Path, str]]:
    """Each notebook's executed copy and how it was found: "cached", "adopted" or "executed".

    Notebooks missing from the cache run ``jobs`` at a time (each in its own kernel process);
    with ``allow_execute=False`` a missing one is an error instead (CI: the test run filled it).
    """
    found, missing = {}, []
    for path in map(Path, paths):
        was_there = cached_path(path, cache_dir).exists()
        hit = lookup(path, cache_dir, adopt_from)
        if hit is None:
            missing.append(path)
        else:
            found[path] = (hit, "cached" if was_there else "adopted")
    if missing and not allow_execute:
        raise RuntimeError(f"not in the cache of executed notebooks ({cache_dir}): "
                           f"{', '.join(p.name for p in missing)}")
    # threads suffice: each notebook runs in its own kernel process; the longest files first (a
    # rough guess at the slowest, so that two workers finish close together)
    missing.sort(key=lambda p: -p.stat().st_size)
    with execution_env(), ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for path, target in zip(missing, pool.map(lambda p: execute_into_cache(p, cache_dir), missing)):
            found[path] = (target, "executed")
    return found
