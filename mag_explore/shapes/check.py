"""Does the embedded shapes model do its job? Measures it against the targets of its issue.

    python -m mag_explore.shapes.check                  # 64 images, the full figures
    python -m mag_explore.shapes.check --images 16      # a quicker look

With the model's default settings (size, steps, CFG scale, MAG α):

* prompt fidelity over 1–2-object prompts: each requested color present as a blob of
  ≥ 2 % of the image (target: in ≥ 90 % of images), no unrequested color blob (≥ 90 %),
  shape right for ≥ 75 % of the requested objects that are present (an absent object is
  already counted by the first figure);
* attention localization: the color word's cross-attention, averaged over all steps,
  layers and heads, upsampled to the image and thresholded at half its peak, against the
  object's blob: mean IoU ≥ 0.4;
* spatial control: on the suite's two-object layouts tagged "contradicts" (objects where
  the model has no reason to put them), MAG raises the mean mask IoU by ≥ 0.3 over no control;
* speed: one 50-step classifier-free-guidance image on this CPU in ≤ 2 s (median of 3).

Prints each figure with PASS/FAIL; the exit status is 0 when every target is met.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..data import data_path
from ..layouts import mask_iou
from .segment import color_segmenter
from .world import COLORS, SHAPES, blobs, caption_for, score_image, segment_by_color

SUITE = data_path("suites", "shapes.json")
# name: (goal, "min" or "max", what it is)
TARGETS = {
    "colors_present": (0.90, "min", "images with every requested color (blob ≥ 2 %)"),
    "no_extra_color": (0.90, "min", "images with no unrequested color blob"),
    "shape_correct": (0.75, "min", "present requested objects with the right shape"),
    "attention_iou": (0.40, "min", "IoU of color-word attention (> ½ peak) and its blob"),
    "mag_iou_gain": (0.30, "min", "MAG mean mask IoU − none, 'contradicts' 2-object layouts"),
    "seconds_50_steps": (2.00, "max", "seconds for one 50-step CFG image (median of 3)"),
}


def check_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of 1 or 2 objects (half each), distinct colors, from a seeded generator."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        colors = rng.choice(list(COLORS), size=1 + i % 2, replace=False)
        prompts.append(caption_for([(str(c), str(rng.choice(SHAPES))) for c in colors]))
    return prompts


def attention_iou(result, color: str, image: np.ndarray, threshold: float = 0.5) -> float | None:
    """IoU of the color word's thresholded attention and the largest blob of that color (None: no blob)."""
    found = blobs(segment_by_color(image).get(color, np.zeros(image.shape[:2], bool)))
    if not found:
        return None
    maps = result.store.aggregate(tokens=result.token_indices(color), size=image.shape[:2])
    heat = maps.sum(0)
    heat = heat / heat.max().clamp_min(1e-12)
    return mask_iou(heat.numpy() >= threshold, found[0])


def fidelity_and_localization(pipe, prompts: list[str], seed: int = 0, num_inference_steps: int | None = None,
                              progress: bool = True) -> dict:
    """Prompt fidelity and attention localization over ``prompts`` (one image each, no control).

    ``num_inference_steps`` None: the model's default number of steps.
    """
    from tqdm.auto import tqdm

    from ..attention import AttentionStore
    from ..sampling import generate

    present, clean, shapes_ok, ious = [], [], [], []
    for i, prompt in enumerate(tqdm(prompts, desc="fidelity", disable=not progress)):
        result = generate(pipe, prompt, seed=seed + i, num_inference_steps=num_inference_steps, store=AttentionStore(),
                          progress=False)
        image = np.asarray(result.images[0])
        score = score_image(image, prompt)
        present.append(score["all_present"])
        clean.append(not score["unrequested"])
        shapes_ok += [o["shape_ok"] for o in score["objects"] if o["present"]]
        ious += [iou for o in score["objects"] if (iou := attention_iou(result, o["color"], image)) is not None]
    return {"colors_present": float(np.mean(present)), "no_extra_color": float(np.mean(clean)),
            "shape_correct": float(np.mean(shapes_ok)) if shapes_ok else 0.0,
            "attention_iou": float(np.mean(ious)) if ious else 0.0, "images": len(prompts)}


def spatial_control(pipe, seeds: int = 2, suite_path: Path = SUITE, num_inference_steps: int | None = None,
                    max_layouts: int | None = None, progress: bool = True) -> dict:
    """Mean mask IoU without control and with MAG (model defaults) on the 'contradicts' 2-object layouts."""
    from tqdm.auto import tqdm

    from ..methods import make_controls
    from ..models.load import model_defaults
    from ..sampling import generate
    from ..layouts.suite import load_suite

    d = model_defaults(pipe)
    suite = [s for s in load_suite(suite_path, d["height"], d["width"]) if len(s.layout) == 2 and "contradicts" in s.tags]
    if not suite:
        raise ValueError(f"{suite_path} has no two-region layout tagged 'contradicts'")
    suite = suite[:max_layouts]
    ious = {"none": [], "mag": []}
    runs = [(entry, method, seed) for entry in suite for method in ious for seed in range(seeds)]
    for entry, method, seed in tqdm(runs, desc="spatial control", disable=not progress):
        image = np.asarray(generate(pipe, entry.layout.prompt, num_inference_steps=num_inference_steps, seed=seed,
                                    controls=make_controls(method, entry.layout), progress=False).images[0])
        masks = color_segmenter(image, entry.layout.labels)
        ious[method].append(np.mean([mask_iou(m, r.mask) for m, r in zip(masks, entry.layout.regions)]))
    mean = {m: float(np.mean(values)) for m, values in ious.items()}
    return {"none_iou": mean["none"], "mag_iou": mean["mag"], "mag_iou_gain": mean["mag"] - mean["none"],
            "layouts": len(suite), "seeds": seeds}


def seconds_per_image(pipe, num_inference_steps: int = 50, repeats: int = 3) -> float:
    """Median wall time of one CFG image with ``num_inference_steps`` DDIM steps (after one warm-up run)."""
    from ..sampling import generate

    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        generate(pipe, "a red circle and a blue square", num_inference_steps=num_inference_steps, seed=i, progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def verdicts(figures: dict) -> list[tuple[str, float, str, bool]]:
    """(name, measured, goal as text, passed) for every target that was measured."""
    out = []
    for name, (goal, kind, _) in TARGETS.items():
        if name in figures:
            value = figures[name]
            passed = value >= goal if kind == "min" else value <= goal
            out.append((name, value, f"{'≥' if kind == 'min' else '≤'} {goal:g}", passed))
    return out


def report(figures: dict) -> str:
    lines = [f"{'target':<18} {'measured':>9} {'goal':>7}  result  what"]
    for name, value, goal, passed in verdicts(figures):
        lines.append(f"{name:<18} {value:>9.3f} {goal:>7}  {'PASS' if passed else 'FAIL':<6}  {TARGETS[name][2]}")
    extra = {k: v for k, v in figures.items() if k not in TARGETS}
    lines.append("details: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in extra.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mag_explore.shapes.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="default: the embedded 'shapes' model")
    parser.add_argument("--images", type=int, default=64, help="images for fidelity and localization (default 64)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per layout for spatial control (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the fidelity prompts and images")
    parser.add_argument("--device", default="cpu", help="default cpu (the speed target is for this CPU)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.seeds < 1:
        parser.error(f"--images {args.images} and --seeds {args.seeds} must be at least 1")
    from ..models.load import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    figures = fidelity_and_localization(pipe, check_prompts(args.images, args.seed), seed=args.seed)
    figures.update(spatial_control(pipe, seeds=args.seeds))
    figures["seconds_50_steps"] = seconds_per_image(pipe)
    figures["torch_threads"] = torch.get_num_threads()
    print(report(figures))
    return 0 if all(passed for *_, passed in verdicts(figures)) else 1


if __name__ == "__main__":
    sys.exit(main())
