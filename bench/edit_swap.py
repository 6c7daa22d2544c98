"""Swapping the sides of two objects with ``edit_image`` on the embedded shapes model, per scene.

    OMP_NUM_THREADS=1 nice python bench/edit_swap.py
    python bench/edit_swap.py --method none --start move          # the same without MAG
    python bench/edit_swap.py --source attention                  # where the objects are, read from attention

Each scene has two objects side by side; the target layout puts each object's box (its own
size) where the other one's centre is. Prints per scene and object the IoU of the object's
colour with its new box, the IoU with its old place (something left behind) and whether the
image holds any other colour. These figures are the floors of
``tests/test_inversion.py::test_shapes_edit_swaps_the_sides_of_two_objects``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mag_explore.editing import edit_image  # noqa: E402
from mag_explore.shapes.scoring import color_ious  # noqa: E402
from mag_explore.editing.inversion import invert  # noqa: E402
from mag_explore.layouts import Layout, rect  # noqa: E402
from mag_explore.models import load_pipeline  # noqa: E402
from mag_explore.shapes.world import caption_for, render, score_image  # noqa: E402

BACKGROUND = np.array([240.0, 240.0, 240.0])
# two objects (colour, shape, centre x, centre y, width) in pixels of the 64x64 image, left one first
SWAPS = [
    (("red", "circle", 16, 32, 20), ("blue", "square", 48, 32, 20)),
    (("yellow", "square", 16, 20, 18), ("purple", "circle", 47, 44, 20)),
    (("green", "triangle", 17, 44, 22), ("red", "square", 47, 20, 18)),
    (("blue", "circle", 15, 24, 20), ("yellow", "triangle", 48, 40, 22)),
]


def swap_target(a, b, prompt: str) -> Layout:
    """Each object's own-size box, centred where the other object is."""
    def box(obj, at):
        half = obj[4] / 2
        return rect(f"{obj[0]} {obj[1]}", at[2] - half, at[3] - half, at[2] + half, at[3] + half, units="pixels")
    return Layout.from_shapes(64, 64, [box(a, b), box(b, a)], prompt=prompt)


def swap_scene(pipe, a, b, steps: int = 25, given_source: bool = True, **options) -> dict:
    """Edit one scene; per object: IoU with its new box and with its old place; extra colours.

    ``given_source``: where the objects are comes from their true masks (as notebook 06 reads
    them from the colours, or ``--source-layout`` on the command line), else from the attention.
    """
    image, masks = render([a, b], BACKGROUND)
    prompt = caption_for([a[:2], b[:2]])
    target = swap_target(a, b, prompt)
    source = Layout.from_arrays(np.stack(masks), target.labels, prompt=prompt) if given_source else None
    inversion = invert(pipe, image, prompt, num_inference_steps=steps, progress=False)
    result = edit_image(pipe, image, prompt, target, source_layout=source, inversion=inversion, progress=False,
                        **options)
    new = color_ious(result.image, {a[0]: target[0].mask, b[0]: target[1].mask})
    old = color_ious(result.image, {a[0]: masks[0], b[0]: masks[1]})
    score = score_image(np.asarray(result.image), prompt)
    return {"prompt": prompt, "new": new, "old": old, "extra": score["unrequested"], "image": result.image,
            "shapes_ok": [o["shape_ok"] for o in score["objects"]]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mag")
    parser.add_argument("--start", default="move")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--step-rule", default=None, help="MAG's step rule: official or normalized (default: the model's)")
    parser.add_argument("--source", choices=["given", "attention"], default="given",
                        help="where the objects are: their true masks (default) or read from the attention")
    parser.add_argument("--save", default=None, help="write the edited images side by side to this PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline("shapes", device="cpu", dtype=torch.float32)
    images = []
    print("| scene | object | IoU new box | IoU old place | extra colours | shapes right |")
    print("|---|---|---:|---:|---|---|")
    for a, b in SWAPS:
        r = swap_scene(pipe, a, b, given_source=args.source == "given", method=args.method, start=args.start,
                       alpha=args.alpha, step_rule=args.step_rule)
        images.append(np.asarray(r["image"]))
        for obj in (a, b):
            print(f"| {r['prompt']} | {obj[0]} {obj[1]} | {r['new'][obj[0]]:.2f} | {r['old'][obj[0]]:.2f} "
                  f"| {', '.join(r['extra']) or '-'} | {r['shapes_ok']} |", flush=True)
    if args.save:
        from PIL import Image
        Image.fromarray(np.concatenate(images, 1)).resize((192 * len(images), 192), Image.NEAREST).save(args.save)


if __name__ == "__main__":
    main()
