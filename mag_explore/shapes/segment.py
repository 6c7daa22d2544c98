"""Reading a generated shapes-world image against its layout and prompt (exact, by color).

The embedded model draws flat known colors, so a phrase's pixels are those of its color
word, and prompt fidelity is read from the colors and shapes present. These are the
evaluation's default segmenter and fidelity scorer for the shapes model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .world import COLORS, score_image, segment_by_color


def color_segmenter(image: np.ndarray, phrases: Sequence[str]) -> list[np.ndarray]:
    """Shapes world: the pixels of each phrase's color word (all of them, not one blob)."""
    found = segment_by_color(image)
    masks = []
    for phrase in phrases:
        colors = [w for w in phrase.split() if w in COLORS]
        if len(colors) != 1:
            raise ValueError(f"phrase {phrase!r} must name exactly one of the colors {list(COLORS)}")
        masks.append(found.get(colors[0], np.zeros(image.shape[:2], dtype=bool)))
    return masks


def shapes_fidelity(image: np.ndarray, prompt: str) -> dict:
    """Shapes world: requested objects present, shapes right, no other color (read by color).

    ``fidelity`` is 1 when every requested object is there in its shape and no other color
    is; ``present`` and ``shapes_ok`` are the fractions of requested objects found / in the
    right shape, ``extra_colors`` counts unrequested colors.
    """
    score = score_image(image, prompt)
    objects = score["objects"]
    present = float(np.mean([o["present"] for o in objects]))
    shapes_ok = float(np.mean([o["shape_ok"] for o in objects]))
    extra = len(score["unrequested"])
    return {"fidelity": float(shapes_ok == 1.0 and extra == 0), "present": present,
            "shapes_ok": shapes_ok, "extra_colors": extra}
