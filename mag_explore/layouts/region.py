"""A region: a boolean mask at image resolution plus the words it controls."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .colors import RGB, parse_color
from .official import check_token_indices
from .raster import to_bool_mask


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
        set_(self, "mask", to_bool_mask(self.mask, label))
        if self.phrase is None and self.token_indices is None:
            raise ValueError(f"{label}: give a phrase of the prompt or token_indices")
        if self.phrase is not None and not (isinstance(self.phrase, str) and self.phrase.strip()):
            raise ValueError(f"{label}: phrase must be a non-empty string, got {self.phrase!r}")
        if not isinstance(self.occurrence, numbers.Integral) or self.occurrence < 1:
            raise ValueError(f"{label}: occurrence must be an int >= 1, got {self.occurrence!r}")
        if self.token_indices is not None:
            set_(self, "token_indices", check_token_indices(self.token_indices, label))
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


def phrase_spec(value: Any, color: str) -> tuple[str, int]:
    """A mapping value: ``"red circle"`` or ``{"phrase": "red", "occurrence": 2}``."""
    if isinstance(value, str):
        return value, 1
    if isinstance(value, Mapping) and "phrase" in value:
        return value["phrase"], value.get("occurrence", 1)
    raise ValueError(
        f"color {color}: expected a phrase string or {{'phrase': ..., 'occurrence': n}}, got {value!r}"
    )
