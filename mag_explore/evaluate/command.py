"""``python -m mag_explore evaluate``: one process or many, resumable, one results.csv.

Launched by ``torchrun`` or ``accelerate launch``, every process takes every N-th work
item (``run.shard``), appends each finished row to its own journal
``parts/rank<R>.csv``, and process 0 gathers the rows and writes results.csv in the
items' order, the summary, the grid and the frontier. An image depends only on its
layout, method, setting and seed, never on the split.

Resuming: ``run.json`` in ``--out`` records what the rows mean (model, steps, suite,
segmenter, the model's defaults). A run with the same ``--out`` checks it, then skips
every (layout, method, setting, seed) that results.csv or a journal already holds; a run
whose settings differ is refused; ``--fresh`` starts over.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..layouts.suite import SuiteLayout, load_suite
from .report import RowJournal, bootstrap_summary, format_summary, plot_frontier, plot_grid, read_csv, write_csv
from .run import Segmenter, check_methods, evaluate, image_path, load_segmenter, work_items
from .settings import DEFAULT, Settings, parse_sweeps

RESULTS, RUN_INFO, PARTS = "results.csv", "run.json", "parts"


def process_state(device: str | None):
    """accelerate's ``PartialState`` when launched as several processes, else None.

    On CPUs (``--device cpu`` or no GPU) ``cpu=True`` gives MULTI_CPU over gloo under torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def run_info(model, suite_path: Path, steps: int, segmenter: str | dict | None, defaults: dict) -> dict:
    """What the rows of an output folder mean; runs that differ here must not share a results.csv."""
    return {"model": str(model or "default"), "num_inference_steps": steps,
            "suite_sha256": hashlib.sha256(Path(suite_path).read_bytes()).hexdigest(),
            "segmenter": segmenter or "shapes colors",
            "model_defaults": {k: v for k, v in sorted(defaults.items()) if isinstance(v, (int, float, str, type(None)))}}


def check_run_info(out: Path, info: dict) -> None:
    path = out / RUN_INFO
    if not path.exists():
        return
    before = json.loads(path.read_text())
    differs = [f"{k}: {before.get(k)!r} there, {info[k]!r} now" for k in info if before.get(k) != info[k]]
    if differs:
        raise ValueError(f"--out {out} holds a run with other settings ({'; '.join(differs)}); refusing to mix "
                         f"them: pass another --out, or --fresh to start over")


def existing_rows(out: Path) -> list[dict]:
    """results.csv, then every process's journal (rows of an interrupted run), first row of a key wins."""
    files = ([out / RESULTS] if (out / RESULTS).exists() else []) + sorted((out / PARTS).glob("rank*.csv"))
    rows, seen = [], set()
    for path in files:
        for row in read_csv(path):
            key = (row["layout"], row["method"], row["setting"], row["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def run_evaluation(model: str | None, suite_path: str | Path, methods: Sequence[str], seeds: int, out: str | Path,
                   *, first_seed: int = 0, num_inference_steps: int | None = None, device: str | None = None,
                   segmenter: str | Segmenter | None = None, sweeps: Sequence[str] = (), settings: Settings | None = None,
                   fresh: bool = False, progress: bool = True, verbose: bool = False,
                   segmenter_options: dict | None = None) -> str:
    """What ``python -m mag_explore evaluate`` does; returns the summary table (process 0) or a line.

    Each layout and method runs with seeds ``first_seed .. first_seed + seeds - 1``.
    ``segmenter`` is a built-in name (``grounded-sam``, ``owl-sam``: ``segmenter_options``
    are ``build_real_scorer``'s keywords, e.g. detector, sam, clip, box_threshold), a
    ``package.module:function`` or a callable; None: the shapes world's colors.
    """
    from ..models.load import load_pipeline, model_defaults
    from ..shapes.world import COLORS

    _check_run_options(seeds, first_seed, num_inference_steps, methods)  # before anything is written to `out`
    settings = {**parse_sweeps(sweeps, methods), **(settings or {})}
    state = process_state(device)
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    if state is not None and device is None and state.device.type == "cuda":
        device = str(state.device)
    pipe = load_pipeline(model, device=device, verbose=verbose)
    spec = segmenter if isinstance(segmenter, str) or segmenter is None else getattr(segmenter, "__name__", "custom")
    segmenter = resolve_segmenter(segmenter, segmenter_options, pipe.device)  # built-in models: on the run's device
    if hasattr(segmenter, "describe"):
        spec = segmenter.describe()  # run.json names the detector, SAM, CLIP and thresholds
    defaults = model_defaults(pipe)
    suite = load_suite(suite_path, defaults["height"], defaults["width"], palette=COLORS)
    seed_list = list(range(first_seed, first_seed + seeds))
    items = work_items(suite, methods, seed_list, settings)
    out = Path(out)
    info = run_info(model, Path(suite_path), num_inference_steps or defaults["num_inference_steps"], spec, defaults)
    _prepare_out(out, info, fresh, state, rank)
    before = existing_rows(out)
    done = {(r["layout"], r["method"], r["setting"], r["seed"]) for r in before}
    new_rows, images = evaluate(
        pipe, suite, methods, seed_list, settings=settings, num_inference_steps=num_inference_steps,
        progress=progress and rank == 0,  # one bar (process 0's share), not N interleaved ones
        segmenter=segmenter,
        image_dir=out / "images", skip=done, on_row=RowJournal(out / PARTS / f"rank{rank}.csv"),
        rank=rank, world_size=world)
    new_rows, images = _gathered(state, new_rows, images)
    if rank != 0:
        return f"process {rank} of {world}: {len(new_rows)} images; process 0 writes {out / RESULTS}"
    rows = order_rows(before + new_rows, [i.key for i in items])
    images.update(_images_from_disk(out / "images", suite, methods, seed_list[0], images))
    used = sorted({int(r["seed"]) for r in rows})  # this run's and any earlier run's in `out`
    which = f"{len(used)} seeds" if used == list(range(len(used))) else f"{len(used)} seeds ({', '.join(map(str, used))})"
    title = (f"{len(suite)} layouts × {which}, model {model or 'default'}, "
             f"{info['num_inference_steps']} steps; 95 % CI: bootstrap over layouts")
    table = write_reports(suite, methods, rows, images, out, title)
    shutil.rmtree(out / PARTS, ignore_errors=True)  # all in results.csv now
    skipped = len([k for k in (i.key for i in items) if k in done])
    return table + (f"\n({skipped} of {len(items)} images were already in {out}; generated "
                    f"{len(new_rows)} in {world} process{'es' if world > 1 else ''})")


def _check_run_options(seeds: int, first_seed: int, num_inference_steps: int | None, methods: Sequence[str]) -> None:
    from ..validation import check_count

    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds < 1:
        raise ValueError(f"--seeds {seeds}: need at least 1")
    check_count("seeds", seeds)
    check_count("first_seed", first_seed, minimum=0)
    if num_inference_steps is not None:
        check_count("num_inference_steps", num_inference_steps, maximum=1000)
    check_methods(methods)


def _prepare_out(out: Path, info: dict, fresh: bool, state, rank: int) -> None:
    """Refuse to resume a different run in ``out`` (every process); process 0 clears it (``fresh``) and writes run.json."""
    if not fresh:
        check_run_info(out, info)  # every process, before anyone waits: a refusal never hangs the others
    _wait(state)
    if rank == 0:
        if fresh:
            for name in (RESULTS, RUN_INFO, "summary.md", "summary.json", "grid.png", "frontier.png"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / PARTS, ignore_errors=True)
            shutil.rmtree(out / "images", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    _wait(state)


def _gathered(state, rows: list, images: dict) -> tuple[list, dict]:
    """Every process's rows and images (several processes: gathered on each), or these."""
    if state is None:
        return rows, images
    from accelerate.utils import gather_object

    parts, gathered = gather_object([rows]), gather_object([images])
    return [row for part in parts for row in part], {k: v for part in gathered for k, v in part.items()}


def resolve_segmenter(segmenter: str | Segmenter | None, options: dict | None, device) -> Segmenter | None:
    """A built-in name -> its scorer (models on ``device``); ``module:function`` -> that function; else as given."""
    from .instances import build_real_scorer
    from .segmenters import SEGMENTER_DETECTORS

    if isinstance(segmenter, str) and segmenter in SEGMENTER_DETECTORS:
        return build_real_scorer(segmenter, device=device, **(options or {}))
    if options:
        raise ValueError(f"segmenter options {sorted(options)} belong to the built-in segmenters "
                         f"{list(SEGMENTER_DETECTORS)}, not to {segmenter!r}")
    return load_segmenter(segmenter) if isinstance(segmenter, str) else segmenter


def _wait(state) -> None:
    if state is not None:
        state.wait_for_everyone()


def order_rows(rows: Sequence[dict], keys: Sequence[tuple]) -> list[dict]:
    """The rows of ``keys`` in that order, then any others (from earlier runs) in theirs."""
    position = {k: i for i, k in enumerate(keys)}
    key = lambda r: (r["layout"], r["method"], r.get("setting", DEFAULT), r["seed"])
    known = sorted((r for r in rows if key(r) in position), key=lambda r: position[key(r)])
    return known + [r for r in rows if key(r) not in position]


def _images_from_disk(image_dir: Path, suite, methods, seed: int, have: dict) -> dict:
    found = {}
    for index, item in enumerate(suite):
        for method in methods:
            path = image_path(image_dir, index, method, seed)
            if (item.name, method) not in have and path.exists():
                found[(item.name, method)] = np.asarray(Image.open(path).convert("RGB"))
    return found


def write_reports(suite: Sequence[SuiteLayout], methods: Sequence[str], rows: Sequence[dict], images: dict,
                  out: str | Path, title: str) -> str:
    """results.csv, summary.md/json, grid.png and (with fidelity) frontier.png in ``out``; returns the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / RESULTS)
    summary = bootstrap_summary(rows, methods)
    table = format_summary(summary, title)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_grid(suite, list(dict.fromkeys(r["method"] for r in rows)), images, rows, out / "grid.png",
              min(r["seed"] for r in rows))
    written = [out / RESULTS, out / "summary.md", out / "grid.png"]
    figure = plot_frontier(summary, out / "frontier.png")
    if figure is not None:
        import matplotlib.pyplot as plt

        plt.close(figure)  # saved; a long sweep must not pile up open figures
        written.append(out / "frontier.png")
    return table + "\n\nwrote " + ", ".join(str(p) for p in written)


def merge_runs(suite: Sequence[SuiteLayout], run_dirs: Sequence[str | Path], out: str | Path, title: str) -> str:
    """Join finished runs of the same suite made with different ``--methods`` or settings.

    Each run folder needs its results.csv and images/ (the command writes both).
    """
    rows = [row for d in run_dirs for row in read_csv(Path(d) / RESULTS)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seed = min(r["seed"] for r in rows)
    images = {}
    for folder in run_dirs:
        images.update(_images_from_disk(Path(folder) / "images", suite, methods, seed, images))
    return write_reports(suite, methods, rows, images, out, title)
