"""LayoutBuilder: regions tied to the prompt's words, placed with sliders, with a live preview."""
from __future__ import annotations

import html
from dataclasses import dataclass, replace

import ipywidgets as W

from ..layouts import Layout, ellipse, rect
from ..plots import figure_png, plot_layout
from ..text.tokens import words_of
from .words import phrase_at, positions_of, quiet_updates, show_layout_status, word_options


@dataclass(frozen=True)
class RegionSpec:
    """One region of a :class:`LayoutBuilder`: which words, which shape, where (fractions of the image)."""

    words: tuple[int, ...] = ()  # positions in the prompt's word list
    kind: str = "rectangle"  # or "ellipse"
    x: float = 0.5  # centre, 0 = left
    y: float = 0.5  # centre, 0 = top
    width: float = 0.4
    height: float = 0.4


class LayoutBuilder(W.VBox):
    """Build a :class:`Layout` with buttons and sliders; ``.layout`` is the current one.

    >>> builder = LayoutBuilder("a red circle and a blue square")
    >>> builder.add_region("red circle", kind="ellipse", x=0.3, y=0.5, width=0.4, height=0.5)
    >>> builder  # shows the controls and a live preview
    """

    def __init__(self, prompt: str, size: int | tuple[int, int] = 64, preview_size: int = 256):
        self.prompt, self.words = prompt, words_of(prompt)
        if not self.words:
            raise ValueError(f"prompt {prompt!r} has no words to tie regions to")
        self.height, self.width = (size, size) if isinstance(size, int) else size
        self.specs: list[RegionSpec] = []
        self._loading = False
        self.region = W.Dropdown(options=[], description="region")
        self.add_button = W.Button(description="add region", icon="plus")
        self.remove_button = W.Button(description="remove", icon="trash")
        options = word_options(self.words)
        self.phrase = W.SelectMultiple(options=options, rows=min(8, len(options)), description="words")
        self.kind = W.ToggleButtons(options=["rectangle", "ellipse"], description="shape")
        slider = dict(min=0.0, max=1.0, step=0.01, continuous_update=False)
        self.x = W.FloatSlider(value=0.5, description="x centre", **slider)
        self.y = W.FloatSlider(value=0.5, description="y centre", **slider)
        self.w = W.FloatSlider(value=0.4, description="width", **{**slider, "min": 0.05})
        self.h = W.FloatSlider(value=0.4, description="height", **{**slider, "min": 0.05})
        self.preview = W.Image(format="png", width=preview_size, height=preview_size)
        self.status = W.HTML()
        self.add_button.on_click(lambda _: self.add_region())
        self.remove_button.on_click(lambda _: self.remove_region())
        self.region.observe(self._on_select, names="value")
        for control in (self.phrase, self.kind, self.x, self.y, self.w, self.h):
            control.observe(self._on_edit, names="value")
        editors = W.VBox([W.HBox([self.region, self.add_button, self.remove_button]), self.phrase, self.kind,
                          self.x, self.y, self.w, self.h])
        super().__init__([W.HTML(f"prompt: <b>{html.escape(prompt)}</b>"), W.HBox([editors, self.preview]),
                          self.status])
        self.add_class("mag-layout-builder")
        self._refresh()

    # -- regions -----------------------------------------------------------------------
    def add_region(self, phrase: str | None = None, kind: str = "rectangle", x: float = 0.5, y: float = 0.5,
                   width: float = 0.4, height: float = 0.4, occurrence: int = 1) -> int:
        """Add a region (and select it); returns its index. ``phrase``: words of the prompt."""
        if kind not in ("rectangle", "ellipse"):
            raise ValueError(f"kind={kind!r}; use 'rectangle' or 'ellipse'")
        words = self._positions(phrase, occurrence) if phrase else ()
        self.specs.append(RegionSpec(words, kind, x, y, width, height))
        self._sync_regions(select=len(self.specs) - 1)
        return len(self.specs) - 1

    def remove_region(self, index: int | None = None) -> None:
        """Remove a region (default: the selected one)."""
        index = self.region.value if index is None else index
        if index is None:
            return
        del self.specs[index]
        self._sync_regions(select=min(index, len(self.specs) - 1) if self.specs else None)

    def _positions(self, phrase: str, occurrence: int) -> tuple[int, ...]:
        return positions_of(self.words, phrase, occurrence)

    def phrase_of(self, spec: RegionSpec) -> tuple[str, int]:
        """(phrase, occurrence) of a region's words; the words must be consecutive."""
        return phrase_at(self.words, spec.words)

    def shape_of(self, spec: RegionSpec):
        """The :func:`rect` or :func:`ellipse` a region stands for (clipped to the image)."""
        phrase, occurrence = self.phrase_of(spec)
        if spec.kind == "ellipse":
            return ellipse(phrase, spec.x, spec.y, spec.width / 2, spec.height / 2, occurrence=occurrence)
        x0, x1 = max(0.0, spec.x - spec.width / 2), min(1.0, spec.x + spec.width / 2)
        y0, y1 = max(0.0, spec.y - spec.height / 2), min(1.0, spec.y + spec.height / 2)
        return rect(phrase, x0, y0, x1, y1, occurrence=occurrence)

    @property
    def layout(self) -> Layout:
        """The regions as a Layout of ``size`` with the builder's prompt (errors name the region)."""
        if not self.specs:
            raise ValueError("no region yet: press 'add region' (or call add_region)")
        shapes = []
        for number, spec in enumerate(self.specs, start=1):
            try:
                shapes.append(self.shape_of(spec))
            except ValueError as error:
                raise ValueError(f"region {number}: {error}") from None
        return Layout.from_shapes(self.height, self.width, shapes, prompt=self.prompt)

    def to_code(self) -> str:
        """Python that rebuilds the layout without the widget (to paste into a script)."""
        lines = [f"Layout.from_shapes({self.height}, {self.width}, ["]
        for spec in self.specs:
            s = self.shape_of(spec)
            coords = ", ".join(f"{c:.3g}" for c in s.coords)
            extra = f", occurrence={s.occurrence}" if s.occurrence != 1 else ""
            lines.append(f"    {s.kind}({s.phrase!r}, {coords}{extra}),")
        lines.append(f"], prompt={self.prompt!r})")
        return "\n".join(lines)

    # -- keeping the controls and the regions in step ------------------------------------
    def _label(self, index: int) -> str:
        spec = self.specs[index]
        words = " ".join(self.words[i] for i in sorted(spec.words)) or "(no words yet)"
        return f"{index + 1}: {words} ({spec.kind})"

    def _sync_regions(self, select: int | None) -> None:
        with quiet_updates(self):
            self.region.options = [(self._label(i), i) for i in range(len(self.specs))]
            self.region.value = select
        self._on_select()

    def _on_select(self, change=None) -> None:
        if self._loading:
            return
        index = self.region.value
        editors = (self.phrase, self.kind, self.x, self.y, self.w, self.h, self.remove_button)
        for control in editors:
            control.disabled = index is None
        if index is not None:
            spec = self.specs[index]
            with quiet_updates(self):
                self.phrase.value = tuple(spec.words)
                self.kind.value, self.x.value, self.y.value = spec.kind, spec.x, spec.y
                self.w.value, self.h.value = spec.width, spec.height
        self._refresh()

    def _on_edit(self, change=None) -> None:
        if self._loading or self.region.value is None:
            return
        index = self.region.value
        self.specs[index] = replace(self.specs[index], words=tuple(self.phrase.value), kind=self.kind.value,
                                    x=self.x.value, y=self.y.value, width=self.w.value, height=self.h.value)
        with quiet_updates(self):  # relabel the region (its words or shape may have changed), keeping it selected
            self.region.options = [(self._label(i), i) for i in range(len(self.specs))]
            self.region.value = index
        self._refresh()

    def _refresh(self) -> None:
        layout = show_layout_status(self)
        if layout is not None:
            self.preview.value = figure_png(plot_layout(layout))
