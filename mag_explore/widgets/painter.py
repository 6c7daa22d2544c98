"""A freehand layout painter on ipycanvas: paint regions with the mouse, one brush per phrase.

    >>> painter = LayoutPainter("a red circle and a blue square", size=64)
    >>> painter            # paint; pick each brush's words; erase; the layout shows over the preview
    >>> painter.layout     # a Layout for MAG, swap or any control (MagPlayground(pipe, painter) reads it)
    >>> painter.save("outputs/my_layout")   # my_layout.png + my_layout.json, for the command line

Each brush holds one phrase of the prompt (consecutive words; a repeated word is picked by
occurrence, "red (2)"). The painting lives in ``labels``, an (H, W) array at the layout's
size (0: nothing, i: brush i), so what you see is exactly the layout's masks, and a
test can paint with ``paint_stroke`` or with canvas events, without a browser.
It needs the ipycanvas front end: JupyterLab has it once ipycanvas is installed; on Colab
the notebooks' setup cell enables the custom widget manager it needs.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

import ipywidgets as W
import numpy as np
from ipycanvas import Canvas, hold_canvas
from PIL import Image

from ..layouts import Layout, to_hex
from ..text.tokens import words_of
from .words import phrase_at, positions_of, quiet_updates, show_layout_status, word_options

__all__ = ["LayoutPainter"]

# Brush colors: distinct, saturated, never white or black (the background of a label PNG).
BRUSH_COLORS = ((230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 128, 128))
# A brush whose phrase names one of these colors is painted in it (when no other brush has it),
# so "blue square" is not painted red.
NAMED_COLORS = {"red": (230, 25, 75), "blue": (0, 130, 200), "green": (60, 180, 75), "orange": (245, 130, 48),
                "purple": (145, 30, 180), "yellow": (225, 200, 20), "pink": (240, 50, 230), "cyan": (70, 240, 240)}
OPACITY = 0.55  # of the paint over the preview


class LayoutPainter(W.VBox):
    """Paint a :class:`Layout` with the mouse; ``.layout`` is the current one.

    Args:
        prompt: the prompt whose words the brushes hold.
        size: the layout's size (int or (height, width)), e.g. the model's image size.
        canvas_size: the canvas's longer side on screen, in screen pixels.
        radius: the brush radius, in layout pixels.
        background: an image to paint over (e.g. a generated image); ``set_background``.
    """

    def __init__(self, prompt: str, size: int | tuple[int, int] = 64, canvas_size: int = 320, radius: int = 4,
                 background=None):
        self.prompt, self.words = prompt, words_of(prompt)
        if not self.words:
            raise ValueError(f"prompt {prompt!r} has no words to tie brushes to")
        self.height, self.width = (size, size) if isinstance(size, int) else tuple(size)
        self.scale = canvas_size / max(self.height, self.width)  # screen pixels per layout pixel
        self.labels = np.zeros((self.height, self.width), dtype=np.int16)
        self.brushes: list[tuple[int, ...]] = []  # word positions held by brush 1, 2, ...
        self._background = None
        self._last: tuple[float, float] | None = None  # the previous point of the stroke being drawn
        self._loading = False
        self.canvas = Canvas(width=round(self.width * self.scale), height=round(self.height * self.scale))
        self.canvas.layout.width, self.canvas.layout.height = f"{self.canvas.width}px", f"{self.canvas.height}px"
        self.brush = W.Dropdown(options=[], description="brush")
        self.new_button = W.Button(description="new brush", icon="plus")
        self.remove_button = W.Button(description="remove brush", icon="trash")
        options = word_options(self.words)
        self.phrase = W.SelectMultiple(options=options, rows=min(8, len(options)), description="words")
        self.mode = W.ToggleButtons(options=["paint", "erase"], description="mode")
        self.radius = W.IntSlider(value=radius, min=1, max=max(2, max(self.height, self.width) // 4),
                                  description="brush size")
        self.clear_button = W.Button(description="clear all", icon="eraser")
        self.status = W.HTML()
        self.canvas.on_mouse_down(self._on_down)
        self.canvas.on_mouse_move(self._on_move)
        self.canvas.on_mouse_up(self._on_up)
        self.canvas.on_mouse_out(self._on_up)
        self.new_button.on_click(lambda _: self.add_brush())
        self.remove_button.on_click(lambda _: self.remove_brush())
        self.clear_button.on_click(lambda _: self.clear())
        self.brush.observe(self._on_select, names="value")
        self.phrase.observe(self._on_words, names="value")
        for name, widget in (("canvas", self.canvas), ("brush", self.brush), ("new", self.new_button),
                             ("words", self.phrase), ("mode", self.mode), ("radius", self.radius),
                             ("status", self.status)):
            widget.add_class(f"mag-painter-{name}")  # stable hooks for the browser test
        tools = W.VBox([W.HBox([self.brush, self.new_button, self.remove_button]), self.phrase, self.mode,
                        self.radius, self.clear_button])
        super().__init__([W.HTML(f"prompt: <b>{html.escape(prompt)}</b> · paint on the canvas"),
                          W.HBox([self.canvas, tools]), self.status])
        self.add_class("mag-painter")
        if background is not None:
            self.set_background(background)
        self.add_brush()
        self.redraw()

    # -- brushes ---------------------------------------------------------------------------
    def add_brush(self, phrase: str | None = None, occurrence: int = 1) -> int:
        """A new brush (selected, so the next strokes use it); returns its number (1, 2, ...)."""
        if len(self.brushes) >= len(BRUSH_COLORS):
            raise ValueError(f"at most {len(BRUSH_COLORS)} brushes")
        self.brushes.append(positions_of(self.words, phrase, occurrence) if phrase else ())
        self._sync_brushes(select=len(self.brushes))
        return len(self.brushes)

    def remove_brush(self, number: int | None = None) -> None:
        """Remove a brush and its paint (default: the selected one); later brushes move up by one."""
        number = self.brush.value if number is None else number
        if number is None:
            return
        del self.brushes[number - 1]
        self.labels[self.labels == number] = 0
        self.labels[self.labels > number] -= 1
        self._sync_brushes(select=min(number, len(self.brushes)) or None)
        self.redraw()

    def clear(self) -> None:
        """Erase all paint (the brushes stay)."""
        self.labels[:] = 0
        self.redraw()

    def phrase_of(self, number: int) -> tuple[str, int]:
        """(phrase, occurrence) a brush holds."""
        try:
            return phrase_at(self.words, self.brushes[number - 1])
        except ValueError as error:
            raise ValueError(f"brush {number}: {error}") from None

    def color_of(self, number: int) -> tuple[int, int, int]:
        """A brush's color: the color its phrase names, if free, else a distinct one from the palette."""
        colors: list[tuple[int, int, int]] = []
        for positions in self.brushes[:number]:
            named = [NAMED_COLORS[self.words[i]] for i in positions if self.words[i] in NAMED_COLORS]
            free = [c for c in named + list(BRUSH_COLORS) if c not in colors]
            colors.append(free[0])
        return colors[number - 1]

    def _brush_label(self, number: int) -> str:
        words = " ".join(self.words[i] for i in sorted(self.brushes[number - 1])) or "(pick its words)"
        return f"{number}: {words}"

    def _sync_brushes(self, select: int | None) -> None:
        with quiet_updates(self):
            self.brush.options = [(self._brush_label(n), n) for n in range(1, len(self.brushes) + 1)]
            self.brush.value = select
        self._on_select()

    def _on_select(self, change=None) -> None:
        if self._loading:
            return
        number = self.brush.value
        self.phrase.disabled = self.remove_button.disabled = number is None
        if number is not None:
            with quiet_updates(self):
                self.phrase.value = tuple(self.brushes[number - 1])
        self._describe()

    def _on_words(self, change=None) -> None:
        if self._loading or self.brush.value is None:
            return
        number = self.brush.value
        self.brushes[number - 1] = tuple(sorted(self.phrase.value))
        self._sync_brushes(select=number)
        self.redraw()  # the brush's color may follow its new words

    # -- painting ----------------------------------------------------------------------------
    def paint_disc(self, row: float, col: float, number: int | None = None) -> None:
        """Set the layout pixels within ``radius`` of (row, col) to brush ``number`` (0 erases)."""
        number = self._current() if number is None else number
        r = self.radius.value
        ys, xs = np.ogrid[:self.height, :self.width]
        self.labels[(ys + 0.5 - row) ** 2 + (xs + 0.5 - col) ** 2 <= r * r] = number

    def paint_segment(self, start: tuple[float, float], end: tuple[float, float], number: int | None = None) -> None:
        """Discs along a straight line (layout pixels, (row, col)), so a fast stroke has no gaps."""
        distance = float(np.hypot(end[0] - start[0], end[1] - start[1]))
        count = max(1, int(np.ceil(distance / max(0.5, self.radius.value / 2))))
        for t in np.linspace(0.0, 1.0, count + 1):
            self.paint_disc(start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]), number)

    def paint_stroke(self, points: Sequence[tuple[float, float]], brush: int | None = None,
                     erase: bool = False) -> None:
        """Paint (or erase) along ``points`` given as (x, y) fractions of the image (0, 0 = top left)."""
        number = 0 if erase else (self._current() if brush is None else brush)
        cells = [(y * self.height, x * self.width) for x, y in points]
        for a, b in zip(cells, cells[1:] or cells):
            self.paint_segment(a, b, number)
        self.redraw()

    def _current(self) -> int:
        if self.mode.value == "erase":
            return 0
        if self.brush.value is None:
            raise ValueError("no brush: press 'new brush' first")
        return self.brush.value

    def _cell(self, x: float, y: float) -> tuple[float, float]:
        return y / self.scale, x / self.scale

    def _on_down(self, x: float, y: float) -> None:
        self._last = self._cell(x, y)
        self._paint_to(self._last)

    def _on_move(self, x: float, y: float) -> None:
        if self._last is not None:
            self._paint_to(self._cell(x, y))

    def _on_up(self, x: float, y: float) -> None:
        if self._last is not None:
            self._last = None
            self.redraw()  # the exact layout, now that the stroke is done

    def _paint_to(self, cell: tuple[float, float]) -> None:
        try:
            number = self._current()
        except ValueError as error:
            self._last = None
            self.status.value = f"<span style='color:#b00'>{html.escape(str(error))}</span>"
            return
        self.paint_segment(self._last, cell, number)
        self._last = cell
        if number == 0:
            self.redraw()
        else:  # while the mouse moves, draw only the new disc (cheap); mouse up redraws exactly
            with hold_canvas():
                self.canvas.fill_style = to_hex(self.color_of(number))
                self.canvas.global_alpha = OPACITY
                self.canvas.fill_circle(cell[1] * self.scale, cell[0] * self.scale, self.radius.value * self.scale)
                self.canvas.global_alpha = 1.0

    # -- what is shown -------------------------------------------------------------------------
    def set_background(self, image) -> None:
        """Paint over ``image`` (a PIL image or an (H, W, 3) array), e.g. the last generated one."""
        picture = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
        self._background = np.asarray(picture.convert("RGB").resize((self.width, self.height), Image.BILINEAR))
        self.redraw()

    def composite(self) -> np.ndarray:
        """The picture on the canvas at layout size: the background with each brush's paint over it."""
        base = self._background if self._background is not None else np.full((self.height, self.width, 3), 235)
        picture = base.astype(np.float32)
        for number in range(1, len(self.brushes) + 1):
            where = self.labels == number
            picture[where] = (1 - OPACITY) * picture[where] + OPACITY * np.array(self.color_of(number))
        return picture.round().astype(np.uint8)

    def redraw(self) -> None:
        factor = self.canvas.height / self.height, self.canvas.width / self.width
        rows = np.minimum((np.arange(self.canvas.height) / factor[0]).astype(int), self.height - 1)
        cols = np.minimum((np.arange(self.canvas.width) / factor[1]).astype(int), self.width - 1)
        self.canvas.put_image_data(self.composite()[rows][:, cols], 0, 0)
        self._describe()

    def _describe(self) -> None:
        show_layout_status(self)

    # -- the result ----------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        """The painted regions as a Layout (errors name the brush that is not ready)."""
        masks, phrases, occurrences, colors = [], [], [], []
        for number in range(1, len(self.brushes) + 1):
            phrase, occurrence = self.phrase_of(number)
            mask = self.labels == number
            if not mask.any():
                raise ValueError(f"brush {number} ({phrase!r}) has no paint yet: paint on the canvas or remove it")
            masks.append(mask)
            phrases.append(phrase)
            occurrences.append(occurrence)
            colors.append(self.color_of(number))
        if not masks:
            raise ValueError("no brush yet: press 'new brush'")
        return Layout.from_arrays(masks, phrases, occurrences, colors=colors, prompt=self.prompt)

    def to_code(self) -> str:
        """Python that rebuilds the layout without the widget: the label grid as text, one digit per pixel."""
        layout = self.layout  # checks every brush first
        rows = "\n".join("".join(str(int(v)) for v in row) for row in self.labels)
        numbers = range(1, len(layout) + 1)
        return (f'import numpy as np\nfrom mag_explore import Layout\n\nlabels = np.array([list(row) for row in """\n'
                f'{rows}\n""".split()]).astype(int)  # 0: nothing, i: brush i\n'
                f"layout = Layout.from_arrays([{', '.join(f'labels == {n}' for n in numbers)}], "
                f"{[r.phrase for r in layout.regions]!r}, occurrences={[r.occurrence for r in layout.regions]!r}, "
                f"prompt={self.prompt!r})")

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path``.png (a color-label PNG) and ``path``.json; ``Layout.from_json`` and the CLI read them."""
        stem = Path(path).with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        layout = self.layout
        png, meta = stem.with_suffix(".png"), stem.with_suffix(".json")
        mapping = layout.to_color_png(png)
        regions = {color: (label if region.occurrence == 1 else {"phrase": label, "occurrence": region.occurrence})
                   for (color, label), region in zip(mapping.items(), layout.regions)}
        meta.write_text(json.dumps({"prompt": self.prompt, "image": png.name, "regions": regions}, indent=2) + "\n")
        self.status.value += f"<br>saved {html.escape(str(png))} and {html.escape(str(meta))}"
        return png, meta
