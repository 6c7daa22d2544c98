"""Colors of layout regions: hex strings and RGB triples, the palette, color matching in PNGs."""
from __future__ import annotations

from typing import Sequence
import numbers

import numpy as np

RGB = tuple[int, int, int]

#: Unmapped colors that :meth:`Layout.from_color_png` treats as background.
BACKGROUND_COLORS: tuple[RGB, ...] = ((255, 255, 255), (0, 0, 0))

#: The color a region is drawn in when its phrase names one ("a red circle" -> red): in a
#: world where color is the content, a "red circle" region drawn blue misleads the reader.
#: The first five are the shapes world's own colors (``shapes.world.COLORS``).
NAMED_COLORS: dict[str, RGB] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (240, 200, 20),
    "purple": (140, 50, 180), "orange": (245, 130, 30), "pink": (235, 120, 180), "brown": (140, 90, 50),
    "gray": (128, 128, 128), "grey": (128, 128, 128), "cyan": (30, 190, 210), "violet": (140, 50, 180),
}

#: Colors for regions that have none and whose phrase names no color (matplotlib's tab10, as 0-255 RGB).
PALETTE: tuple[RGB, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


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


def color_named_in(phrase: str | None) -> RGB | None:
    """The color a phrase names ("a red circle" -> red's RGB), or None; the first color word wins."""
    for word in (phrase or "").lower().replace(",", " ").split():
        if word in NAMED_COLORS:
            return NAMED_COLORS[word]
    return None


def region_colors(own: Sequence[RGB | None], phrases: Sequence[str]) -> list[RGB]:
    """Each region's color: its own, else the color its phrase names ("red circle" -> red), else
    the next palette color no other region uses (so that regions stay distinguishable)."""
    chosen: list[RGB | None] = []
    for color, phrase in zip(own, phrases):
        named = color_named_in(phrase)
        chosen.append(color or (named if named not in chosen else None))
    spare = iter([c for c in PALETTE if c not in chosen] + list(PALETTE))
    return [color or next(spare) for color in chosen]


def colors_present(rgb: np.ndarray, limit: int = 12) -> str:
    """``#ffffff (3000 px), #ff0000 (500 px), ...`` most common first, for error messages."""
    colors, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    order = np.argsort(-counts)
    shown = [f"{to_hex(colors[i])} ({counts[i]} px)" for i in order[:limit]]
    more = f", and {len(order) - limit} more" if len(order) > limit else ""
    return ", ".join(shown) + more


def close_to(rgb: np.ndarray, color: RGB, tolerance: int) -> np.ndarray:
    """Pixels whose every channel is within ``tolerance`` of ``color``."""
    return (np.abs(rgb.astype(np.int16) - np.array(color, np.int16)) <= tolerance).all(axis=-1)
