"""The Layout: regions of one image size tied to words of a prompt, and its constructors."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..text import tokens as _tokens
from .colors import BACKGROUND_COLORS, RGB, close_to, colors_present, parse_color, region_colors, to_hex
from .official import (MAX_OFFICIAL_COLORS, OFFICIAL_COLOR_GRID, describe_official, official_color_grid,
                       official_color_order, parse_word_ids)
from .raster import Shape, as_size, read_rgb, resize_masks_if_needed, resize_nearest, to_bool_mask
from .region import Region, phrase_spec

#: How masks are resized to an attention layer: nearest (0/1, the official MAG), area (covered
#: fraction), bilinear (align_corners=True, as paint-with-words-sd).
MASK_MODES = ("nearest", "area", "bilinear")


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
        """Each region's color: its own, else the one its phrase names (``colors.region_colors``)."""
        return region_colors([r.color for r in self.regions], self.labels)

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
        rgb = read_rgb(path)
        masks, specs = [], []
        for key, value in regions.items():
            color = parse_color(key)
            mask = close_to(rgb, color, tolerance)
            if not mask.any():
                raise ValueError(
                    f"{path}: color {to_hex(color)} (from {key!r}) is not in the PNG "
                    f"(tolerance {tolerance}); colors present: {colors_present(rgb)}"
                )
            masks.append(mask)
            specs.append((color, *phrase_spec(value, key)))
        covered = np.any(masks, axis=0)
        for background in BACKGROUND_COLORS:
            covered |= close_to(rgb, background, tolerance)
        if unmapped == "error" and not covered.all():
            raise ValueError(
                f"{path}: colors {colors_present(rgb[~covered])} are neither mapped nor "
                "background (white/black); map them to phrases, raise tolerance for "
                "anti-aliased edges, or pass unmapped='ignore'"
            )
        stacked = resize_masks_if_needed(np.stack(masks), size, path)
        made = [Region(m, phrase, occurrence, color=color, name=phrase)
                for m, (color, phrase, occurrence) in zip(stacked, specs)]
        return cls(made, prompt=prompt)

    @classmethod
    def from_official(cls, path: str | Path, word_ids: str | Sequence[Sequence[int]],
                      size=None, prompt: str | None = None,
                      color_grid: int | None = OFFICIAL_COLOR_GRID) -> "Layout":
        """The official MAG input: a color PNG and ``word_ids_for_mask`` like "[[1,2,3,4],[6,7]]".

        Every distinct color of the PNG is a region, the background included, in the
        official order (:func:`official_color_order`); the i-th list of word ids belongs
        to the i-th color. Give one list per color (``[]`` for a color without words);
        black, which always sorts last, may be left out. Any other count is an error
        listing the colors in order (the official code silently leaves the colors after
        the last list unguided, so a forgotten list guides nothing there).
        Token index 0 (BOS) is refused.

        As in the official script, the colors are those of the PNG shrunk to
        ``color_grid`` x ``color_grid`` (64, nearest), so a line thinner than the grid's
        cells or an anti-aliasing color is not a region and shifts no list; a warning
        names such colors (their pixels are not guided). ``color_grid=None`` finds the
        colors at the PNG's own size instead. Each region's mask is its color's pixels at
        full size (nearest resizes of it equal the official 64x64 masks' wherever the
        sizes divide evenly).
        """
        groups = parse_word_ids(word_ids)
        rgb = read_rgb(path)
        found = official_color_grid(rgb, color_grid) if color_grid is not None else rgb
        colors = official_color_order(found)
        lost = [c for c in official_color_order(rgb) if c not in colors]
        if lost:
            shown = ", ".join(f"{to_hex(c)} ({int((rgb == c).all(-1).sum())} px)" for c in lost[:6])
            warnings.warn(
                f"{path}: colors {shown}{' and more' if len(lost) > 6 else ''} vanish when the PNG is shrunk "
                f"to {color_grid}x{color_grid} as the official script does, so they are not regions "
                "(their pixels are not guided); draw them larger to make them regions",
                stacklevel=2,
            )
        if len(colors) > MAX_OFFICIAL_COLORS:
            raise ValueError(
                f"{path} has {len(colors)} colors, more than {MAX_OFFICIAL_COLORS}: it is not a "
                "label image (anti-aliased edges or JPEG?). Save it without anti-aliasing"
            )
        listing = describe_official(colors, rgb)
        # One list per color; black, which always sorts last, may be left out (the background).
        expected = [len(colors), len(colors) - 1] if colors[-1] == (0, 0, 0) else [len(colors)]
        if len(groups) not in expected:
            example = json.dumps([[] for _ in colors[:-1]] + [[1]]).replace(" ", "")
            raise ValueError(
                f"{len(groups)} list(s) of word ids but {path} has {len(colors)} colors: give one list per "
                f"color in the official order (an empty list [] for a color without words, e.g. {example}); "
                f"the colors in that order are:\n{listing}"
            )
        pairs = [(c, g) for c, g in zip(colors, groups) if g]
        if not pairs:
            raise ValueError(f"no color of {path} has word ids; regions in order:\n{listing}")
        masks = resize_masks_if_needed(np.stack([(rgb == c).all(-1) for c, _ in pairs]), size, path)
        made = [Region(m, token_indices=g, color=c, name=f"{to_hex(c)} {g}")
                for m, (c, g) in zip(masks, pairs)]
        return cls(made, prompt=prompt)

    @classmethod
    def from_shapes(cls, height: int, width: int, shapes: Sequence[Shape],
                    prompt: str | None = None) -> "Layout":
        """Regions drawn in code with :func:`rect`, :func:`ellipse`, :func:`polygon`."""
        height, width = as_size((height, width))
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
        made = [Region(to_bool_mask(m, f"mask {i + 1} ({p!r})"), p, o, color=c)
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

        Phrase regions are looked up with :func:`mag_explore.text.tokens.token_indices`
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

    # --- masks at other grids -------------------------------------------------------------
    def masks_at(self, height: int, width: int, mode: str = "nearest",
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The masks as an (R, height, width) tensor, e.g. at an attention layer's size.

        ``"nearest"`` gives 0/1 exactly as the official code (``F.interpolate`` with its
        default nearest mode on the float mask); ``"area"`` gives each cell's covered
        fraction in [0, 1] when shrinking; ``"bilinear"`` interpolates with
        ``align_corners=True``, as paint-with-words-sd resizes its masks. Results are cached on this layout: treat the
        returned tensor as read-only.
        """
        if mode not in MASK_MODES:
            raise ValueError(f"mode={mode!r}; use one of {MASK_MODES}")
        height, width = as_size((height, width))
        device = torch.device(device if device is not None else "cpu")
        key = (height, width, mode, str(device), dtype)
        if key not in self._cache:
            masks = torch.from_numpy(self.masks).float()
            if mode == "nearest":
                out = resize_nearest(masks, height, width)
            elif mode == "bilinear":
                out = F.interpolate(masks[None], size=(height, width), mode="bilinear", align_corners=True)[0]
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
