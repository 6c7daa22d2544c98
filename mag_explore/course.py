"""Small helpers the notebooks share, so that their cells stay short.

* :func:`example_layout` - an example layout shipped with the package, at the model's size;
* :func:`run_methods_on` - none / swap / MAG (or any method) with the same seed;
* :func:`region_iou`, :func:`iou_text`, :func:`color_ious` - how well each region's object
  landed where it was asked, in the shapes world (segmentation by color, so no segmentation
  model is needed); ``mag_explore.evaluate`` does the same over a whole suite;
* :func:`first_step_attention` - MAG's first guided step, before and after.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from .attention import AttentionStore
from .layouts import Layout
from .methods import MaskedAttentionGuidance, MaskedAttentionSwap, run_methods_on
from .data import data_dir
from .models import model_defaults
from .sampling import GenerationResult, Sampler, decode_latents, generate
from .shapes.scoring import color_ious, color_of, iou_text, region_iou

__all__ = ["EXAMPLE_LAYOUTS", "color_ious", "color_of", "example_layout", "first_step_attention", "iou_text",
           "method_images", "region_iou", "run_methods_on", "swap_sweep", "x0_images"]

EXAMPLE_LAYOUTS = ("left_right", "top_bottom", "three_objects")


def x0_images(pipe, result: GenerationResult, count: int = 6) -> dict:
    """The model's guess of the final image at ``count`` evenly spaced steps (needs ``keep_x0=True``)."""
    if not result.step_x0:
        raise ValueError("no predictions kept: run the Sampler (or generate) with keep_x0=True")
    picks = np.linspace(0, len(result.step_x0) - 1, min(count, len(result.step_x0))).round().astype(int)
    return {f"step {i} (t={result.timesteps[i]})": decode_latents(pipe, result.step_x0[i].to(pipe.vae.device))[1][0]
            for i in dict.fromkeys(picks.tolist())}


def swap_sweep(pipe, layout: Layout, stops: Sequence[int], seed: int = 0,
               num_inference_steps: int | None = None) -> dict:
    """Masked-attention swapping during the first ``k`` steps, for each ``k`` in ``stops`` (0: no swap)."""
    runs = {}
    for stop in stops:
        controls = [MaskedAttentionSwap(layout, step_range=(0, stop))] if stop > 0 else []
        runs[f"swap steps 0–{stop - 1}" if stop else "no swap"] = generate(
            pipe, layout.prompt, num_inference_steps=num_inference_steps, seed=seed, controls=controls,
            progress=False)
    return runs


def example_layout(name: str, pipe=None, size: int | tuple[int, int] | None = None) -> Layout:
    """The shipped example ``layouts/<name>.json`` (``mx.data_path``) at the model's image size (or ``size``), with its prompt."""
    path = data_dir() / "layouts" / f"{name}.json"
    if not path.is_file():
        found = sorted(p.stem for p in path.parent.glob("*.json"))
        raise FileNotFoundError(f"no example layout {name!r} in {path.parent}; examples: {found}")
    layout = Layout.from_json(path)
    if size is None and pipe is not None:
        defaults = model_defaults(pipe)
        size = (defaults["height"], defaults["width"])
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        layout = layout.resized(height, width)  # nearest; the PNGs are label images
    return layout


def method_images(item, methods: Sequence[str], images: dict, rows: Sequence[dict], seed: int) -> dict:
    """``{"mag · IoU 0.42": image, ...}`` for one layout of an ``evaluate`` run (its first seed)."""
    iou = {r["method"]: r["iou"] for r in rows if r["layout"] == item.name and r["seed"] == seed}
    return {f"{method} · IoU {iou[method]:.2f}": images[(item.name, method)] for method in methods}


def first_step_attention(pipe, layout: Layout, alpha: float | None = None, seed: int = 0,
                         num_inference_steps: int | None = None) -> dict:
    """MAG's first step up close: the first denoising step without and with one guided update.

    Returns the loss and each region's share of attention inside its mask before and
    after one update of x_T (MAG runs two iterations at step 0: the second one measures
    the effect of the first), and the step-0 attention of the denoising pass without
    guidance (``plain_store``) and after the updates (``guided_store``).
    """
    plain_store, guided_store = AttentionStore(), AttentionStore()
    # iterations=2: the second entry of the history is measured after the first update
    mag = MaskedAttentionGuidance(layout, alpha=alpha, step_range=(0, 1), iterations=2)  # alpha None: the model's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        Sampler(pipe, layout.prompt, seed=seed, num_inference_steps=num_inference_steps, store=plain_store).step()
        guided = Sampler(pipe, layout.prompt, seed=seed, num_inference_steps=num_inference_steps, store=guided_store,
                         controls=[mag])
        guided.step()
    before, after = mag.history[0], mag.history[1]
    return {
        "loss_before": before["loss"], "loss_after": after["loss"],
        "inside_before": before["inside_share"], "inside_after": after["inside_share"],
        "labels": layout.labels,
        "plain_store": plain_store, "guided_store": guided_store, "alpha": mag.settings["alpha"],
    }
