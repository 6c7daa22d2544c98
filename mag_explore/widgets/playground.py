"""MagPlayground: MAG's and swapping's knobs as sliders; the model runs only on the Run button."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ipywidgets as W

from ..attention import AttentionStore, cross_attention_layer_names
from ..layouts import Layout
from ..methods import MaskedAttentionGuidance, MaskedAttentionSwap
from ..models import model_defaults, shapes_model_dir
from ..plots import figure_png, plot_layout, plot_run_summary, png_bytes
from ..sampling import GenerationResult, Sampler
from ..schedule import StepRange, ddim_scheduler


def cross_attention_layer_sizes(pipe) -> list[int]:
    """The larger side of each cross-attention resolution of ``pipe``'s UNet at its default size, finest first."""
    defaults, unet = model_defaults(pipe), pipe.unet
    side = max(defaults["height"], defaults["width"]) // pipe.vae_scale_factor
    levels = len(unet.config.block_out_channels)
    found = set()
    for layer in cross_attention_layer_names(unet):
        part, index = layer.split(".")[:2]
        if part == "down_blocks":
            level = int(index)
        elif part == "up_blocks":
            level = levels - 1 - int(index)
        else:  # the mid block sits at the deepest level
            level = levels - 1
        found.add(-(-side // 2 ** level))  # each level halves the side (rounding up, as a stride-2 conv)
    return sorted(found, reverse=True)


def is_shapes_model(pipe) -> bool:
    """Whether ``pipe`` is the embedded shapes model (whose images can be segmented by color)."""
    name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    return bool(name) and Path(name).is_dir() and Path(name).resolve() == shapes_model_dir().resolve()


class MagPlayground(W.VBox):
    """MAG (and masked-attention swapping) with sliders; runs only when Run is pressed.

    ``layout`` is a :class:`~mag_explore.layouts.Layout` or anything with a ``.layout``
    (a :class:`LayoutBuilder` or a :class:`LayoutPainter`: its current layout is read at each
    run; a painter gets the new image under its paint). The sliders ``mag_step_range`` and
    ``swap_step_range`` are step indices ``[start, stop)``; an empty range (start = stop)
    switches that method off; ``layer_sizes`` and ``places`` choose MAG's layers.
    After a run: ``result`` (with its attention store), ``runs``, the summary ``image``,
    ``last_controls``, and ``history``: the last ``remember`` runs (settings, image, and the
    regions' IoU where the shapes world can segment them), shown side by side.
    """

    def __init__(self, pipe, layout: Any, prompt: str | None = None, num_inference_steps: int | None = None,
                 seed: int = 0, remember: int = 4, score_iou: bool | None = None):
        defaults = model_defaults(pipe)
        self.pipe, self._layout_source = pipe, layout
        self._prompt = prompt
        self.height, self.width = defaults["height"], defaults["width"]
        self.num_inference_steps = int(num_inference_steps or defaults["num_inference_steps"])
        self.timesteps = [int(t) for t in ddim_scheduler(pipe, self.num_inference_steps).timesteps]
        guided = StepRange(while_t_above=int(defaults["while_t_above"])).selected(self.timesteps)
        guide_default = (0, guided[-1] + 1) if guided else (0, max(1, self.num_inference_steps // 3))
        n = self.num_inference_steps
        style = {"description_width": "120px"}
        wide = W.Layout(width="460px")
        self.alpha = W.FloatSlider(value=defaults["mag_alpha"], min=0.0, max=max(1.0, 4 * defaults["mag_alpha"]),
                                   step=0.01, description="α step size", style=style, layout=wide)
        self.lmbda = W.FloatSlider(value=defaults["mag_lmbda"], min=0.0, max=2.0, step=0.05,
                                   description="λ outside weight", style=style, layout=wide)
        self.mag_step_range = W.IntRangeSlider(value=guide_default, min=0, max=n, description="MAG steps [a, b)",
                                            style=style, layout=wide)
        self.swap_step_range = W.IntRangeSlider(value=(0, 0), min=0, max=n, description="swap steps [a, b)",
                                           style=style, layout=wide)
        self.cfg = W.FloatSlider(value=defaults["guidance_scale"], min=1.0, max=15.0, step=0.5,
                                 description="CFG scale", style=style, layout=wide)
        self.seed = W.IntSlider(value=seed, min=0, max=1000, description="seed", style=style, layout=wide)
        self.layer_sizes = W.SelectMultiple(options=[(f"side {r}", r) for r in cross_attention_layer_sizes(pipe)],
                                            description="MAG layers at", style=style, rows=3)
        self.layer_sizes.value = tuple(v for _, v in self.layer_sizes.options)  # all, as the official code
        self.places = W.SelectMultiple(options=["down", "mid", "up"], value=("down", "mid", "up"),
                                       description="MAG in UNet half", style=style, rows=3)
        self.remember = int(remember)
        self.score_iou = is_shapes_model(pipe) if score_iou is None else score_iou
        self.history: list[dict] = []
        self.memory = W.HBox()
        self.last_controls: list = []
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.progress = W.IntProgress(value=0, min=0, max=n, description="steps")
        self.status = W.HTML()
        self.image = W.Image(format="png")
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.runs = 0
        self.run_button.on_click(self._on_click)
        for control in (self.alpha, self.lmbda, self.mag_step_range, self.swap_step_range, self.cfg, self.seed,
                        self.layer_sizes, self.places):
            control.observe(self._on_setting, names="value")
        for name, control in (("alpha", self.alpha), ("lambda", self.lmbda), ("guide", self.mag_step_range),
                              ("swap", self.swap_step_range), ("cfg", self.cfg), ("seed", self.seed),
                              ("run", self.run_button), ("progress", self.progress), ("image", self.image),
                              ("layer_sizes", self.layer_sizes), ("places", self.places), ("memory", self.memory)):
            control.add_class(f"mag-playground-{name}")
        sliders = W.VBox([self.alpha, self.lmbda, self.mag_step_range, self.swap_step_range, self.cfg, self.seed])
        layers = W.VBox([self.layer_sizes, self.places])
        super().__init__([W.HBox([sliders, layers]), W.HBox([self.run_button, self.progress]), self.status,
                          self.image, W.HTML("<b>last runs</b> (newest first)"), self.memory])
        self.add_class("mag-playground")
        self._on_setting()
        try:
            self.image.value = figure_png(plot_layout(self.layout))  # the layout, until the first run
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
        return None if start >= stop or start >= self.num_inference_steps else StepRange(start=start, stop=stop)

    def controls(self) -> list:
        """The sampler controls the current settings stand for (swap first, then MAG)."""
        layout, made = self.layout, []
        swap, guide = self._range(self.swap_step_range), self._range(self.mag_step_range)
        if swap is not None:
            made.append(MaskedAttentionSwap(layout, step_range=swap))
        if guide is not None:
            made.append(MaskedAttentionGuidance(layout, alpha=self.alpha.value, lmbda=self.lmbda.value,
                                                step_range=guide, **self._layer_choice()))
        return made

    def _layer_choice(self) -> dict:
        """MAG's ``layer_sizes`` / ``places``: left out where everything is selected (the official setting)."""
        chosen = {}
        if set(self.layer_sizes.value) != {v for _, v in self.layer_sizes.options}:
            chosen["layer_sizes"] = set(self.layer_sizes.value)
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
        self.status.value = (f"{self._describe_range(self.mag_step_range, 'MAG')}; "
                             f"{self._describe_range(self.swap_step_range, 'swap')}{pending}")

    def _on_step(self, sampler: Sampler) -> None:
        self.progress.value = sampler.step_index

    def run(self) -> GenerationResult:
        """Generate with the current settings (what the Run button does, errors included)."""
        self.progress.value, self.progress.bar_style = 0, ""
        controls = self.controls()
        self.last_controls = controls  # the method objects of the latest run, with their history
        sampler = Sampler(self.pipe, self.prompt, num_inference_steps=self.num_inference_steps,
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
        return {"alpha": self.alpha.value, "lambda": self.lmbda.value, "mag_step_range": tuple(self.mag_step_range.value),
                "swap_step_range": tuple(self.swap_step_range.value), "cfg": self.cfg.value, "seed": self.seed.value,
                **{k: sorted(v) for k, v in self._layer_choice().items()}}

    def _remember(self, result: GenerationResult) -> None:
        from ..course.helpers import region_iou  # the shapes world's color segmentation (an app-level helper)

        iou = region_iou(result.images[0], self.layout) if self.score_iou else None
        self.history.insert(0, {"run": self.runs, "settings": self.settings(), "image": result.images[0], "iou": iou})
        del self.history[self.remember:]
        self.memory.children = [self._memory_card(entry) for entry in self.history]

    def _memory_card(self, entry: dict) -> W.VBox:
        s = entry["settings"]
        lines = [f"run {entry['run']} · seed {s['seed']} · CFG {s['cfg']}",
                 f"MAG {s['mag_step_range'][0]}–{s['mag_step_range'][1]} α {s['alpha']} λ {s['lambda']}",
                 f"swap {s['swap_step_range'][0]}–{s['swap_step_range'][1]}"]
        if "layer_sizes" in s or "places" in s:
            lines.append(f"layers {s.get('layer_sizes', 'all')} {s.get('places', '')}")
        if entry["iou"] is not None:
            lines.append("IoU " + ", ".join(f"{label} {v:.2f}" for label, v in entry["iou"].items()))
        image = W.Image(value=png_bytes(entry["image"]), format="png", width=128, height=128)
        return W.VBox([image, W.HTML("<br>".join(html.escape(line) for line in lines))],
                      layout=W.Layout(width="190px"))

    def _title(self) -> str:
        return (f'"{self.prompt}" · seed {self.seed.value} · CFG {self.cfg.value} · '
                f"{self._describe_range(self.mag_step_range, 'MAG')} (α={self.alpha.value}, λ={self.lmbda.value}) · "
                f"{self._describe_range(self.swap_step_range, 'swap')}")

    def _summary(self, result: GenerationResult) -> str:
        text = f"run {self.runs} done: {html.escape(self._title())}"
        mag = result.diagnostics.get("mag")
        if mag:
            labels = self.layout.labels
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
            self.status.value = (f"interrupted after {self.progress.value} of {self.num_inference_steps} steps; "
                                 "the pipeline's attention processors are restored")
        except Exception as error:  # show it here: a button's exception is otherwise hidden in a log
            self.error = error
            self.progress.bar_style = "danger"
            self.status.value = f"<b>error</b>: {html.escape(type(error).__name__)}: {html.escape(str(error))}"
        finally:
            self.run_button.disabled = False
