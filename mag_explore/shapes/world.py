"""The shapes world: synthetic scenes with ground-truth masks, and tools to read them back.

A scene is a 64×64 RGB image on a plain light background with 1–3 non-overlapping
objects. Each object has one of five well-separated colors and one of three shapes,
and the caption names them in random order: "a red circle and a blue square".

Everything is drawn from a seeded ``numpy.random.Generator``, so a seed fixes a scene.
The reading tools (``segment_by_color``, ``blobs``, ``classify_shape``) need no model:
they are what the evaluation uses to check a *generated* image against its prompt.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


SIZE = 64
# Far apart in RGB, and all far from the light background, so that the nearest known
# color of a pixel says which object it belongs to even in a slightly blurry sample.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Every word a caption can use; the tokenizer makes each a single token.
WORDS: list[str] = ["a", "and", ","] + list(COLORS) + list(SHAPES)

_SUPERSAMPLE = 4  # draw at 4× resolution and average: smooth, anti-aliased edges


@dataclass
class SceneObject:
    color: str
    shape: str
    mask: np.ndarray  # bool (H, W): pixels at least half covered by the object


@dataclass
class Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    objects: list[SceneObject] = field(default_factory=list)


# ---------------------------------------------------------------------------- drawing
def _coverage(shape: str, cx: float, cy: float, w: float, size: int = SIZE) -> np.ndarray:
    """Fraction of each pixel covered by a shape of width ``w`` centred at (cx, cy)."""
    s = _SUPERSAMPLE
    half = w / 2
    # Only the pixels of the shape's bounding box need sub-pixel work.
    x0, x1 = max(int(cx - half) - 1, 0), min(int(cx + half) + 2, size)
    y0, y1 = max(int(cy - half) - 1, 0), min(int(cy + half) + 2, size)
    xs = x0 + (np.arange((x1 - x0) * s) + 0.5) / s  # sub-pixel centres, in pixel units
    ys = y0 + (np.arange((y1 - y0) * s) + 0.5) / s
    x, y = np.meshgrid(xs, ys)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        # Upright isosceles triangle filling a w × w box: apex at the top centre.
        top, bottom = cy - half, cy + half
        t = np.clip((y - top) / w, 0, 1)  # 0 at the apex, 1 at the base
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half * t)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cover = np.zeros((size, size))
    cover[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return cover


def _place(rng: np.random.Generator, n: int, size: int = SIZE) -> list[tuple[float, float, float]]:
    """Up to ``n`` (cx, cy, width) boxes inside the image that keep 2 px apart."""
    boxes: list[tuple[float, float, float]] = []
    for _ in range(200):  # rejection sampling; small images fill up quickly
        if len(boxes) == n:
            break
        w = rng.uniform(14, 30)
        cx, cy = rng.uniform(w / 2 + 1, size - w / 2 - 1, size=2)
        if all(max(abs(cx - bx), abs(cy - by)) >= (w + bw) / 2 + 2 for bx, by, bw in boxes):
            boxes.append((cx, cy, w))
    return boxes


def caption_for(objects: list[tuple[str, str]]) -> str:
    """'a red circle', 'a red circle and a blue square', 'a, b and c'."""
    parts = [f"a {color} {shape}" for color, shape in objects]
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def render(objects: list[tuple[str, str, float, float, float]], background: np.ndarray,
           size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paint (color, shape, cx, cy, width) objects over a flat background color."""
    image = np.broadcast_to(background.astype(np.float32), (size, size, 3)).copy()
    masks = []
    for color, shape, cx, cy, w in objects:
        cover = _coverage(shape, cx, cy, w, size)[..., None]
        image = image * (1 - cover) + np.array(COLORS[color], np.float32) * cover
        masks.append(cover[..., 0] >= 0.5)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), masks


OBJECT_COUNTS_P = (0.25, 0.45, 0.30)  # share of 1-, 2- and 3-object scenes


def make_scene(rng: np.random.Generator, n_objects: int | None = None,
               empty_caption_prob: float = 0.1,
               object_counts_p: tuple[float, float, float] = OBJECT_COUNTS_P) -> Scene:
    """One random scene: 1–3 objects of distinct colors, caption in random order.

    Colors are distinct within a scene so that "which blob is the red one" always has
    one answer; shapes may repeat. Two- and three-object scenes are common on purpose:
    they teach the model to draw every object it is asked for.
    """
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=list(object_counts_p)))
    boxes = _place(rng, n_objects)
    colors = rng.choice(list(COLORS), size=len(boxes), replace=False)
    shapes = rng.choice(SHAPES, size=len(boxes))
    background = rng.uniform(228, 250, size=3)  # near-white with a slight random tint
    spec = [(str(c), str(s), *box) for c, s, box in zip(colors, shapes, boxes)]
    image, masks = render(spec, background)
    objects = [SceneObject(c, s, m) for (c, s, *_), m in zip(spec, masks)]
    order = rng.permutation(len(objects))  # caption order independent of drawing order
    caption = caption_for([(objects[i].color, objects[i].shape) for i in order])
    if rng.random() < empty_caption_prob:
        caption = ""  # unconditional sample, for classifier-free guidance
    return Scene(image, caption, objects)


# ---------------------------------------------------------------------------- reading
def segment_by_color(image: np.ndarray, min_fraction: float = 0.0,
                     max_distance: float = 110.0) -> dict[str, np.ndarray]:
    """Per known color, the pixels whose nearest color (or background) is that one.

    The light background is a sixth "color" (the brightest plausible tint), so
    pale pixels stay unassigned; ``max_distance`` also leaves out pixels that match
    nothing well (blends at edges, artefacts). Colors covering less than
    ``min_fraction`` of the image are dropped.
    """
    pixels = image.astype(np.float32)
    refs = np.array(list(COLORS.values()) + [(240, 240, 240)], np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :] - refs[None, None], axis=-1)  # H, W, 6
    nearest = dist.argmin(-1)
    close = dist.min(-1) <= max_distance
    out = {}
    for i, name in enumerate(COLORS):
        mask = (nearest == i) & close
        if mask.mean() > min_fraction:
            out[name] = mask
    return out


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (4-neighbourhood) of a bool mask, largest first."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        blob = np.zeros_like(seen)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:  # breadth-first flood fill
            y, x = queue.popleft()
            blob[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(blob)
    return sorted(found, key=lambda b: -int(b.sum()))


def classify_shape(mask: np.ndarray) -> str:
    """Circle, square or triangle, from how much of its bounding box a blob fills.

    A square fills its box (≈1.0), a circle π/4 ≈ 0.785, a triangle ≈ 0.5. The
    thresholds sit between those values, so a slightly blurred edge (which rounds a
    square's corners or fattens a triangle) still lands on the right side.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("empty mask")
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(ys) / box
    if fill >= 0.89:
        return "square"
    if fill >= 0.64:
        return "circle"
    return "triangle"


# ---------------------------------------------------------------------------- prompts
def parse_caption(caption: str) -> list[tuple[str, str]]:
    """(color, shape) pairs named in a caption, in order: the inverse of ``caption_for``."""
    words = caption.replace(",", " ").split()
    return [(c, s) for c, s in zip(words, words[1:]) if c in COLORS and s in SHAPES]


def score_image(image: np.ndarray, caption: str, min_fraction: float = 0.02) -> dict:
    """How faithfully an image shows its caption, read with ``segment_by_color``.

    A color counts as present when its largest blob covers at least ``min_fraction``
    of the image; its shape is that blob's shape.
    Returns the requested colors found, any unrequested ones, and per requested object
    whether it is present and whether its shape is right.
    """
    wanted = parse_caption(caption)
    area = image.shape[0] * image.shape[1]
    largest = {}
    for color, mask in segment_by_color(image).items():
        found = blobs(mask)
        if found and found[0].sum() >= min_fraction * area:
            largest[color] = found[0]
    wanted_colors = {c for c, _ in wanted}
    objects = [{"color": c, "shape": s, "present": c in largest,
                "shape_ok": c in largest and classify_shape(largest[c]) == s} for c, s in wanted]
    return {
        "all_present": all(o["present"] for o in objects),
        "unrequested": sorted(set(largest) - wanted_colors),
        "objects": objects,
    }
