"""Small helpers the notebooks share, so that their cells stay short.

* :func:`example_layout` - an example layout shipped with the package, at the model's size;
* :func:`run_methods_on` - none / swap / MAG (or any method) with the same seed;
* :func:`region_iou`, :func:`iou_text`, :func:`color_ious` - how well each region's object
  landed where it was asked, in the shapes world (segmentation by color, so no segmentation
  model is needed); ``mag_explore.evaluate`` does the same over a whole suite;
* :func:`first_step_attention` - MAG's first guided step (one update), before and after;
* :func:`attention_inside_outside` - did the words attend inside their regions;
* :func:`guidance_cost` - what MAG adds per guided step, measured;
* :class:`Claims` - the text's claims about a figure, checked where the reader sees them.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from .attention import AttentionStore
from .layouts import Layout
from .methods import MaskedAttentionGuidance, MaskedAttentionSwap, run_methods_on
from .data import data_dir
from .models import model_defaults
from .sampling import GenerationResult, Sampler, decode_latents, generate
from .shapes.scoring import color_ious, color_masks, color_of, iou_text, object_counts, region_iou

__all__ = ["Claims", "ClaimFailed", "EXAMPLE_LAYOUTS", "describe", "color_ious", "color_masks", "color_of", "example_layout", "first_step_attention", "iou_text",
           "method_images", "object_counts", "region_iou", "run_methods_on", "swap_sweep", "x0_images"]

EXAMPLE_LAYOUTS = ("left_right", "top_bottom", "three_objects")


def describe(pipe) -> str:
    """One line for a notebook's first output: the model, where it runs and what a run does by default."""
    from .families import denoiser
    from .models import _pipeline_folder

    folder = _pipeline_folder(pipe)
    name = folder.name if folder is not None else (getattr(pipe, "name_or_path", None) or type(pipe).__name__)
    d = model_defaults(pipe)
    place = str(pipe.device) + (f", {torch.get_num_threads()} CPU thread(s)" if pipe.device.type == "cpu" else "")
    return (f"model {name!r} ({type(pipe).__name__}) on {place}, {denoiser(pipe).dtype}: "
            f"{d['height']}×{d['width']} images, {d['num_inference_steps']} steps, CFG {d['guidance_scale']}")


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
                         num_inference_steps: int | None = None, step_fn=None) -> dict:
    """MAG's first step up close: the first denoising step without and with *one* update of x_T.

    Returns the loss and each region's share of attention inside its mask before the update
    and after it, and the step-0 attention of the denoising pass without guidance
    (``plain_store``) and after the update (``guided_store``). The "after" figures come from
    a probe: a second MAG with α = 0, which measures the loss at the updated latent and
    moves nothing. ``step_fn``: your own ``mag_step(step, alpha, lmbda)`` instead of the
    package's (notebook 04).
    """
    from .learner import LearnerMAG

    defaults = model_defaults(pipe)
    alpha = defaults["mag_alpha"] if alpha is None else alpha
    lmbda = defaults["mag_lambda"]
    plain_store, guided_store = AttentionStore(), AttentionStore()
    update = (MaskedAttentionGuidance(layout, alpha=alpha, lmbda=lmbda, step_range=(0, 1)) if step_fn is None
              else LearnerMAG(layout, step_fn, alpha, lmbda, step_range=(0, 1)))
    before = MaskedAttentionGuidance(layout, alpha=0.0, lmbda=lmbda, step_range=(0, 1))  # measures x_T, moves nothing
    after = MaskedAttentionGuidance(layout, alpha=0.0, lmbda=lmbda, step_range=(0, 1))  # measures the updated x_T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        Sampler(pipe, layout.prompt, seed=seed, num_inference_steps=num_inference_steps, store=plain_store).step()
        Sampler(pipe, layout.prompt, seed=seed, num_inference_steps=num_inference_steps, store=guided_store,
                controls=[before, update, after]).step()
    first, second = before.history[0], after.history[0]
    return {
        "loss_before": first["loss"], "loss_after": second["loss"],
        "inside_before": first["inside_share"], "inside_after": second["inside_share"],
        "labels": layout.labels,
        "plain_store": plain_store, "guided_store": guided_store, "alpha": alpha, "updates": 1,
    }


def attention_inside_outside(result: GenerationResult, layout: Layout) -> dict[str, dict[str, float]]:
    """Per region: its words' mean attention per pixel inside and outside its mask (all steps and layers).

    ``ratio`` > 1 means the words attend more inside their region than outside, per pixel:
    the test of whether a run followed a painted stroke. Needs a result with a store.
    """
    if result.store is None or not result.store.maps:
        raise ValueError("this result has no attention maps: run with store=AttentionStore()")
    resolved = layout.resolve(result.tokenizer, result.prompt)
    scores = {}
    for i, region in enumerate(resolved.regions):
        heat = result.store.aggregate(tokens=list(region.token_indices)).sum(0)  # (h, w) at the finest layer
        mask = resolved.masks_at(*heat.shape)[i] > 0.5
        inside, outside = float(heat[mask].mean()), float(heat[~mask].mean()) if (~mask).any() else float("nan")
        scores[resolved.label(i)] = {"inside": inside, "outside": outside, "ratio": inside / max(outside, 1e-12)}
    return scores


def guidance_cost(pipe, layout: Layout, seed: int = 0, num_inference_steps: int | None = None,
                  repeats: int = 2) -> dict:
    """What MAG adds per guided step, measured: seconds of a plain step and of a guided one.

    Runs the sampler with and without MAG (the model's defaults) ``repeats`` times, times each
    step, and compares the guided steps with the same steps of the plain run (best of the
    repeats, so a busy machine inflates it less). A guided step adds one conditional UNet
    pass with explicit attention, and its backward pass.
    """
    import time

    def timed(controls) -> list[float]:
        sampler = Sampler(pipe, layout.prompt, seed=seed, num_inference_steps=num_inference_steps, controls=controls)
        seconds = []
        while not sampler.done:
            start = time.perf_counter()
            sampler.step()
            seconds.append(time.perf_counter() - start)
        return seconds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain, guided, mag = None, None, None
        for _ in range(repeats):
            mag = MaskedAttentionGuidance(layout)  # the model's defaults
            p, g = timed([]), timed([mag])
            plain = p if plain is None else [min(a, b) for a, b in zip(plain, p)]
            guided = g if guided is None else [min(a, b) for a, b in zip(guided, g)]
    steps_guided = sorted({h["step"] for h in mag.history})
    if not steps_guided:
        raise ValueError("MAG guided no step with these settings: nothing to measure")
    plain_s = float(np.mean([plain[i] for i in steps_guided]))
    guided_s = float(np.mean([guided[i] for i in steps_guided]))
    return {"guided_steps": steps_guided, "plain_step_s": plain_s, "guided_step_s": guided_s,
            "added_s": guided_s - plain_s, "ratio": guided_s / plain_s,
            "run_plain_s": float(sum(plain)), "run_mag_s": float(sum(guided))}


class ClaimFailed(AssertionError):
    """A sentence of the course no longer describes what its figure shows."""


class Claims:
    """The course's claims about its figures, checked in the notebook that makes them.

    The text beside a figure says what it shows ("MAG places both objects, IoU above 0.8").
    Those numbers are measured on the embedded model at the notebook's defaults, so they are
    checked only there: elsewhere (another model, fewer steps, random weights) each claim is
    printed as *not checked here*, visibly, instead of failing or asserting nonsense.

        claims = course.Claims(pipe, STEPS)
        claims.expect("MAG places the circle (IoU > 0.8)", ious["red circle"] > 0.8, ious)

    prints ``✓ MAG places the circle (IoU > 0.8) · measured {...}`` or raises
    :class:`ClaimFailed` naming the claim and what was measured (so CI fails when a model or a
    default change makes the text false).
    """

    def __init__(self, pipe, steps: int | None = None, model: str = "shapes", text_steps: int | None = None):
        """``steps``: the run's steps (None: the model's default); ``text_steps``: the steps the text
        was measured at (None: the model's default; notebook 06 edits at 25)."""
        from .model_files import embedded_model_dir
        from .models import _pipeline_folder

        folder = _pipeline_folder(pipe)
        self.model = model
        on_model = folder is not None and folder.resolve() == embedded_model_dir(model).resolve()
        default = model_defaults(pipe)["num_inference_steps"]
        at_text_steps = (steps or default) == (text_steps or default)
        self.reason = (None if on_model and at_text_steps else
                       f"the text describes the embedded {model!r} model at {text_steps or 'its default'} steps; this run "
                       f"uses {'it' if on_model else (folder.name if folder else type(pipe).__name__)}"
                       f"{'' if at_text_steps else f' at {steps or default} steps'}")
        self.checked = self.skipped = 0

    @property
    def apply(self) -> bool:
        """True where the text's numbers are meant to hold (the embedded model at its defaults)."""
        return self.reason is None

    def expect(self, claim: str, holds, measured=None, anywhere: bool = False) -> None:
        """Check one claim; ``holds`` is a bool, or a function called only where the claim applies.

        ``anywhere=True``: a claim about shapes, counts or formulas, true whatever the weights
        and the steps, so it is checked on every model.
        """
        if not (self.apply or anywhere):
            self.skipped += 1
            print(f"– not checked here ({self.reason}): {claim}")
            return
        ok = bool(holds() if callable(holds) else holds)
        shown = "" if measured is None else f" · measured {_rounded(measured)}"
        if not ok:
            raise ClaimFailed(f"✗ the text says: {claim}; but{shown or ' it does not hold'}")
        self.checked += 1
        print(f"✓ {claim}{shown}")  # returns nothing: a notebook cell that ends with it shows no "None"


def _rounded(value):
    """Numbers at two decimals, inside dicts, lists and tuples too, for a one-line report."""
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rounded(v) for v in value)
    return value
