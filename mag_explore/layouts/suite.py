"""Suites of layouts: a JSON list of prompts with regions, drawn at any size.

    {"layouts": [{"name": "left-right", "prompt": "a red circle and a blue square",
                  "regions": [{"phrase": "red circle", "rect": [0, 0, 0.5, 1]}, ...],
                  "tags": ["contradicts"]}, ...]}

Coordinates are relative, so one suite serves a 64² model and a 512² one. Used by the
evaluation and by the shapes model's check.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import Layout, ellipse, polygon, rect

_SHAPE_MAKERS = {"rect": rect, "ellipse": ellipse, "polygon": polygon}
MAX_REGIONS = 4  # columns iou_1 … iou_4 of the evaluation's CSV (COCO-MIG-like layouts have up to 4 here)


@dataclass
class SuiteLayout:
    name: str
    layout: Layout
    tags: tuple[str, ...] = ()


def _region_shape(entry: dict, where: str, palette: Mapping[str, tuple] | None):
    """One region of a suite: {"phrase": ..., "rect"|"ellipse"|"polygon": [...relative coords]}."""
    if not isinstance(entry, dict) or "phrase" not in entry:
        raise ValueError(f"{where}: a region must be an object with a 'phrase', got {entry!r}")
    kinds = [k for k in _SHAPE_MAKERS if k in entry]
    if len(kinds) != 1:
        raise ValueError(f"{where}: give exactly one of {list(_SHAPE_MAKERS)}, got keys {sorted(entry)}")
    kind, coords, phrase = kinds[0], entry[kinds[0]], entry["phrase"]
    # Previews in the phrase's own color where it names a color of the palette.
    color = entry.get("color") or next((palette[w] for w in str(phrase).split() if w in (palette or {})), None)
    if kind == "polygon":
        return polygon(phrase, [tuple(p) for p in coords], color=color)
    if not isinstance(coords, list) or len(coords) != 4:
        raise ValueError(f"{where}: {kind} needs 4 relative coordinates, got {coords!r}")
    return _SHAPE_MAKERS[kind](phrase, *coords, color=color)


def load_suite(path: str | Path, height: int, width: int,
               palette: Mapping[str, tuple] | None = None) -> list[SuiteLayout]:
    """The layouts of a suite JSON, drawn at ``height`` × ``width`` (coordinates are relative).

    ``palette`` maps color words to RGB for the previews (e.g. the shapes world's ``COLORS``).
    """
    path = Path(path)
    data = json.loads(path.read_text())
    entries = data.get("layouts") if isinstance(data, dict) else None
    if not entries:
        raise ValueError(f"{path}: expected {{'layouts': [{{'name', 'prompt', 'regions'}}, ...]}}")
    suite, names = [], set()
    for i, entry in enumerate(entries):
        name = entry.get("name", f"layout {i}")
        if name in names:
            raise ValueError(f"{path}: layout name {name!r} appears twice")
        names.add(name)
        regions = entry.get("regions") or []
        if not 1 <= len(regions) <= MAX_REGIONS:
            raise ValueError(f"{path}: layout {name!r} has {len(regions)} regions; give 1 to {MAX_REGIONS}")
        shapes = [_region_shape(r, f"{path}: layout {name!r}, region {j + 1}", palette) for j, r in enumerate(regions)]
        layout = Layout.from_shapes(height, width, shapes, prompt=entry["prompt"])
        suite.append(SuiteLayout(name, layout, tuple(entry.get("tags", ()))))
    return suite
