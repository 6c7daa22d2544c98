"""AttentionExplorer: browse the cross-attention maps of a finished run (display only)."""
from __future__ import annotations

import html

import ipywidgets as W
import torch
import torch.nn.functional as F

from ..plots import CMAP, attention_overlay, png_bytes, short_layer_name
from ..sampling import GenerationResult
from ..text.tokens import token_text


class AttentionExplorer(W.VBox):
    """Cross-attention maps of one finished run, over its image.

    >>> result = mx.generate(pipe, prompt, store=mx.AttentionStore(heads="all"))
    >>> AttentionExplorer(result, token="circle")

    Controls (all display-only): ``step`` (a slider over the stored steps, with ``play``
    to animate it), ``layer`` (every layer, all layers of one grid, or one layer),
    ``token``, ``head`` (needs a store made with ``heads="all"``) and ``opacity``.
    ``selected_map()`` is the h×w map on screen, ``image.value`` its PNG.
    """

    def __init__(self, result: GenerationResult, token: str | int | None = None, size: int = 256,
                 cmap: str = CMAP, interval_ms: int = 400):
        store = result.store
        if store is None or not store.maps:
            raise ValueError("this result has no attention maps: pass store=AttentionStore() to generate()")
        self.result, self.store, self.size, self.cmap = result, store, size, cmap
        self.draws = 0
        self._quiet = False  # set while options change, so one change draws once
        steps = store.step_indices
        self.step = W.SelectionSlider(options=steps, value=steps[-1], description="step",
                                      continuous_update=True)
        self.play = W.Play(min=0, max=len(steps) - 1, value=len(steps) - 1, interval=interval_ms,
                           description="animate the steps")
        W.link((self.play, "value"), (self.step, "index"))  # kernel-side link: also works in tests
        self.layer = W.Dropdown(options=self._layer_options(), description="layers")
        self.token = W.Dropdown(options=self._token_options(), value=self._initial_token(token),
                                description="token")
        self.head = W.Dropdown(options=[("mean of heads", None)], description="head")
        self.opacity = W.FloatSlider(value=0.6, min=0.0, max=1.0, step=0.05, description="opacity")
        self.image = W.Image(format="png", width=size, height=size)
        self.caption = W.HTML()
        self._update_heads()
        for control in (self.step, self.token, self.head, self.opacity):
            control.observe(self._redraw, names="value")
        self.layer.observe(self._on_layer, names="value")
        for name, control in (("step", self.step), ("play", self.play), ("layer", self.layer),
                              ("token", self.token), ("head", self.head), ("opacity", self.opacity),
                              ("image", self.image)):
            control.add_class(f"mag-explorer-{name}")  # stable hooks for the browser test
        controls = W.VBox([W.HBox([self.play, self.step]), self.layer, self.token, self.head, self.opacity])
        super().__init__([self.caption, W.HBox([self.image, controls])])
        self.add_class("mag-explorer")
        self.redraw()

    # -- options -----------------------------------------------------------------------
    def _layer_options(self) -> list[tuple[str, tuple]]:
        layers = self.store.layers
        by_grid: dict[tuple[int, int], list[str]] = {}
        for layer in layers:
            by_grid.setdefault(self.store.grid(layer), []).append(layer)
        options = [(f"all {len(layers)} layers (resampled, mean)", ("all", None))]
        options += [(f"all {h}×{w} layers ({len(names)})", ("grid", (h, w)))
                    for (h, w), names in sorted(by_grid.items(), reverse=True)]
        options += [(f"{short_layer_name(layer)} {h}×{w}", ("layer", layer))
                    for layer in layers for h, w in [self.store.grid(layer)]]
        return options

    def _token_options(self) -> list[tuple[str, int]]:
        names = self.result.tokens
        return [(f"{i}: {token_text(names[i]) if i < len(names) else '<pad>'}", i) for i in self.store.token_indices]

    def _initial_token(self, token) -> int:
        stored = self.store.token_indices
        if token is None:
            return stored[1] if len(stored) > 1 else stored[0]
        index = token if isinstance(token, int) else self.result.token_indices(token)[0]
        if index not in stored:
            raise ValueError(f"token {token!r} (index {index}) was not stored; stored token indices: {stored}")
        return index

    def chosen_layers(self) -> list[str]:
        """The layers the ``layer`` control stands for."""
        kind, what = self.layer.value
        if kind == "layer":
            return [what]
        if kind == "grid":
            return [layer for layer in self.store.layers if self.store.grid(layer) == what]
        return list(self.store.layers)

    def _update_heads(self) -> None:
        options = [("mean of heads", None)]
        if self.store.heads == "all":
            heads = min(self.store.get(self.step.value, layer).shape[1] for layer in self.chosen_layers())
            options += [(f"head {h}", h) for h in range(heads)]
        keep = self.head.value if any(value == self.head.value for _, value in options) else None
        self._quiet = True
        try:
            self.head.options = options
            self.head.value = keep
        finally:
            self._quiet = False
        self.head.disabled = len(options) == 1

    # -- the map on screen -----------------------------------------------------------
    def selected_map(self) -> torch.Tensor:
        """The h×w float32 map shown: one layer's map, or the mean of several resampled to the finest."""
        layers = self.chosen_layers()
        maps = [self.store.map(self.step.value, layer, self.token.value, head=self.head.value) for layer in layers]
        if len(maps) == 1:
            return maps[0]
        size = max((m.shape for m in maps), key=lambda s: s[0] * s[1])
        resized = [F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
                   if m.shape != size else m for m in maps]
        return torch.stack(resized).mean(0)

    def describe(self) -> str:
        """What is on screen, in words: token, step and timestep, layers, head."""
        step = self.step.value
        layer_label = next(label for label, value in self.layer.options if value == self.layer.value)
        head = "head mean" if self.head.value is None else f"head {self.head.value}"
        word = self.token.label.split(": ", 1)[-1]
        return f'"{word}" (token {self.token.value}) · step {step} (t={self.store.timesteps.get(step)}) · {layer_label} · {head}'

    def _on_layer(self, change=None) -> None:
        self._update_heads()
        self._redraw()

    def _redraw(self, change=None) -> None:
        if not self._quiet:
            self.redraw()

    def redraw(self) -> None:
        heat = self.selected_map()
        picture = attention_overlay(self.result.images[0], heat, alpha=self.opacity.value, cmap=self.cmap,
                                    size=self.size)
        self.image.value = png_bytes(picture)
        self.caption.value = f"<b>{html.escape(self.describe(), quote=False)}</b> · peak {float(heat.max()):.3f}, " \
                             f"sum {float(heat.sum()):.3f}"
        self.draws += 1
