"""Rebuild the example layouts in this folder: ``python mag_explore/data/layouts/make_examples.py``.

Each example is drawn once in relative coordinates and saved as a color-label PNG at
64x64 (the shapes-world model's size) and 512x512 (Stable Diffusion's), plus a JSON
``{"prompt", "regions"}`` that maps the PNG's colors to phrases. White is background.
``official_three_objects.json`` shows the same scene in the official MAG format.
"""
from __future__ import annotations

import json
from pathlib import Path

from mag_explore.layouts import Layout, ellipse, polygon, rect

HERE = Path(__file__).resolve().parent
RED, GREEN, BLUE, YELLOW, PURPLE = "#ff0000", "#00ff00", "#0000ff", "#ffff00", "#ff00ff"

EXAMPLES = {
    "left_right": (
        "a red circle and a blue square",
        [ellipse("red circle", 0.27, 0.5, 0.2, 0.2, color=RED),
         rect("blue square", 0.56, 0.3, 0.96, 0.7, color=BLUE)],
    ),
    "top_bottom": (
        "a yellow circle and a green square",
        [ellipse("yellow circle", 0.5, 0.27, 0.2, 0.2, color=YELLOW),
         rect("green square", 0.3, 0.56, 0.7, 0.96, color=GREEN)],
    ),
    # Both objects low, where the shapes model never puts them by itself (the demo's layout;
    # the README gives its mask IoU without control and with MAG).
    "bottom_half": (
        "a green square and a purple circle",
        [rect("green square", 0.1, 0.63, 0.4, 0.93, color=GREEN),
         ellipse("purple circle", 0.75, 0.78, 0.15, 0.15, color=PURPLE)],
    ),
    "three_objects": (
        "a red circle, a blue square and a green triangle",
        [ellipse("red circle", 0.22, 0.3, 0.17, 0.17, color=RED),
         rect("blue square", 0.6, 0.1, 0.92, 0.42, color=BLUE),
         polygon("green triangle", [(0.3, 0.92), (0.5, 0.55), (0.7, 0.92)], color=GREEN)],
    ),
}


def main() -> None:
    for name, (prompt, shapes) in EXAMPLES.items():
        for size, suffix in ((64, ""), (512, "_512")):
            regions = Layout.from_shapes(size, size, shapes).to_color_png(HERE / f"{name}{suffix}.png")
        entry = {"prompt": prompt, "regions": regions}
        (HERE / f"{name}.json").write_text(json.dumps(entry, indent=2) + "\n")
    # Official order of three_objects.png (BGR strings, reversed): white [255, 255, 255],
    # blue [255, 0, 0], green [0, 255, 0], red [0, 0, 255]; white gets no words.
    official = {
        "prompt": "a red circle, a blue square and a green triangle",
        "image": "three_objects.png",
        "word_ids": "[[], [6, 7], [10, 11], [2, 3]]",
    }
    (HERE / "official_three_objects.json").write_text(json.dumps(official, indent=2) + "\n")


if __name__ == "__main__":
    main()
