"""Prompt fidelity of a text-to-image pipeline on the shapes world, read by segmentation.

    python -m mag_explore.shapes.fidelity --model shapes -n 32 --cfg 3 5 7

For random 1–2-object prompts it generates one image each and reports how often every
requested color is present (a blob ≥ 2 % of the image), how often no unrequested color
is, and how often each present object has the right shape. It also writes a grid PNG.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .world import caption_for, make_scene, score_image


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of 1–2 objects (half each), drawn like the training captions."""
    rng = np.random.default_rng(seed)
    return [caption_for([(o.color, o.shape) for o in
                         make_scene(rng, n_objects=1 + i % 2, empty_caption_prob=0).objects])
            for i in range(n)]


def generate(pipe, prompts: list[str], guidance_scale: float, seed: int = 0,
             steps: int = 50) -> list[np.ndarray]:
    images = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                   height=64, width=64, generator=g, output_type="np")
        images.append((out.images[0] * 255).round().astype(np.uint8))
    return images


def summarize(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    scores = [score_image(im, p) for im, p in zip(images, prompts)]
    objects = [o for s in scores for o in s["objects"] if o["present"]]
    return {
        "all_colors_present": float(np.mean([s["all_present"] for s in scores])),
        "no_unrequested_color": float(np.mean([not s["unrequested"] for s in scores])),
        "shape_correct": float(np.mean([o["shape_ok"] for o in objects])) if objects else 0.0,
    }


def save_grid(images: list[np.ndarray], path: Path, columns: int = 8) -> None:
    from PIL import Image

    rows = [np.concatenate(images[i:i + columns], axis=1)
            for i in range(0, len(images) - columns + 1, columns)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (64 * columns * 3, 64 * len(rows) * 3), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    from diffusers import StableDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--cfg", type=float, nargs="+", default=[5.0])
    p.add_argument("--out", type=Path, default=Path("outputs/shapes_fidelity"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = random_prompts(args.n)
    args.out.mkdir(parents=True, exist_ok=True)
    for cfg in args.cfg:
        start = time.time()
        images = generate(pipe, prompts, cfg)
        seconds = (time.time() - start) / len(images)
        save_grid(images, args.out / f"cfg{cfg:g}.png")
        print(f"CFG {cfg:g}: {summarize(images, prompts)}, {seconds:.2f} s per image")


if __name__ == "__main__":
    main()
