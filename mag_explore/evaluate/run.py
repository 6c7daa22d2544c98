"""Generating the images of an evaluation: its work items, in a fixed order, and their rows."""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..layouts import mask_iou
from ..layouts.suite import MAX_REGIONS, SuiteLayout
from .instances import REAL_COLUMNS
from .segmenters import SEGMENTER_DETECTORS
from .settings import DEFAULT, Settings, controls_for, setting_label, setting_slug, settings_of

Segmenter = Callable[[np.ndarray, Sequence[str]], Sequence[np.ndarray]]
ROW_FIELDS = ["method", "setting", "layout", "seed", "regions", "iou"] + [
    f"iou_{i + 1}" for i in range(MAX_REGIONS)] + ["fidelity", "present", "shapes_ok", "extra_colors", "seconds",
    "peak_mib"] + REAL_COLUMNS  # peak_mib: GPU memory of the generation; REAL_COLUMNS: a real-image segmenter's


@dataclass(frozen=True)
class Item:
    """One image of an evaluation."""

    layout_index: int
    layout: str
    method: str
    setting: str
    options: tuple  # the setting as sorted (key, value) pairs
    seed: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        """What identifies its row in results.csv: (layout, method, setting, seed)."""
        return (self.layout, self.method, self.setting, self.seed)


def work_items(suite: Sequence[SuiteLayout], methods: Sequence[str], seeds: Sequence[int],
               settings: Settings | None = None) -> list[Item]:
    """Every (layout, method, setting, seed), in the order of results.csv."""
    check_methods(methods)
    per_method = {m: settings_of(m, settings) for m in methods}
    return [Item(index, entry.name, method, setting_label(options), tuple(sorted(options.items())), seed)
            for index, entry in enumerate(suite) for method in methods
            for options in per_method[method] for seed in seeds]


def shard(items: Sequence[Item], rank: int, world_size: int) -> list[Item]:
    """The items of process ``rank`` of ``world_size``: every world_size-th, so methods mix evenly."""
    if not 0 <= rank < world_size:
        raise ValueError(f"process {rank} of {world_size}: the rank must be in 0..{world_size - 1}")
    return list(items[rank::world_size])


def check_methods(methods: Sequence[str]) -> None:
    from ..methods import METHOD_NAMES

    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown or list(methods)}; use some of {list(METHOD_NAMES)}")


def load_segmenter(spec: str) -> Segmenter:
    """``"package.module:function"`` -> that function (imported, never evaluated)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--segmenter {spec!r}: write it as package.module:function, or name a built-in one: "
                         f"{', '.join(SEGMENTER_DETECTORS)}")
    function = getattr(importlib.import_module(module), name, None)
    if not callable(function):
        raise ValueError(f"--segmenter {spec!r}: {module} has no function {name!r}")
    return function


def image_path(image_dir: str | Path, index: int, method: str, seed: int, setting: str = DEFAULT) -> Path:
    """Where ``evaluate`` saves an image: ``<method>/[<setting>/]layoutNN_seedS.png``."""
    folder = Path(image_dir) / method
    if setting != DEFAULT:
        folder = folder / setting_slug(setting)
    return folder / f"layout{index:02d}_seed{seed}.png"


def evaluate(pipe, suite: Sequence[SuiteLayout], methods: Sequence[str], seeds: Sequence[int], *,
             settings: Settings | None = None, segmenter: Segmenter | None = None,
             fidelity: Callable[[np.ndarray, str], dict] | None = None, num_inference_steps: int | None = None,
             method_options: dict | None = None, image_dir: str | Path | None = None,
             skip: set | frozenset = frozenset(), on_row: Callable[[dict], None] | None = None,
             rank: int = 0, world_size: int = 1, progress: bool = True) -> tuple[list[dict], dict]:
    """Generate every (layout, method, setting, seed); returns the rows and the default setting's images.

    ``settings`` maps a method to its list of option dicts (a sweep), e.g.
    ``{"mag": [{}, {"alpha": 0.05}, {"alpha": 0.1}], "pww": [{"weight": 0.4}]}``; a method left
    out runs its default ``{}``. ``method_options`` (one dict per method) changes the default
    itself. ``segmenter`` defaults to the shapes world's ``color_segmenter`` and ``fidelity``
    to ``shapes_fidelity``. ``skip`` holds item keys (layout, method, setting, seed) already
    done; ``on_row`` is called with each row as soon as its image is scored; ``rank`` and
    ``world_size`` pick this process's share (``shard``). With ``image_dir`` every image is
    saved as a PNG (``image_path``). Images: ``{(layout name, method): array}`` of the first
    seed at the default setting.
    """
    from ..sampling import generate
    from ..shapes.segment import color_segmenter, shapes_fidelity

    segmenter = segmenter or color_segmenter
    fidelity = fidelity if fidelity is not None else (shapes_fidelity if segmenter is color_segmenter else None)
    base = method_options or {}
    items = [i for i in shard(work_items(suite, methods, seeds, settings), rank, world_size) if i.key not in skip]
    rows, images = [], {}
    for item in tqdm(items, desc=f"evaluate{f' [{rank}/{world_size}]' if world_size > 1 else ''}", unit="image",
                     disable=not progress):
        entry = suite[item.layout_index]
        options = {**base.get(item.method, {}), **dict(item.options)}
        controls = controls_for(item.method, entry.layout, options)
        _reset_peak_memory(pipe)
        start = time.perf_counter()
        result = generate(pipe, entry.layout.prompt, num_inference_steps=num_inference_steps, seed=item.seed,
                          controls=controls, progress=False)
        seconds = time.perf_counter() - start
        peak = _peak_memory_mib(pipe)  # before the segmenter runs on the same GPU
        image = np.asarray(result.images[0])
        if image_dir is not None:
            path = image_path(image_dir, item.layout_index, item.method, item.seed, item.setting)
            path.parent.mkdir(parents=True, exist_ok=True)
            result.images[0].save(path)
        row = score_row(item, entry, image, segmenter, fidelity, seconds)
        row["peak_mib"] = peak
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if item.seed == seeds[0] and item.setting == DEFAULT:
            images[(item.layout, item.method)] = image
    return rows, images


def score_row(item: Item, entry: SuiteLayout, image: np.ndarray, segmenter: Segmenter, fidelity, seconds) -> dict:
    """The CSV row of one image: IoU per region and on average, fidelity scores, seconds."""
    phrases = entry.layout.labels
    measure = getattr(segmenter, "measure", None)  # a real-image scorer (instances.py) adds its own columns
    masks, extra = measure(image, entry.layout) if measure is not None else (list(segmenter(image, phrases)), {})
    if len(masks) != len(phrases):
        raise ValueError(f"the segmenter returned {len(masks)} masks for {len(phrases)} phrases {phrases}")
    ious = [mask_iou(np.asarray(m, bool), r.mask) for m, r in zip(masks, entry.layout.regions)]
    row = {"method": item.method, "setting": item.setting, "layout": item.layout, "seed": item.seed,
           "regions": len(ious), "iou": float(np.mean(ious))}
    row.update({f"iou_{i + 1}": (ious[i] if i < len(ious) else "") for i in range(MAX_REGIONS)})
    scores = fidelity(image, entry.layout.prompt) if fidelity else {}
    row.update({k: scores.get(k, "") for k in ("fidelity", "present", "shapes_ok", "extra_colors")})
    row["seconds"] = seconds
    row.update({k: extra.get(k, "") for k in REAL_COLUMNS})
    return row


def _cuda_device(pipe):
    """The pipeline's CUDA device, or None when it runs elsewhere."""
    device = getattr(pipe, "device", None)
    return device if device is not None and device.type == "cuda" else None


def _reset_peak_memory(pipe) -> None:
    import torch

    if (device := _cuda_device(pipe)) is not None:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mib(pipe):
    """The GPU memory the generation of one image peaked at, in MiB ("" off the GPU)."""
    import torch

    device = _cuda_device(pipe)
    return torch.cuda.max_memory_allocated(device) / 2**20 if device is not None else ""
