"""Layouts: regions of the image tied to words of the prompt.

A :class:`Layout` is a list of :class:`Region` s. Each region is a boolean mask at
*image* resolution plus the words it controls: either a ``phrase`` of the prompt
(turned into token indices by :meth:`Layout.resolve`) or token indices given
directly (the official MAG format). Guidance and swapping ask the layout for its
masks at each attention resolution with :meth:`Layout.masks_at`.

Ways to build one::

    Layout.from_color_png("scene.png", {"#ff0000": "red circle", "#0000ff": "blue square"})
    Layout.from_official("mask1.png", "[[1,2,3,4],[6,7]]")   # the official script's input
    Layout.from_shapes(64, 64, [ellipse("red circle", 0.3, 0.5, 0.2, 0.2),
                                rect("blue square", 0.55, 0.3, 0.95, 0.7)])
    Layout.from_arrays(masks, ["red circle", "blue square"])
    Layout.from_json("data/layouts/left_right.json")          # PNG + {"prompt", "regions"}

Rules worth knowing (each is checked and raises a ``ValueError`` naming the value):

* Overlapping regions are allowed; an empty region is an error.
* Token index 0 is the BOS token and is refused: word tokens start at 1.
* A PNG whose size differs from the requested size is resized (nearest, so no new
  colors appear) with a warning naming both sizes: drawing a 512² mask for a 64²
  model is common and harmless.
* Pillow's decompression-bomb guard stays on.
"""
from __future__ import annotations

import ast
import json
import numbers
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mag_explore import tokens as _tokens

RGB = tuple[int, int, int]

#: Unmapped colors that :meth:`Layout.from_color_png` treats as background.
BACKGROUND_COLORS: tuple[RGB, ...] = ((255, 255, 255), (0, 0, 0))

#: More distinct colors than this in an official-format PNG means it is not a label
#: image (anti-aliased edges, JPEG noise) and the region order would be meaningless.
MAX_OFFICIAL_COLORS = 32

# Colors for regions that have none (matplotlib's tab10, as 0-255 RGB).
_PALETTE: tuple[RGB, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
_MASK_MODES = ("nearest", "area")


# ----------------------------------------------------------------------------- colors
def to_hex(rgb: Sequence[int]) -> str:
    """``(255, 0, 0)`` -> ``"#ff0000"``."""
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def parse_color(color: str | Sequence[int]) -> RGB:
    """``"#ff0000"``, ``"#f00"``, ``"ff0000"`` or ``(255, 0, 0)`` -> ``(255, 0, 0)``."""
    if isinstance(color, str):
        text = color.strip().lstrip("#").lower()
        if len(text) == 3:
            text = "".join(c * 2 for c in text)
        try:
            if len(text) != 6:
                raise ValueError
            return tuple(int(text[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
        except ValueError:
            raise ValueError(f"color {color!r} is not a hex color like '#ff0000' or '#f00'") from None
    values = tuple(color)
    if len(values) != 3 or not all(isinstance(c, numbers.Integral) and 0 <= c <= 255 for c in values):
        raise ValueError(f"color {color!r} must be a hex string or three ints in 0..255")
    return tuple(int(c) for c in values)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- helpers
def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``64`` or ``(64, 96)`` -> ``(height, width)``, checked."""
    hw = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, numbers.Integral) and v > 0 for v in hw):
        raise ValueError(f"size {size!r} must be a positive int or (height, width)")
    return int(hw[0]), int(hw[1])


def _to_bool_mask(mask: Any, what: str) -> np.ndarray:
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


def _check_token_indices(indices: Iterable[Any], what: str) -> tuple[int, ...]:
    """Token indices must be distinct ints >= 1 (index 0 is the BOS token)."""
    indices = tuple(indices)
    if not indices:
        raise ValueError(f"{what}: needs at least one token index")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ValueError(f"{what}: token index {i!r} is not an int; indices are ints >= 1")
        if i < 1:
            raise ValueError(
                f"{what}: token index {i} is not allowed; 0 is the BOS token <|startoftext|> and "
                "the prompt's words start at 1 (as in the official MAG code)"
            )
    if len(set(indices)) != len(indices):
        raise ValueError(f"{what}: token indices {list(indices)} repeat a value; list each once")
    return tuple(int(i) for i in indices)


def _nearest(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(R, H, W) float -> (R, height, width), nearest, exactly as the official code resizes."""
    return F.interpolate(masks[None], size=(height, width), mode="nearest")[0]


def _read_rgb(path: str | Path) -> np.ndarray:
    """A PNG as an (H, W, 3) uint8 RGB array. Alpha is dropped, as OpenCV's imread does."""
    # Image.open keeps Pillow's decompression-bomb check (never MAX_IMAGE_PIXELS = None).
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _resize_masks_if_needed(masks: np.ndarray, size, path) -> np.ndarray:
    """Resize (R, H, W) bool masks to ``size`` with a warning naming both sizes."""
    if size is None:
        return masks
    height, width = _as_size(size)
    if masks.shape[1:] == (height, width):
        return masks
    warnings.warn(
        f"{path}: the PNG is {masks.shape[1]}x{masks.shape[2]} (height x width) but the layout "
        f"is requested at {height}x{width}; resizing the masks (nearest)",
        stacklevel=3,
    )
    resized = _nearest(torch.from_numpy(masks).float(), height, width)
    return resized.numpy() > 0.5


# ----------------------------------------------------------------------------- Region
@dataclass(frozen=True, eq=False)
class Region:
    """One region: where (``mask``) and which words (``phrase`` or ``token_indices``).

    ``token_indices`` count from 1 (0 is BOS). A phrase region gets them from
    :meth:`Layout.resolve`; an official-format region has them from the start.
    ``tokens`` (filled by ``resolve``) are the token strings, handy to see how a word
    was split. ``color`` is for previews; ``name`` labels plots and error messages.
    """

    mask: np.ndarray
    phrase: str | None = None
    occurrence: int = 1
    token_indices: tuple[int, ...] | None = None
    color: RGB | None = None
    name: str | None = None
    tokens: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        label = self.name or (repr(self.phrase) if self.phrase else "region")
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "mask", _to_bool_mask(self.mask, label))
        if self.phrase is None and self.token_indices is None:
            raise ValueError(f"{label}: give a phrase of the prompt or token_indices")
        if self.phrase is not None and not (isinstance(self.phrase, str) and self.phrase.strip()):
            raise ValueError(f"{label}: phrase must be a non-empty string, got {self.phrase!r}")
        if not isinstance(self.occurrence, numbers.Integral) or self.occurrence < 1:
            raise ValueError(f"{label}: occurrence must be an int >= 1, got {self.occurrence!r}")
        if self.token_indices is not None:
            set_(self, "token_indices", _check_token_indices(self.token_indices, label))
        if self.color is not None:
            set_(self, "color", parse_color(self.color))
        if self.name is None:
            set_(self, "name", self.phrase if self.phrase else f"tokens {list(self.token_indices)}")
        if not self.mask.any():
            raise ValueError(f"region {self.name!r} is empty: its mask has no True pixel")

    @property
    def area(self) -> float:
        """Share of the image covered by the region, in [0, 1]."""
        return float(self.mask.mean())

    def __repr__(self) -> str:
        h, w = self.mask.shape
        return (
            f"Region({self.name!r}, phrase={self.phrase!r}, token_indices={self.token_indices}, "
            f"mask={h}x{w}, area={self.area:.1%})"
        )


# ----------------------------------------------------------------------------- shapes
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


# ----------------------------------------------------------------------------- official format
def parse_word_ids(word_ids: str | Sequence[Sequence[int]]) -> list[list[int]]:
    """``"[[1,2,3,4],[6,7]]"`` (or the list itself) -> ``[[1, 2, 3, 4], [6, 7]]``.

    The official script runs ``eval`` on this string, which executes any code in it.
    Here it is read as JSON, or else as a Python literal (``ast.literal_eval`` accepts
    only literals such as ``[[1, 2], (3,)]``), so code is rejected, never run. An empty
    list ``[]`` is allowed: that color gets no words (it is not guided).
    """
    if isinstance(word_ids, str):
        try:
            parsed = json.loads(word_ids)
        except json.JSONDecodeError:
            try:
                parsed = ast.literal_eval(word_ids.strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise ValueError(
                    f"word ids {word_ids!r} are not a list of lists of ints like "
                    "'[[1,2,3,4],[6,7]]' (code is never evaluated)"
                ) from None
    else:
        parsed = word_ids
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in parsed):
        raise ValueError(
            f"word ids {word_ids!r} must be a list with one list of token indices per region, "
            "like [[1,2,3,4],[6,7]]"
        )
    for number, group in enumerate(parsed, start=1):
        if group:
            _check_token_indices(group, f"word ids list {number} {list(group)}")
    return [[int(i) for i in group] for group in parsed]


def official_color_order(rgb: np.ndarray) -> list[RGB]:
    """The distinct colors of an (H, W, 3) RGB image in the official MAG region order.

    The official script reads the PNG with OpenCV (BGR channel order), writes each
    pixel as ``str(list)`` such as ``"[0, 0, 255]"`` (pure red) and sorts the distinct
    strings in *reverse string order* (not numeric: ``"[30, 0, 0]"`` comes before
    ``"[255, 0, 0]"``). Black ``"[0, 0, 0]"`` always comes last. Returns RGB triples.
    """
    colors = np.unique(rgb.reshape(-1, 3), axis=0)
    as_bgr_strings = {str([int(b), int(g), int(r)]): (int(r), int(g), int(b)) for r, g, b in colors}
    return [as_bgr_strings[key] for key in sorted(as_bgr_strings, reverse=True)]


def _describe_official(colors: Sequence[RGB], rgb: np.ndarray) -> str:
    """``1: [0, 0, 255] (#ff0000, 120 px)`` lines, in official order, for error messages."""
    flat = rgb.reshape(-1, 3)
    lines = []
    for number, color in enumerate(colors, start=1):
        count = int((flat == color).all(axis=1).sum())
        lines.append(f"  {number}: BGR {list(color[::-1])} ({to_hex(color)}, {count} px)")
    return "\n".join(lines)


def _colors_present(rgb: np.ndarray, limit: int = 12) -> str:
    """``#ffffff (3000 px), #ff0000 (500 px), ...`` most common first, for error messages."""
    colors, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    order = np.argsort(-counts)
    shown = [f"{to_hex(colors[i])} ({counts[i]} px)" for i in order[:limit]]
    more = f", and {len(order) - limit} more" if len(order) > limit else ""
    return ", ".join(shown) + more


def _close_to(rgb: np.ndarray, color: RGB, tolerance: int) -> np.ndarray:
    """Pixels whose every channel is within ``tolerance`` of ``color``."""
    return (np.abs(rgb.astype(np.int16) - np.array(color, np.int16)) <= tolerance).all(axis=-1)


def _phrase_spec(value: Any, color: str) -> tuple[str, int]:
    """A mapping value: ``"red circle"`` or ``{"phrase": "red", "occurrence": 2}``."""
    if isinstance(value, str):
        return value, 1
    if isinstance(value, Mapping) and "phrase" in value:
        return value["phrase"], value.get("occurrence", 1)
    raise ValueError(
        f"color {color}: expected a phrase string or {{'phrase': ..., 'occurrence': n}}, got {value!r}"
    )


# ----------------------------------------------------------------------------- Layout
@dataclass(frozen=True, eq=False, repr=False)
class Layout:
    """Regions of one image size tied to words of a prompt.

    ``regions`` is stored as a tuple (a layout never changes; methods return new
    layouts), all masks share one size ``height`` x ``width`` (the image resolution),
    and regions may overlap. ``prompt`` is the prompt the layout is meant for; it is
    used by :meth:`resolve` when no prompt is passed.
    """

    regions: tuple[Region, ...]
    prompt: str | None = None
    # Resized masks per (h, w, mode, device, dtype). Guidance asks for them at every
    # layer of every step; the cache lives on this instance, never shared.
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        regions = tuple(self.regions)
        if not regions:
            raise ValueError("a layout needs at least one region")
        for r in regions:
            if not isinstance(r, Region):
                raise ValueError(f"layout regions must be Region objects, got {type(r).__name__}")
        sizes = {r.mask.shape for r in regions}
        if len(sizes) > 1:
            listing = ", ".join(f"{r.name!r}: {r.mask.shape}" for r in regions)
            raise ValueError(f"all region masks must have the same size, got {listing}")
        object.__setattr__(self, "regions", regions)

    # --- basic views -----------------------------------------------------------------
    @property
    def height(self) -> int:
        return self.regions[0].mask.shape[0]

    @property
    def width(self) -> int:
        return self.regions[0].mask.shape[1]

    @property
    def masks(self) -> np.ndarray:
        """All masks as one (R, height, width) bool array."""
        return np.stack([r.mask for r in self.regions])

    @property
    def is_resolved(self) -> bool:
        """True when every region has token indices."""
        return all(r.token_indices is not None for r in self.regions)

    @property
    def token_groups(self) -> list[list[int]]:
        """Token indices per region, e.g. ``[[2, 3], [6, 7]]`` (what guidance needs)."""
        missing = [r.name for r in self.regions if r.token_indices is None]
        if missing:
            raise ValueError(
                f"regions {missing} have no token indices yet; call layout.resolve(tokenizer, prompt)"
            )
        return [list(r.token_indices) for r in self.regions]

    @property
    def colors(self) -> list[RGB]:
        """Each region's color, from the palette where a region has none."""
        return [r.color or _PALETTE[i % len(_PALETTE)] for i, r in enumerate(self.regions)]

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self):
        return iter(self.regions)

    def __getitem__(self, index: int) -> Region:
        return self.regions[index]

    # --- constructors ----------------------------------------------------------------
    @classmethod
    def from_color_png(cls, path: str | Path, regions: Mapping[str, Any], size=None,
                       tolerance: int = 0, unmapped: str = "error",
                       prompt: str | None = None) -> "Layout":
        """A color-label PNG plus ``{"#ff0000": "red circle", ...}``, in the mapping's order.

        A pixel belongs to a color when each channel is within ``tolerance`` of it.
        Unmapped white (#ffffff) and black (#000000) are the background and ignored.
        Any other unmapped color is an error listing it (a forgotten region is a silent
        bug), unless ``unmapped="ignore"``; raise ``tolerance`` for anti-aliased edges.
        A value may be ``{"phrase": "red", "occurrence": 2}`` for a repeated word.
        ``size`` (int or (height, width)) resizes the masks, with a warning, if the
        PNG differs. A mapped color absent from the PNG is an error.
        """
        if unmapped not in ("error", "ignore"):
            raise ValueError(f"unmapped={unmapped!r}; use 'error' or 'ignore'")
        if not regions:
            raise ValueError("regions is empty: map at least one color to a phrase")
        rgb = _read_rgb(path)
        masks, specs = [], []
        for key, value in regions.items():
            color = parse_color(key)
            mask = _close_to(rgb, color, tolerance)
            if not mask.any():
                raise ValueError(
                    f"{path}: color {to_hex(color)} (from {key!r}) is not in the PNG "
                    f"(tolerance {tolerance}); colors present: {_colors_present(rgb)}"
                )
            masks.append(mask)
            specs.append((color, *_phrase_spec(value, key)))
        covered = np.any(masks, axis=0)
        for background in BACKGROUND_COLORS:
            covered |= _close_to(rgb, background, tolerance)
        if unmapped == "error" and not covered.all():
            raise ValueError(
                f"{path}: colors {_colors_present(rgb[~covered])} are neither mapped nor "
                "background (white/black); map them to phrases, raise tolerance for "
                "anti-aliased edges, or pass unmapped='ignore'"
            )
        stacked = _resize_masks_if_needed(np.stack(masks), size, path)
        made = [Region(m, phrase, occurrence, color=color, name=phrase)
                for m, (color, phrase, occurrence) in zip(stacked, specs)]
        return cls(made, prompt=prompt)

    @classmethod
    def from_official(cls, path: str | Path, word_ids: str | Sequence[Sequence[int]],
                      size=None, prompt: str | None = None) -> "Layout":
        """The official MAG input: a color PNG and ``word_ids_for_mask`` like "[[1,2,3,4],[6,7]]".

        Every distinct color of the PNG is a region, the background included, in the
        official order (:func:`official_color_order`); the i-th list of word ids belongs
        to the i-th color. As in the official code, colors after the last list get no
        words and are not guided (a warning names them): black, which always sorts
        last, can be left out this way; any other color without words needs an empty
        list ``[]``. More lists than colors is an error listing the colors in order.
        Token index 0 (BOS) is refused. Colors are found at the PNG's own resolution
        (the official script first shrinks the PNG to the latent size).
        """
        groups = parse_word_ids(word_ids)
        rgb = _read_rgb(path)
        colors = official_color_order(rgb)
        if len(colors) > MAX_OFFICIAL_COLORS:
            raise ValueError(
                f"{path} has {len(colors)} colors, more than {MAX_OFFICIAL_COLORS}: it is not a "
                "label image (anti-aliased edges or JPEG?). Save it without anti-aliasing"
            )
        listing = _describe_official(colors, rgb)
        if len(groups) > len(colors):
            raise ValueError(
                f"{len(groups)} lists of word ids but {path} has only {len(colors)} colors; "
                f"the regions in official order are:\n{listing}"
            )
        if len(groups) < len(colors):
            warnings.warn(
                f"{path}: {len(colors)} colors but {len(groups)} lists of word ids, so colors "
                f"{len(groups) + 1}..{len(colors)} are not guided (as in the official code). "
                f"Regions in official order:\n{listing}",
                stacklevel=2,
            )
        pairs = [(c, g) for c, g in zip(colors, groups) if g]
        if not pairs:
            raise ValueError(f"no color of {path} has word ids; regions in order:\n{listing}")
        masks = _resize_masks_if_needed(np.stack([(rgb == c).all(-1) for c, _ in pairs]), size, path)
        made = [Region(m, token_indices=g, color=c, name=f"{to_hex(c)} {g}")
                for m, (c, g) in zip(masks, pairs)]
        return cls(made, prompt=prompt)

    @classmethod
    def from_shapes(cls, height: int, width: int, shapes: Sequence[Shape],
                    prompt: str | None = None) -> "Layout":
        """Regions drawn in code with :func:`rect`, :func:`ellipse`, :func:`polygon`."""
        height, width = _as_size((height, width))
        made = []
        for shape in shapes:
            mask = shape.mask(height, width)
            if not mask.any():
                raise ValueError(
                    f"{shape.kind} {shape.phrase!r} {list(shape.coords)} ({shape.units}) covers "
                    f"no pixel centre at {height}x{width}; make it larger or check its coordinates"
                )
            made.append(Region(mask, shape.phrase, shape.occurrence, color=shape.color))
        return cls(made, prompt=prompt)

    @classmethod
    def from_arrays(cls, masks: Any, phrases: Sequence[str], occurrences: Sequence[int] | None = None,
                    colors: Sequence[Any] | None = None, prompt: str | None = None) -> "Layout":
        """Boolean masks (a list of (H, W) arrays or one (R, H, W) array; numpy or torch)."""
        if isinstance(masks, torch.Tensor):
            masks = masks.detach().cpu().numpy()
        masks = list(masks)
        occurrences = list(occurrences) if occurrences is not None else [1] * len(masks)
        colors = list(colors) if colors is not None else [None] * len(masks)
        if not len(masks) == len(phrases) == len(occurrences) == len(colors):
            raise ValueError(
                f"got {len(masks)} masks, {len(phrases)} phrases, {len(occurrences)} occurrences "
                f"and {len(colors)} colors; give one of each per region"
            )
        made = [Region(_to_bool_mask(m, f"mask {i + 1} ({p!r})"), p, o, color=c)
                for i, (m, p, o, c) in enumerate(zip(masks, phrases, occurrences, colors))]
        return cls(made, prompt=prompt)

    @classmethod
    def from_json(cls, path: str | Path, image: str | Path | None = None, size=None,
                  **png_options: Any) -> "Layout":
        """A JSON file ``{"prompt": ..., "regions": {"#ff0000": "red circle", ...}}``.

        The PNG is ``image`` if given, else the JSON's ``"image"`` entry (relative to the
        JSON file), else the PNG next to it with the same name. ``"word_ids"`` instead of
        ``"regions"`` selects the official format.
        """
        path = Path(path)
        data = json.loads(path.read_text())
        png = Path(image) if image is not None else path.parent / data.get("image", path.stem + ".png")
        if "word_ids" in data:
            return cls.from_official(png, data["word_ids"], size=size, prompt=data.get("prompt"))
        if "regions" not in data:
            raise ValueError(f"{path}: expected a 'regions' (or 'word_ids') entry, got keys {list(data)}")
        return cls.from_color_png(png, data["regions"], size=size, prompt=data.get("prompt"),
                                  **png_options)

    # --- words -> token indices --------------------------------------------------------
    def resolve(self, tokenizer, prompt: str | None = None) -> "Layout":
        """A new layout whose regions all have token indices for ``prompt``.

        Phrase regions are looked up with :func:`mag_explore.tokens.token_indices`
        (sub-word pieces included); regions given as indices are checked to lie within
        the prompt (at most the EOS position). ``prompt`` defaults to ``self.prompt``.
        """
        prompt = self.prompt if prompt is None else prompt
        if prompt is None:
            raise ValueError("no prompt: pass resolve(tokenizer, prompt) or build the layout with prompt=")
        all_tokens = _tokens.prompt_tokens(tokenizer, prompt)
        eos = len(all_tokens) - 1
        resolved = []
        for region in self.regions:
            if region.phrase is not None:
                try:
                    indices = _tokens.token_indices(tokenizer, prompt, region.phrase, region.occurrence)
                except ValueError as error:
                    raise ValueError(f"region {region.name!r}: {error}") from None
            else:
                indices = list(region.token_indices)
                beyond = [i for i in indices if i > eos]
                if beyond:
                    raise ValueError(
                        f"region {region.name!r}: token indices {beyond} are beyond the end of the "
                        f"prompt (EOS is at {eos}); the prompt's tokens are "
                        f"{_tokens.describe_tokens(tokenizer, prompt)}"
                    )
            pieces = tuple(all_tokens[i] for i in indices)
            resolved.append(replace(region, token_indices=tuple(indices), tokens=pieces))
        return Layout(resolved, prompt=prompt)

    # --- masks at other resolutions -------------------------------------------------------
    def masks_at(self, height: int, width: int, mode: str = "nearest",
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The masks as an (R, height, width) tensor, e.g. at an attention layer's size.

        ``"nearest"`` gives 0/1 exactly as the official code (``F.interpolate`` with its
        default nearest mode on the float mask); ``"area"`` gives each cell's covered
        fraction in [0, 1] when shrinking. Results are cached on this layout: treat the
        returned tensor as read-only.
        """
        if mode not in _MASK_MODES:
            raise ValueError(f"mode={mode!r}; use one of {_MASK_MODES}")
        height, width = _as_size((height, width))
        device = torch.device(device if device is not None else "cpu")
        key = (height, width, mode, str(device), dtype)
        if key not in self._cache:
            masks = torch.from_numpy(self.masks).float()
            if mode == "nearest":
                out = _nearest(masks, height, width)
            else:
                out = F.interpolate(masks[None], size=(height, width), mode="area")[0]
            self._cache[key] = out.to(device=device, dtype=dtype)
        return self._cache[key]

    def resized(self, height: int, width: int) -> "Layout":
        """The same layout at another image size (nearest resize of every mask)."""
        if (height, width) == (self.height, self.width):
            return self
        masks = self.masks_at(height, width, "nearest").numpy() > 0.5
        regions = []
        for region, mask in zip(self.regions, masks):
            if not mask.any():
                raise ValueError(
                    f"region {region.name!r} vanishes when the layout is resized from "
                    f"{self.height}x{self.width} to {height}x{width}; draw it larger"
                )
            regions.append(replace(region, mask=mask))
        return Layout(regions, prompt=self.prompt)

    def for_generation(self, height: int, width: int) -> "Layout":
        """This layout for an image of ``height`` x ``width``: resized with a warning if needed."""
        if (height, width) != (self.height, self.width):
            warnings.warn(
                f"the layout is {self.height}x{self.width} (height x width) but the image is "
                f"{height}x{width}; resizing the layout (nearest)",
                stacklevel=2,
            )
        return self.resized(height, width)

    # --- pictures --------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """Every region's :meth:`label`, in order: the words to name plots and tables with."""
        return [self.label(i) for i in range(len(self.regions))]

    def label(self, index: int) -> str:
        """Text shown for a region: its phrase, else its tokens' words, else its name."""
        region = self.regions[index]
        if region.phrase:
            return region.phrase
        if region.tokens:
            return " ".join(_tokens.token_text(t) for t in region.tokens)
        return region.name

    def color_image(self) -> np.ndarray:
        """(H, W, 3) uint8 picture: white background, each region in its color (later on top)."""
        picture = np.full((self.height, self.width, 3), 255, dtype=np.uint8)
        for region, color in zip(self.regions, self.colors):
            picture[region.mask] = color
        return picture

    def to_color_png(self, path: str | Path) -> dict[str, str]:
        """Save as a color-label PNG; returns the ``{hex: label}`` mapping to load it back.

        A label PNG has one color per pixel, so overlapping regions, shared colors and
        white/black (the background) are refused rather than silently lost.
        """
        colors = [to_hex(c) for c in self.colors]
        if len(set(colors)) != len(colors) or {"#ffffff", "#000000"} & set(colors):
            raise ValueError(f"region colors {colors} must be distinct and not white/black")
        if (self.masks.sum(axis=0) > 1).any():
            raise ValueError("regions overlap; a label PNG cannot store overlapping regions")
        Image.fromarray(self.color_image()).save(path)
        return {c: self.label(i) for i, c in enumerate(colors)}

    def preview(self, ax=None, image: Image.Image | np.ndarray | None = None, alpha: float = 0.5):
        """A matplotlib Figure of the layout with each region's phrase at its centre.

        With ``image`` (e.g. a generated PIL image) the layout is laid over it with
        opacity ``alpha``, stretched to the image's size. Draws into ``ax`` if given.
        """
        from matplotlib.figure import Figure  # no pyplot: no global figure state

        if ax is None:
            ax = Figure(figsize=(4, 4)).add_subplot()
        picture = self.color_image()
        if image is None:
            height, width = self.height, self.width
            ax.imshow(picture, extent=(0, width, height, 0), interpolation="nearest")
        else:
            background = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
            height, width = background.shape[:2]
            covered = self.masks.any(axis=0)
            overlay = np.dstack([picture, np.where(covered, round(255 * alpha), 0).astype(np.uint8)])
            ax.imshow(background, extent=(0, width, height, 0))
            ax.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
        sy, sx = height / self.height, width / self.width
        for i, region in enumerate(self.regions):
            y, x = _label_point(region.mask)
            ax.text((x + 0.5) * sx, (y + 0.5) * sy, self.label(i), ha="center", va="center",
                    fontsize=9, bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=1))
        ax.set_title(" | ".join(self.labels), fontsize=10)
        ax.set_xticks([])  # keep the frame: it shows the image border on a white background
        ax.set_yticks([])
        return ax.figure

    def __repr__(self) -> str:
        head = f"Layout {self.height}x{self.width}, {len(self)} region(s)"
        lines = [head + (f", prompt {self.prompt!r}" if self.prompt else "")]
        for i, (region, color) in enumerate(zip(self.regions, self.colors), start=1):
            if region.token_indices is None:
                words = "tokens ?"
            else:
                shown = f" {' '.join(region.tokens)}" if region.tokens else ""
                words = f"tokens {list(region.token_indices)}{shown}"
            lines.append(f"  {i}. {region.name!r:<20} area {region.area:6.1%}  {to_hex(color)}  {words}")
        if not self.is_resolved:
            lines.append("  (tokens ?: call .resolve(tokenizer, prompt) to find them)")
        return "\n".join(lines)


def _label_point(mask: np.ndarray) -> tuple[float, float]:
    """The region's centroid, or its pixel nearest to the centroid if that lies outside
    (a ring or a C shape), so the label always sits on the region."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    if mask[int(round(cy)), int(round(cx))]:
        return cy, cx
    nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
    return float(ys[nearest]), float(xs[nearest])
