"""Rasterising: masks from arrays, PNGs and shapes drawn in code, and resizing them."""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .colors import RGB

def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``64`` or ``(64, 96)`` -> ``(height, width)``, checked."""
    hw = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, numbers.Integral) and v > 0 for v in hw):
        raise ValueError(f"size {size!r} must be a positive int or (height, width)")
    return int(hw[0]), int(hw[1])


def to_bool_mask(mask: Any, what: str) -> np.ndarray:
    """A 2-D numpy/torch array of bools (or of 0/1 values) -> read-only numpy bool array."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{what}: mask must be 2-D (height, width), got shape {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(
                f"{what}: mask must be boolean or 0/1, got dtype {array.dtype} with other values; "
                "threshold it first, e.g. mask > 0.5"
            )
        array = array.astype(bool)
    array = array.copy()
    array.setflags(write=False)  # regions are frozen; so is their mask
    return array


def resize_nearest(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(R, H, W) float -> (R, height, width), nearest, exactly as the official code resizes."""
    return F.interpolate(masks[None], size=(height, width), mode="nearest")[0]


def read_rgb(path: str | Path) -> np.ndarray:
    """A PNG as an (H, W, 3) uint8 RGB array. Alpha is dropped, as OpenCV's imread does."""
    # Image.open keeps Pillow's decompression-bomb check (never MAX_IMAGE_PIXELS = None).
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def resize_masks_if_needed(masks: np.ndarray, size, path) -> np.ndarray:
    """Resize (R, H, W) bool masks to ``size`` with a warning naming both sizes."""
    if size is None:
        return masks
    height, width = as_size(size)
    if masks.shape[1:] == (height, width):
        return masks
    warnings.warn(
        f"{path}: the PNG is {masks.shape[1]}x{masks.shape[2]} (height x width) but the layout "
        f"is requested at {height}x{width}; resizing the masks (nearest)",
        stacklevel=3,
    )
    resized = resize_nearest(torch.from_numpy(masks).float(), height, width)
    return resized.numpy() > 0.5


@dataclass(frozen=True)
class Shape:
    """A region drawn in code; make one with :func:`rect`, :func:`ellipse` or :func:`polygon`.

    Coordinates are x (to the right) then y (down). With ``units="relative"`` they are
    fractions of the width/height in [0, 1]; with ``units="pixels"`` they are pixels.
    Pixel (row i, column j) covers the square [j, j+1] x [i, i+1] and belongs to the
    shape when its centre (j + 0.5, i + 0.5) does, so ``rect(p, 16, 8, 48, 40,
    units="pixels")`` is exactly ``mask[8:40, 16:48]`` and the same rectangle in
    relative units gives the same mask.
    """

    kind: str
    phrase: str
    coords: tuple[float, ...]
    units: str = "relative"
    occurrence: int = 1
    color: str | RGB | None = None

    def __post_init__(self) -> None:
        if self.units not in ("relative", "pixels"):
            raise ValueError(f"units={self.units!r}; use 'relative' (fractions) or 'pixels'")
        if self.units == "relative" and not all(0.0 <= c <= 1.0 for c in self.coords):
            raise ValueError(
                f"{self.kind} {self.phrase!r}: relative coordinates must lie in [0, 1], got "
                f"{list(self.coords)}; pass units='pixels' for pixel coordinates"
            )

    def mask(self, height: int, width: int) -> np.ndarray:
        """Rasterize at ``height`` x ``width`` (pixel centres inside the shape)."""
        scale = (width, height) if self.units == "relative" else (1, 1)
        xy = np.asarray(self.coords, dtype=np.float64).reshape(-1, 2) * scale
        ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
        if self.kind == "rect":
            (x0, y0), (x1, y1) = np.sort(xy, axis=0)
            return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        if self.kind == "ellipse":
            (cx, cy), (rx, ry) = xy
            return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
        return _inside_polygon(xs, ys, xy)


def _inside_polygon(xs: np.ndarray, ys: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside when a ray to the right crosses an odd number of edges."""
    inside = np.zeros(xs.shape, dtype=bool)
    for (xa, ya), (xb, yb) in zip(points, np.roll(points, -1, axis=0)):
        if ya == yb:
            continue  # a horizontal edge is never crossed by a horizontal ray
        spans = (ys >= min(ya, yb)) & (ys < max(ya, yb))  # half-open: vertices count once
        x_cross = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= spans & (xs < x_cross)
    return inside


def rect(phrase: str, x0: float, y0: float, x1: float, y1: float, *, units: str = "relative",
         occurrence: int = 1, color: str | RGB | None = None) -> Shape:
    """Axis-aligned rectangle from corner (x0, y0) to corner (x1, y1) (x1, y1 excluded)."""
    return Shape("rect", phrase, (x0, y0, x1, y1), units, occurrence, color)


def ellipse(phrase: str, cx: float, cy: float, rx: float, ry: float, *, units: str = "relative",
            occurrence: int = 1, color: str | RGB | None = None) -> Shape:
    """Ellipse with centre (cx, cy) and radii rx (along x) and ry (along y)."""
    if rx <= 0 or ry <= 0:
        raise ValueError(f"ellipse {phrase!r}: radii must be > 0, got rx={rx}, ry={ry}")
    return Shape("ellipse", phrase, (cx, cy, rx, ry), units, occurrence, color)


def polygon(phrase: str, points: Sequence[tuple[float, float]], *, units: str = "relative",
            occurrence: int = 1, color: str | RGB | None = None) -> Shape:
    """Polygon through ``points`` [(x, y), ...] (closed automatically, even-odd fill)."""
    points = [tuple(p) for p in points]
    if len(points) < 3 or any(len(p) != 2 for p in points):
        raise ValueError(f"polygon {phrase!r}: needs 3 or more (x, y) points, got {points}")
    return Shape("polygon", phrase, tuple(c for p in points for c in p), units, occurrence, color)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
