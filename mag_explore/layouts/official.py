"""The official MAG input format: a color PNG whose colors, in the official script's order,
take the i-th list of ``word_ids_for_mask`` (token indices, BOS = 0)."""
from __future__ import annotations

import ast
import json
import numbers
from typing import Any, Iterable, Sequence

import numpy as np

from .colors import RGB, to_hex

#: More distinct colors than this in an official-format PNG means it is not a label
#: image (anti-aliased edges, JPEG noise) and the region order would be meaningless.
MAX_OFFICIAL_COLORS = 32


def check_token_indices(indices: Iterable[Any], what: str) -> tuple[int, ...]:
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
            check_token_indices(group, f"word ids list {number} {list(group)}")
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


def describe_official(colors: Sequence[RGB], rgb: np.ndarray) -> str:
    """``1: [0, 0, 255] (#ff0000, 120 px)`` lines, in official order, for error messages."""
    flat = rgb.reshape(-1, 3)
    lines = []
    for number, color in enumerate(colors, start=1):
        count = int((flat == color).all(axis=1).sum())
        lines.append(f"  {number}: BGR {list(color[::-1])} ({to_hex(color)}, {count} px)")
    return "\n".join(lines)
