"""How well an image followed a layout, in the shapes world (segmentation by color).

A color names exactly one object there, so each region's phrase ("red circle") says which
pixels should lie inside its mask; no segmentation model is needed.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..layouts import mask_iou
from .world import COLORS, blobs, segment_by_color


def color_of(phrase: str) -> str | None:
    """The shapes-world color a phrase names ("red circle" -> "red"), or None."""
    return next((word for word in phrase.lower().split() if word in COLORS), None)


def _rgb(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


def region_iou(image, layout) -> dict[str, float]:
    """Per region: IoU between its mask and the pixels of its color in ``image``.

    A region whose phrase names no known color gets NaN. The mask is resized to the
    image first.
    """
    picture = _rgb(image)
    height, width = picture.shape[:2]
    masks = layout.masks_at(height, width).numpy() > 0.5
    segments = segment_by_color(picture)
    scores = {}
    for label, mask in zip(layout.labels, masks):
        color = color_of(label)
        scores[label] = float("nan") if color is None else mask_iou(segments.get(color, np.zeros_like(mask)), mask)
    return scores


def iou_text(image, layout) -> str:
    """``"IoU red circle 0.62 · blue square 0.48"``: :func:`region_iou` for a title or a print."""
    return "IoU " + " · ".join(f"{label} {iou:.2f}" for label, iou in region_iou(image, layout).items())


def color_ious(image: Any, expected: Mapping[str, np.ndarray]) -> dict[str, float]:
    """IoU of each color's pixels in ``image`` with the mask where it should be.

    ``expected`` maps a color name ("red") to a bool (H, W) mask, e.g. a target region or
    the object's mask in the input. A color absent from the image scores 0.
    """
    found = segment_by_color(_rgb(image))
    return {color: mask_iou(found.get(color, np.zeros_like(mask, dtype=bool)), np.asarray(mask, bool))
            for color, mask in expected.items()}


def object_counts(image: Any, min_pixels: int = 20) -> dict[str, int]:
    """How many separate objects of each color ``image`` holds (blobs of at least ``min_pixels``
    pixels; smaller ones are edge fringes): a duplicated object shows as a 2."""
    found = segment_by_color(_rgb(image))
    counts = {color: sum(int(b.sum()) >= min_pixels for b in blobs(mask)) for color, mask in found.items()}
    return {color: n for color, n in counts.items() if n}


def color_masks(image: Any) -> dict[str, np.ndarray]:
    """Where each of the shapes world's colors is in ``image`` (a PIL image or an array): exact, as
    its objects are flat colors on a light background."""
    return segment_by_color(_rgb(image))
