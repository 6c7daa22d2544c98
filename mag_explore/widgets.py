"""Interactive tools for the notebooks, built with ipywidgets.

* :class:`AttentionExplorer` - browse the cross-attention maps of a finished run: step,
  layer or resolution, token, head and opacity. Every control redraws from the stored
  maps; none of them runs the model.
* :class:`MagPlayground` - MAG's knobs (α, λ, guidance steps, swap steps, CFG, seed).
  Nothing runs until the Run button; a progress bar follows the steps. An interrupted run
  (the kernel's stop button) leaves the pipeline as it was: the engine restores every
  attention processor on any exit.
* :class:`LayoutBuilder` - regions tied to the prompt's words, placed and sized with
  sliders (rectangles and ellipses), with a live preview; ``.layout`` is the result.

Each tool *is* an ``ipywidgets.VBox``: put it last in a cell to show it. Their state is
plain Python attributes, so tests set a control's ``value`` and check what happened,
with no browser.
"""
from __future__ import annotations

import html
import io
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import ipywidgets as W
import torch
import torch.nn.functional as F

from .attention import AttentionStore, cross_attention_layer_names
from .layouts import Layout, ellipse, rect
from .methods import MaskedAttentionGuidance, MaskedAttentionSwap
from .models import model_defaults, shapes_model_dir
from .plots import CMAP, attention_overlay, figure_png, plot_run_summary, short_layer_name
from .sampling import GenerationResult, Sampler
from .schedule import StepRange

__all__ = ["AttentionExplorer", "LayoutBuilder", "MagPlayground", "png_bytes"]


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes (what an ``ipywidgets.Image`` shows)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _word(token: str) -> str:
    return token.replace("</w>", "")


# ============================================================================ explorer
class AttentionExplorer(W.VBox):
    """Cross-attention maps of one finished run, over its image.

    >>> result = mx.generate(pipe, prompt, store=mx.AttentionStore(heads="all"))
    >>> AttentionExplorer(result, token="circle")

    Controls (all display-only): ``step`` (a slider over the stored steps, with ``play``
    to animate it), ``layer`` (every layer, all layers of one resolution, or one layer),
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
        by_resolution: dict[tuple[int, int], list[str]] = {}
        for layer in layers:
            by_resolution.setdefault(self.store.resolution(layer), []).append(layer)
        options = [(f"all {len(layers)} layers (resampled, mean)", ("all", None))]
        options += [(f"all {h}×{w} layers ({len(names)})", ("resolution", (h, w)))
                    for (h, w), names in sorted(by_resolution.items(), reverse=True)]
        options += [(f"{short_layer_name(layer)} {h}×{w}", ("layer", layer))
                    for layer in layers for h, w in [self.store.resolution(layer)]]
        return options

    def _token_options(self) -> list[tuple[str, int]]:
        names = self.result.tokens
        return [(f"{i}: {_word(names[i]) if i < len(names) else '<pad>'}", i) for i in self.store.token_indices]

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
        if kind == "resolution":
            return [layer for layer in self.store.layers if self.store.resolution(layer) == what]
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


# ============================================================================ playground
def schedule_timesteps(pipe, num_inference_steps: int) -> list[int]:
    """The timesteps a run of ``num_inference_steps`` will visit (a fresh DDIM scheduler)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    return [int(t) for t in scheduler.timesteps]


def cross_attention_resolutions(pipe) -> list[int]:
    """The larger side of each cross-attention resolution of ``pipe``'s UNet at its default size, finest first."""
    defaults, unet = model_defaults(pipe), pipe.unet
    side = max(defaults["height"], defaults["width"]) // pipe.vae_scale_factor
    levels = len(unet.config.block_out_channels)
    found = set()
    for layer in cross_attention_layer_names(unet):
        part, index = layer.split(".")[0], int(layer.split(".")[1]) if layer.split(".")[1].isdigit() else 0
        level = {"down_blocks": index, "up_blocks": levels - 1 - index}.get(part, levels - 1)
        found.add(-(-side // 2 ** level))  # each level halves the side (rounding up, as a stride-2 conv)
    return sorted(found, reverse=True)


def is_shapes_model(pipe) -> bool:
    """Whether ``pipe`` is the embedded shapes model (whose images can be segmented by color)."""
    name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    return bool(name) and Path(name).is_dir() and Path(name).resolve() == shapes_model_dir().resolve()


class MagPlayground(W.VBox):
    """MAG (and masked-attention swapping) with sliders; runs only when Run is pressed.

    ``layout`` is a :class:`~mag_explore.layouts.Layout` or anything with a ``.layout``
    (a :class:`LayoutBuilder` or a :class:`~mag_explore.painter.LayoutPainter`: its current
    layout is read at each run; a painter gets the new image under its paint). Step ranges
    are step indices ``[start, stop)``; an empty range (start = stop) switches that method
    off; ``resolutions`` and ``places`` choose MAG's layers. After a run: ``result`` (with its
    attention store), ``runs``, the summary ``image``, and ``history``: the last ``remember``
    runs (settings, image, IoU in the shapes world), shown side by side.
    """

    def __init__(self, pipe, layout: Any, prompt: str | None = None, steps: int | None = None, seed: int = 0,
                 remember: int = 4, score_iou: bool | None = None):
        defaults = model_defaults(pipe)
        self.pipe, self._layout_source = pipe, layout
        self._prompt = prompt
        self.height, self.width = defaults["height"], defaults["width"]
        self.num_steps = int(steps or defaults["num_inference_steps"])
        self.timesteps = schedule_timesteps(pipe, self.num_steps)
        guided = StepRange(above_timestep=int(defaults["guide_until"])).selected(self.timesteps)
        guide_default = (0, guided[-1] + 1) if guided else (0, max(1, self.num_steps // 3))
        n = self.num_steps
        style = {"description_width": "120px"}
        wide = W.Layout(width="460px")
        self.alpha = W.FloatSlider(value=defaults["mag_alpha"], min=0.0, max=max(1.0, 4 * defaults["mag_alpha"]),
                                   step=0.01, description="α step size", style=style, layout=wide)
        self.lmbda = W.FloatSlider(value=defaults["mag_lambda"], min=0.0, max=2.0, step=0.05,
                                   description="λ outside weight", style=style, layout=wide)
        self.guide_steps = W.IntRangeSlider(value=guide_default, min=0, max=n, description="MAG steps [a, b)",
                                            style=style, layout=wide)
        self.swap_steps = W.IntRangeSlider(value=(0, 0), min=0, max=n, description="swap steps [a, b)",
                                           style=style, layout=wide)
        self.cfg = W.FloatSlider(value=defaults["guidance_scale"], min=1.0, max=15.0, step=0.5,
                                 description="CFG scale", style=style, layout=wide)
        self.seed = W.IntSlider(value=seed, min=0, max=1000, description="seed", style=style, layout=wide)
        self.resolutions = W.SelectMultiple(options=[(f"side {r}", r) for r in cross_attention_resolutions(pipe)],
                                            description="MAG layers at", style=style, rows=3)
        self.resolutions.value = tuple(v for _, v in self.resolutions.options)  # all
        self.places = W.SelectMultiple(options=["down", "mid", "up"], value=("down", "mid", "up"),
                                       description="MAG in UNet half", style=style, rows=3)
        self.remember = int(remember)
        self.score_iou = is_shapes_model(pipe) if score_iou is None else score_iou
        self.history: list[dict] = []
        self.memory = W.HBox()
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.progress = W.IntProgress(value=0, min=0, max=n, description="steps")
        self.status = W.HTML()
        self.image = W.Image(format="png")
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.runs = 0
        self.run_button.on_click(self._on_click)
        for control in (self.alpha, self.lmbda, self.guide_steps, self.swap_steps, self.cfg, self.seed,
                        self.resolutions, self.places):
            control.observe(self._on_setting, names="value")
        for name, control in (("alpha", self.alpha), ("lambda", self.lmbda), ("guide", self.guide_steps),
                              ("swap", self.swap_steps), ("cfg", self.cfg), ("seed", self.seed),
                              ("run", self.run_button), ("progress", self.progress), ("image", self.image),
                              ("resolutions", self.resolutions), ("places", self.places), ("memory", self.memory)):
            control.add_class(f"mag-playground-{name}")
        sliders = W.VBox([self.alpha, self.lmbda, self.guide_steps, self.swap_steps, self.cfg, self.seed])
        layers = W.VBox([self.resolutions, self.places])
        super().__init__([W.HBox([sliders, layers]), W.HBox([self.run_button, self.progress]), self.status,
                          self.image, W.HTML("<b>last runs</b> (newest first)"), self.memory])
        self.add_class("mag-playground")
        self._on_setting()
        try:
            self.image.value = figure_png(self.layout.preview())  # the layout, until the first run
        except ValueError as error:  # e.g. a LayoutBuilder with no region yet: say so, run later
            self.status.value += f"<br>layout not ready: {html.escape(str(error))}"

    @property
    def layout(self) -> Layout:
        """The layout of the next run, at the model's image size."""
        layout = getattr(self._layout_source, "layout", self._layout_source)
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a Layout or have a .layout, got {type(layout).__name__}")
        return layout.resized(self.height, self.width)

    @property
    def prompt(self) -> str:
        prompt = self._prompt or self.layout.prompt or getattr(self._layout_source, "prompt", None)
        if not prompt:
            raise ValueError("no prompt: pass prompt= or give a layout that has one")
        return prompt

    def _range(self, slider) -> StepRange | None:
        start, stop = slider.value
        return None if start >= stop or start >= self.num_steps else StepRange(start=start, stop=stop)

    def controls(self) -> list:
        """The sampler controls the current settings stand for (swap first, then MAG)."""
        layout, made = self.layout, []
        swap, guide = self._range(self.swap_steps), self._range(self.guide_steps)
        if swap is not None:
            made.append(MaskedAttentionSwap(layout, steps=swap))
        if guide is not None:
            made.append(MaskedAttentionGuidance(layout, alpha=self.alpha.value, lmbda=self.lmbda.value, steps=guide,
                                                **self._layer_choice()))
        return made

    def _layer_choice(self) -> dict:
        """MAG's ``resolutions`` / ``places``: None where everything is selected (the official setting)."""
        chosen = {}
        if set(self.resolutions.value) != {v for _, v in self.resolutions.options}:
            chosen["resolutions"] = set(self.resolutions.value)
        if set(self.places.value) != {"down", "mid", "up"}:
            chosen["places"] = set(self.places.value)
        return chosen

    def _describe_range(self, slider, name: str) -> str:
        chosen = self._range(slider)
        if chosen is None:
            return f"{name}: off"
        steps = chosen.selected(self.timesteps)
        return f"{name}: steps {steps[0]}–{steps[-1]} (t {self.timesteps[steps[0]]}…{self.timesteps[steps[-1]]})"

    def _on_setting(self, change=None) -> None:
        # Settings only describe the next run; the model runs when Run is pressed.
        pending = " · <i>press Run to apply</i>" if self.runs else " · <i>press Run</i>"
        self.status.value = (f"{self._describe_range(self.guide_steps, 'MAG')}; "
                             f"{self._describe_range(self.swap_steps, 'swap')}{pending}")

    def _on_step(self, sampler: Sampler) -> None:
        self.progress.value = sampler.step_index

    def run(self) -> GenerationResult:
        """Generate with the current settings (what the Run button does, errors included)."""
        self.progress.value, self.progress.bar_style = 0, ""
        controls = self.controls()
        self.last_controls = controls  # the method objects of the latest run, with their history
        sampler = Sampler(self.pipe, self.prompt, num_inference_steps=self.num_steps,
                          guidance_scale=self.cfg.value, seed=self.seed.value, controls=controls,
                          store=AttentionStore(), callbacks=[self._on_step])
        while not sampler.done:
            sampler.step()  # hooks are installed and removed inside each step
        result = sampler.result()
        self.result, self.runs = result, self.runs + 1
        self.progress.bar_style = "success"
        self.image.value = figure_png(plot_run_summary(result, self.layout.resolve(self.pipe.tokenizer, self.prompt),
                                                       title=self._title()))
        self.status.value = self._summary(result)
        self._remember(result)
        if hasattr(self._layout_source, "set_background"):  # a painter: paint over the new image
            self._layout_source.set_background(result.images[0])
        return result

    def settings(self) -> dict:
        """The current settings, as recorded in ``history``."""
        return {"alpha": self.alpha.value, "lambda": self.lmbda.value, "mag_steps": tuple(self.guide_steps.value),
                "swap_steps": tuple(self.swap_steps.value), "cfg": self.cfg.value, "seed": self.seed.value,
                **{k: sorted(v) for k, v in self._layer_choice().items()}}

    def _remember(self, result: GenerationResult) -> None:
        from .course import region_iou  # the shapes world's color segmentation

        iou = region_iou(result.images[0], self.layout) if self.score_iou else None
        self.history.insert(0, {"run": self.runs, "settings": self.settings(), "image": result.images[0], "iou": iou})
        del self.history[self.remember:]
        self.memory.children = [self._memory_card(entry) for entry in self.history]

    def _memory_card(self, entry: dict) -> W.VBox:
        s = entry["settings"]
        lines = [f"run {entry['run']} · seed {s['seed']} · CFG {s['cfg']}",
                 f"MAG {s['mag_steps'][0]}–{s['mag_steps'][1]} α {s['alpha']} λ {s['lambda']}",
                 f"swap {s['swap_steps'][0]}–{s['swap_steps'][1]}"]
        if "resolutions" in s or "places" in s:
            lines.append(f"layers {s.get('resolutions', 'all')} {s.get('places', '')}")
        if entry["iou"] is not None:
            lines.append("IoU " + ", ".join(f"{label} {v:.2f}" for label, v in entry["iou"].items()))
        image = W.Image(value=png_bytes(entry["image"]), format="png", width=128, height=128)
        return W.VBox([image, W.HTML("<br>".join(html.escape(line) for line in lines))],
                      layout=W.Layout(width="190px"))

    def _title(self) -> str:
        return (f'"{self.prompt}" · seed {self.seed.value} · CFG {self.cfg.value} · '
                f"{self._describe_range(self.guide_steps, 'MAG')} (α={self.alpha.value}, λ={self.lmbda.value}) · "
                f"{self._describe_range(self.swap_steps, 'swap')}")

    def _summary(self, result: GenerationResult) -> str:
        text = f"run {self.runs} done: {html.escape(self._title())}"
        mag = result.diagnostics.get("MaskedAttentionGuidance")
        if mag:
            labels = [self.layout.label(i) for i in range(len(self.layout))]
            first, last = mag["inside_share"][0], mag["inside_share"][-1]
            shares = ", ".join(f"{html.escape(label)} {a:.0%}→{b:.0%}" for label, a, b in zip(labels, first, last))
            text += f"<br>attention inside the masks over the guided steps: {shares}; " \
                    f"loss {mag['loss'][0]:.3g}→{mag['loss'][-1]:.3g}"
        return text

    def _on_click(self, button=None) -> None:
        self.run_button.disabled, self.error = True, None
        try:
            self.run()
        except KeyboardInterrupt as stop:  # the kernel's stop button
            self.error = stop
            self.progress.bar_style = "warning"
            self.status.value = (f"interrupted after {self.progress.value} of {self.num_steps} steps; "
                                 "the pipeline's attention processors are restored")
        except Exception as error:  # show it here: a button's exception is otherwise hidden in a log
            self.error = error
            self.progress.bar_style = "danger"
            self.status.value = f"<b>error</b>: {html.escape(type(error).__name__)}: {html.escape(str(error))}"
        finally:
            self.run_button.disabled = False


# ============================================================================ layout builder
@dataclass(frozen=True)
class RegionSpec:
    """One region of a :class:`LayoutBuilder`: which words, which shape, where (fractions of the image)."""

    words: tuple[int, ...] = ()  # positions in the prompt's word list
    kind: str = "rectangle"  # or "ellipse"
    x: float = 0.5  # centre, 0 = left
    y: float = 0.5  # centre, 0 = top
    width: float = 0.4
    height: float = 0.4


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words, lower case, punctuation dropped (as the tokenizer matches them)."""
    return re.findall(r"[a-z0-9]+", prompt.lower())


@contextmanager
def quiet_updates(owner) -> Iterator[None]:
    """Set controls without their observers acting (``owner._loading`` tells them to wait)."""
    owner._loading = True
    try:
        yield
    finally:
        owner._loading = False


def word_options(words: list[str]) -> list[tuple[str, int]]:
    """``(label, position)`` per word for a picker; a repeated word is labelled by occurrence, "red (2)"."""
    counts = {w: words.count(w) for w in words}
    seen: dict[str, int] = {}
    options = []
    for i, word in enumerate(words):
        seen[word] = seen.get(word, 0) + 1
        options.append((word if counts[word] == 1 else f"{word} ({seen[word]})", i))
    return options


def positions_of(words: list[str], phrase: str, occurrence: int = 1) -> tuple[int, ...]:
    """Word positions of the ``occurrence``-th ``phrase`` in ``words`` (the inverse of :func:`phrase_at`)."""
    query = prompt_words(phrase)
    starts = [i for i in range(len(words) - len(query) + 1) if words[i:i + len(query)] == query]
    if not query or len(starts) < occurrence:
        raise ValueError(f"{phrase!r} (occurrence {occurrence}) is not in the prompt's words {words}")
    start = starts[occurrence - 1]
    return tuple(range(start, start + len(query)))


def phrase_at(words: list[str], positions) -> tuple[str, int]:
    """(phrase, occurrence) of consecutive word positions: (3, 4) of "a red circle and a red square" -> ("a red", 2)."""
    positions = sorted(positions)
    if not positions:
        raise ValueError("pick one or more words of the prompt")
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(f"the words {[words[i] for i in positions]} are not consecutive in the prompt")
    query = words[positions[0]:positions[-1] + 1]
    earlier = [i for i in range(positions[0]) if words[i:i + len(query)] == query]
    return " ".join(query), len(earlier) + 1


class LayoutBuilder(W.VBox):
    """Build a :class:`Layout` with buttons and sliders; ``.layout`` is the current one.

    >>> builder = LayoutBuilder("a red circle and a blue square")
    >>> builder.add_region("red circle", kind="ellipse", x=0.3, y=0.5, width=0.4, height=0.5)
    >>> builder  # shows the controls and a live preview
    """

    def __init__(self, prompt: str, size: int | tuple[int, int] = 64, preview_size: int = 256):
        self.prompt, self.words = prompt, prompt_words(prompt)
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
        try:
            layout = self.layout
        except ValueError as error:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(error))}</span>"
            return
        self.preview.value = figure_png(layout.preview())
        areas = ", ".join(f"{layout.label(i)} {r.area:.0%}" for i, r in enumerate(layout.regions))
        self.status.value = f"{len(layout)} region(s): {html.escape(areas)}"
