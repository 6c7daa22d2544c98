"""The explicit sampler: Stable Diffusion's denoising loop, written out for students.

    prompt --tokens--> text embeddings --+
                                         v
    noise --> for each timestep:  controls before the step   (MAG: a gradient step on x_t)
                                  UNet(x_t, t, [uncond | cond])   <- attention hooks inside
                                  classifier-free guidance
                                  scheduler step -> x_{t-1}, predicted x_0
                                  callbacks (progress, previews)
          --> VAE decode --> images

Without controls, ``generate`` gives the same pixels as diffusers'
``StableDiffusionPipeline`` with the same scheduler, seed and settings (tested); likewise for
SDXL, Flux.1 and SD3, whose differences live in ``mag_explore.families``.
``Sampler`` is the same loop one step at a time, for inspecting what happens in between.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from . import families
from .attention import AttentionStore
from .families import Conditioning, encode_prompt
from .models.load import model_defaults
from .text.tokens import prompt_tokens, token_indices
from .validation import (InputError, check_count, check_latents_finite, check_number, check_seed,
                         check_size)


@dataclass
class StepState:
    """What a control sees before a denoising step (and may act on)."""

    pipe: Any
    scheduler: Any
    step_index: int
    timestep: torch.Tensor
    latents: torch.Tensor
    cond: Conditioning  # the prompt's conditioning (SDXL: with pooled embeddings and time ids)
    uncond: Conditioning  # the negative prompt's
    attention_controller: Any  # this step's AttentionController (phase switching for extra passes)
    timesteps: list[int]


class Control:
    """A method plugged into the sampler (swap, MAG, your own idea).

    ``name`` is a short key ("mag", "swap", ...): the result's ``diagnostics`` and
    ``settings`` list each control under it. ``attention_hooks()`` lists hooks to run in
    the cross-attention layers; ``before_step(state)`` may return new latents (MAG's
    gradient step does); ``start(sampler)`` is called once before the first step: it
    resolves settings left as None from ``model_defaults(sampler.pipe)``, checks them
    against the schedule and resets per-run diagnostics. ``settings`` are the values the
    run used (after ``start``).
    """

    name = "control"

    def attention_hooks(self) -> list:
        return []

    def start(self, sampler: "Sampler") -> None:
        pass

    def knob(self) -> str:
        """The setting to turn down if this control makes the latents blow up (for error messages)."""
        return ""

    def before_step(self, state: StepState) -> torch.Tensor:
        return state.latents

    @property
    def settings(self) -> dict:
        return {}

    @property
    def diagnostics(self) -> dict:
        return {}


class Hooks(Control):
    """Plug plain attention hooks into the sampler: ``generate(..., controls=[Hooks(my_hook)])``.

    For hooks that only observe or edit attention (an extra store, your own edit) and
    need no step of their own.
    """

    name = "hooks"

    def __init__(self, *hooks):
        self.hooks = list(hooks)

    def attention_hooks(self) -> list:
        return self.hooks


def control_names(controls: Sequence[Control]) -> list[str]:
    """Each control's ``name``, made unique with a suffix ("mag", "mag_2") when one repeats."""
    names, seen = [], {}
    for control in controls:
        name = getattr(control, "name", None) or type(control).__name__
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


@dataclass
class GenerationResult:
    """Images and everything needed to look inside the run that made them."""

    images: list[Image.Image]
    pixels: np.ndarray  # float32 (batch, H, W, 3) in [0, 1], before rounding to 8 bits
    latents: torch.Tensor
    timesteps: list[int]
    prompt: str
    settings: dict
    store: AttentionStore | None = None
    step_latents: list[torch.Tensor] = field(default_factory=list)
    step_x0: list[torch.Tensor] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)
    tokenizer: Any = field(default=None, repr=False)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def tokens(self) -> list[str]:
        """The prompt's tokens (index 0 = BOS), to name the attention maps."""
        return prompt_tokens(self.tokenizer, self.prompt)

    def token_indices(self, phrase: str, occurrence: int = 1) -> list[int]:
        """Token indices of a word or phrase of the prompt (sub-word pieces included)."""
        return token_indices(self.tokenizer, self.prompt, phrase, occurrence)


def encode_text(pipe, texts: list[str]) -> torch.Tensor:
    """Text embeddings (batch, tokens, features): what cross-attention attends to, for each
    text (``families.encode_prompt`` also gives SDXL's pooled embeddings and time ids)."""
    return torch.cat([encode_prompt(pipe, text, guidance_scale=0.0).embeddings for text in texts])


def decode_latents(pipe, latents: torch.Tensor, size: tuple[int, int] | None = None
                   ) -> tuple[np.ndarray, list[Image.Image]]:
    """VAE decode -> float pixels in [0, 1] and 8-bit PIL images (as diffusers rounds them); ``size``: the size
    asked for, when the model sampled at its resolution bin (PixArt-Σ, Sana: the family resizes back)."""
    decoded = families.family_of(pipe).decode(pipe, latents)  # the family's VAE decode (Qwen-Image, Flux.2: own)
    if size is not None:
        decoded = families.family_of(pipe).finish_decoded(pipe, decoded, size)
    pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return pixels, [Image.fromarray((p * 255).round().astype("uint8")) for p in pixels]


class Sampler:
    """The denoising loop as an object you can advance one step at a time.

    >>> s = Sampler(pipe, "a red circle", seed=0)
    >>> s.step(); s.x0_image()          # what the model expects the final image to be
    >>> result = s.run()                # the remaining steps
    """

    def __init__(
        self,
        pipe,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        max_sequence_length: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        scheduler=None,
        controls: Sequence[Control] = (),
        store: AttentionStore | None = None,
        callbacks: Sequence[Callable[["Sampler"], None]] = (),
        keep_latents: bool = False,
        keep_x0: bool = False,
        num_images: int = 1,
        latents: torch.Tensor | None = None,
    ):
        self.pipe, self.prompt = pipe, prompt
        # 0. settings left out come from the model's defaults; every value is checked here, once
        num_inference_steps = self._resolve_settings(model_defaults(pipe), negative_prompt, num_inference_steps,
                                                     guidance_scale, true_cfg_scale, max_sequence_length,
                                                     height, width, eta, num_images)
        self.controls, self.store, self.callbacks = list(controls), store, list(callbacks)
        self.keep_latents, self.keep_x0 = keep_latents, keep_x0
        self.device = families.denoiser(pipe).device
        self.seed = check_seed(seed)
        if generator is None and self.seed is not None:
            generator = torch.Generator("cpu").manual_seed(self.seed)
        self.generator = generator
        self._encode_prompts()  # 1. the prompt -> the conditioning of both halves of CFG
        # 2. a fresh scheduler (never the pipeline's own object, so the pipeline is left as it was):
        #    DDIM for a UNet, the pipeline's own flow-matching scheduler (shift, mu) for Flux / SD3
        shape = families.latent_shape(pipe, self.num_images, self.height, self.width)
        self.scheduler = families.make_scheduler(pipe, num_inference_steps, shape[-2:], self.device, scheduler)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.latents, self.x0 = self._initial_latents(latents, shape), None  # 3. x_T
        self.step_index = 0
        self.step_latents: list[torch.Tensor] = []
        self.step_x0: list[torch.Tensor] = []
        self._run_attention = None  # the installation run() holds over all its steps
        for control in self.controls:
            control.start(self)

    def _resolve_settings(self, defaults: dict, negative_prompt, num_inference_steps, guidance_scale, true_cfg_scale,
                          max_sequence_length, height, width, eta, num_images) -> int:
        """Set the run's checked settings (the model's where None); returns the step count."""
        pipe = self.pipe
        self.negative_prompt = defaults["negative_prompt"] if negative_prompt is None else negative_prompt
        # a null negative prompt in the model's defaults means "none": "" on SD, zeros on SDXL (as diffusers)
        for name, text in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt)):
            if not isinstance(text, str) and not (name == "negative_prompt" and text is None):
                raise InputError(f"{name}={text!r}: give a string")
        self.guidance_scale = check_number(
            "guidance_scale", defaults["guidance_scale"] if guidance_scale is None else guidance_scale, minimum=0)
        num_inference_steps = check_count(
            "num_inference_steps", defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
            maximum=pipe.scheduler.config.num_train_timesteps)
        # Flux, SD3: CFG with a second pass on the negative prompt (Flux), T5's length
        self.true_cfg_scale, self.max_sequence_length = families.check_options(
            pipe, defaults, true_cfg_scale, max_sequence_length)
        height, width = check_size(defaults["height"] if height is None else height,
                                   defaults["width"] if width is None else width, families.size_multiple(pipe))
        self.output_size = (height, width)  # PixArt-Σ, Sana: sampled at the nearest resolution bin, resized back
        self.height, self.width = families.family_of(pipe).generation_size(pipe, height, width)
        self.eta = check_number("eta", eta, minimum=0)
        self.num_images = check_count("num_images", num_images)
        return num_inference_steps

    def _encode_prompts(self) -> None:
        """The conditioning of both halves of classifier-free guidance (Flux without a negative
        prompt: uncond is None, one pass per step)."""
        pipe, size = self.pipe, (self.height, self.width)
        families.check_prompt(pipe, self.prompt)  # SDXL, SD3: both CLIP tokenizers must agree on word positions
        text = dict(max_sequence_length=self.max_sequence_length, guidance_scale=self.guidance_scale)
        self.cond = encode_prompt(pipe, self.prompt, self.num_images, size, **text)
        self.uncond = families.encode_negative_prompt(pipe, self.negative_prompt, self.num_images, size, **text)
        self.cond_embeddings = self.cond.embeddings
        self.uncond_embeddings = None if self.uncond is None else self.uncond.embeddings
        self.num_prompt_tokens = families.num_prompt_tokens(pipe, self.prompt, self.max_sequence_length)

    def _initial_latents(self, latents: torch.Tensor | None, shape: tuple) -> torch.Tensor:
        """x_T: fresh noise scaled as the scheduler expects, or the given latents (checked).

        x_t stays float32 across steps whatever the UNet's dtype, as in the official MAG code:
        in fp16, a guidance update below ~5e-4 on a latent near 1 would round away.
        """
        if latents is None:
            latents = randn_tensor(shape, generator=self.generator, device=self.device,
                                   dtype=families.denoiser(self.pipe).dtype)
            latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow matching: x_1 is the noise
        elif tuple(latents.shape) != shape or not torch.isfinite(latents).all():
            raise InputError(f"latents of shape {tuple(latents.shape)}: give finite latents of shape {shape} "
                             f"for {self.num_images} image(s) of {self.height}x{self.width}")
        return latents.to(self.device, torch.float32)

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def hooks(self) -> list:
        hooks = [self.store] if self.store is not None else []
        return hooks + [hook for control in self.controls for hook in control.attention_hooks()]

    def step(self) -> None:
        """One denoising step: controls, UNet on [uncond, cond], CFG, scheduler step, callbacks."""
        if self.done:
            raise RuntimeError(f"all {len(self.timesteps)} steps are done; call result()")
        i, t = self.step_index, self.scheduler.timesteps[self.step_index]
        with self._attention_installed() as attention:
            if attention is not None:
                attention.set_step(i, t)
                attention.num_prompt_tokens = self.num_prompt_tokens
            state = StepState(self.pipe, self.scheduler, i, t, self.latents, self.cond, self.uncond,
                              attention, self.timesteps)
            for control in self.controls:  # e.g. MAG moves x_t before the ordinary step
                state.latents = control.before_step(state)
            noise = self.predict_noise(state.latents, t, attention)
            output = self.scheduler.step(noise, t, state.latents, **self._step_kwargs(), return_dict=True)
        self.latents = output.prev_sample.float()
        check_latents_finite(self.latents, i, int(t), self._knobs())  # a NaN never becomes an image
        self.x0 = getattr(output, "pred_original_sample", None)
        if self.keep_latents:
            self.step_latents.append(self.latents.detach().cpu())
        if self.keep_x0 and self.x0 is not None:
            self.step_x0.append(self.x0.detach().cpu())
        self.step_index += 1
        for callback in self.callbacks:
            callback(self)

    def _attention_installed(self):
        """The hooks' installation for one step: ``run()``'s own if it holds one, else a fresh one.

        Installing walks every attention module of the UNet twice (set and restore), which
        costs as much as a third of a small model's step; ``run()`` therefore installs once
        for all its steps, and a lone ``step()`` installs for itself (and always restores).
        """
        if self._run_attention is not None:
            return nullcontext(self._run_attention)
        hooks = self.hooks
        return families.install_attention_hooks(self.pipe, hooks) if hooks else nullcontext()

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, attention=None) -> torch.Tensor:
        """The guided prediction (fp32): UNet on [uncond, cond] + CFG; Flux / SD3: see families.mmdit.predict."""
        return families.predict(self.pipe, self.scheduler, latents, t, self.cond, self.uncond, self.guidance_scale,
                                self.true_cfg_scale, attention)

    def _knobs(self) -> str:
        knobs = [c.knob() for c in self.controls if c.knob()]
        return " or ".join([f"guidance_scale={self.guidance_scale:g}", *knobs])

    def _step_kwargs(self) -> dict:
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": self.eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = self.generator
        return kwargs

    def run(self, progress: bool = True) -> GenerationResult:
        """Do the remaining steps (with a progress bar) and decode."""
        hooks = self.hooks
        with families.install_attention_hooks(self.pipe, hooks) if hooks else nullcontext() as attention:
            self._run_attention = attention
            try:
                for _ in tqdm(range(self.step_index, len(self.timesteps)), desc="denoising", disable=not progress):
                    self.step()
            finally:
                self._run_attention = None
        return self.result()

    def x0_image(self) -> Image.Image:
        """The current prediction of the final image, decoded (cheap with small models)."""
        if self.x0 is None:
            raise RuntimeError("no step done yet: call step() first")
        return decode_latents(self.pipe, self.x0)[1][0]

    def result(self) -> GenerationResult:
        pixels, images = decode_latents(self.pipe, self.latents, self.output_size)
        settings = dict(
            negative_prompt=self.negative_prompt, num_inference_steps=len(self.timesteps),
            guidance_scale=self.guidance_scale, seed=self.seed, height=self.output_size[0], width=self.output_size[1],
            eta=self.eta, scheduler=type(self.scheduler).__name__,
        )
        if self.output_size != (self.height, self.width):  # sampled at a resolution bin, resized back
            settings["generation_size"] = (self.height, self.width)
        settings.update(families.family_of(self.pipe).run_settings(self))  # T5 length, Flux's true CFG, ...
        # each control's resolved settings and diagnostics, under its short name ("mag", ...)
        for name, control in zip(control_names(self.controls), self.controls):
            if control.settings:
                settings[name] = dict(control.settings)
        diagnostics = {name: c.diagnostics for name, c in zip(control_names(self.controls), self.controls)
                       if c.diagnostics}
        return GenerationResult(
            images=images, pixels=pixels, latents=self.latents.detach().cpu(), timesteps=self.timesteps,
            prompt=self.prompt, settings=settings, store=self.store,
            step_latents=self.step_latents, step_x0=self.step_x0, diagnostics=diagnostics,
            tokenizer=families.span_tokenizer(self.pipe, self.max_sequence_length),
        )


def generate(pipe, prompt: str, *, negative_prompt: str | None = None, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, true_cfg_scale: float | None = None,
             max_sequence_length: int | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, height: int | None = None, width: int | None = None,
             eta: float = 0.0, scheduler=None, controls: Sequence[Control] = (), store: AttentionStore | None = None,
             callbacks: Sequence[Callable[["Sampler"], None]] = (), keep_latents: bool = False, keep_x0: bool = False,
             num_images: int = 1, latents: torch.Tensor | None = None, progress: bool = True) -> GenerationResult:
    """Sample an image for ``prompt``: ``Sampler(pipe, prompt, **options).run(progress)``.

    Settings left as None come from ``model_defaults(pipe)`` (size, steps, CFG scale, negative
    prompt); each control resolves its own (MAG's α, λ, threshold) the same way.
    ``controls`` plug methods into the loop, ``store`` records attention, ``callbacks`` run
    after every step, ``keep_latents``/``keep_x0`` keep each step's x_t / predicted x_0,
    ``latents`` replaces the initial noise (e.g. an inverted x_T). The options are written
    out (not ``**options``) so that ``help(generate)`` and Shift-Tab list them.
    """
    return Sampler(pipe, prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
                   max_sequence_length=max_sequence_length, seed=seed, generator=generator, height=height,
                   width=width, eta=eta, scheduler=scheduler, controls=controls, store=store, callbacks=callbacks,
                   keep_latents=keep_latents, keep_x0=keep_x0, num_images=num_images,
                   latents=latents).run(progress=progress)
