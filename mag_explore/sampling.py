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
``StableDiffusionPipeline`` with the same scheduler, seed and settings (tested).
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

from .attention import AttentionStore, cross_attention_hooks
from .models import model_defaults
from .schedule import ddim_scheduler
from .tokens import prompt_tokens, token_indices


@dataclass
class StepState:
    """What a control sees before a denoising step (and may act on)."""

    pipe: Any
    scheduler: Any
    step_index: int
    timestep: torch.Tensor
    latents: torch.Tensor
    cond_embeddings: torch.Tensor
    uncond_embeddings: torch.Tensor
    attention: Any  # the AttentionController of this step (phase switching for extra passes)
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
    """Text embeddings (batch, tokens, features): the texts tokenized, padded to the
    tokenizer's length and run through the text encoder."""
    tokens = pipe.tokenizer(
        texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = pipe.text_encoder.device
    mask = tokens.attention_mask.to(device) if getattr(pipe.text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        embeddings = pipe.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return embeddings.to(dtype=pipe.unet.dtype)


def decode_latents(pipe, latents: torch.Tensor) -> tuple[np.ndarray, list[Image.Image]]:
    """VAE decode -> float pixels in [0, 1] and 8-bit PIL images (as diffusers rounds them)."""
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    with torch.no_grad():
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
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
        defaults = model_defaults(pipe)
        self.pipe, self.prompt = pipe, prompt
        self.negative_prompt = defaults["negative_prompt"] if negative_prompt is None else negative_prompt
        self.guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        num_inference_steps = num_inference_steps or defaults["num_inference_steps"]
        height, width = height or defaults["height"], width or defaults["width"]
        factor = pipe.vae_scale_factor
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor} (the VAE factor), got {height}×{width}")
        self.height, self.width, self.eta, self.num_images = height, width, eta, num_images
        self.controls, self.store, self.callbacks = list(controls), store, list(callbacks)
        self.keep_latents, self.keep_x0 = keep_latents, keep_x0
        self.device = pipe.unet.device
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        self.generator, self.seed = generator, seed

        # 1. the prompt -> embeddings for both halves of classifier-free guidance
        self.cond_embeddings = encode_text(pipe, [prompt] * num_images)
        self.uncond_embeddings = encode_text(pipe, [self.negative_prompt] * num_images)
        self.num_prompt_tokens = len(pipe.tokenizer(prompt, truncation=True).input_ids)
        # 2. a fresh scheduler (never the pipeline's own object, so the pipeline is left as it was)
        if scheduler is None:
            scheduler = ddim_scheduler(pipe, num_inference_steps, device=self.device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=self.device)
        self.scheduler = scheduler
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        # 3. the initial noise x_T, scaled as the scheduler expects
        shape = (num_images, pipe.unet.config.in_channels, height // factor, width // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=pipe.unet.dtype)
            latents = latents * self.scheduler.init_noise_sigma
        self.latents, self.x0 = latents.to(self.device, pipe.unet.dtype), None
        self.step_index = 0
        self.step_latents: list[torch.Tensor] = []
        self.step_x0: list[torch.Tensor] = []
        for control in self.controls:
            control.start(self)

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
        hooks = self.hooks
        with cross_attention_hooks(self.pipe.unet, hooks) if hooks else nullcontext() as attention:
            if attention is not None:
                attention.set_step(i, t)
                attention.num_prompt_tokens = self.num_prompt_tokens
            state = StepState(self.pipe, self.scheduler, i, t, self.latents, self.cond_embeddings,
                              self.uncond_embeddings, attention, self.timesteps)
            for control in self.controls:  # e.g. MAG moves x_t before the ordinary step
                state.latents = control.before_step(state)
            noise = self.predict_noise(state.latents, t)
            output = self.scheduler.step(noise, t, state.latents, **self._step_kwargs(), return_dict=True)
        self.latents = output.prev_sample
        self.x0 = getattr(output, "pred_original_sample", None)
        if self.keep_latents:
            self.step_latents.append(self.latents.detach().cpu())
        if self.keep_x0 and self.x0 is not None:
            self.step_x0.append(self.x0.detach().cpu())
        self.step_index += 1
        for callback in self.callbacks:
            callback(self)

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """UNet on the batch [uncond, cond], then classifier-free guidance."""
        model_input = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        embeddings = torch.cat([self.uncond_embeddings, self.cond_embeddings])
        with torch.no_grad():
            noise = self.pipe.unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
        noise_uncond, noise_cond = noise.chunk(2)
        return noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)

    def _step_kwargs(self) -> dict:
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": self.eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = self.generator
        return kwargs

    def run(self, progress: bool = True) -> GenerationResult:
        """Do the remaining steps (with a progress bar) and decode."""
        for _ in tqdm(range(self.step_index, len(self.timesteps)), desc="denoising", disable=not progress):
            self.step()
        return self.result()

    def x0_image(self) -> Image.Image:
        """The current prediction of the final image, decoded (cheap with small models)."""
        if self.x0 is None:
            raise RuntimeError("no step done yet: call step() first")
        return decode_latents(self.pipe, self.x0)[1][0]

    def result(self) -> GenerationResult:
        pixels, images = decode_latents(self.pipe, self.latents)
        settings = dict(
            negative_prompt=self.negative_prompt, num_inference_steps=len(self.timesteps),
            guidance_scale=self.guidance_scale, seed=self.seed, height=self.height, width=self.width,
            eta=self.eta, scheduler=type(self.scheduler).__name__,
        )
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
            tokenizer=self.pipe.tokenizer,
        )


def generate(pipe, prompt: str, *, progress: bool = True, **options) -> GenerationResult:
    """Sample an image for ``prompt``: ``Sampler(pipe, prompt, **options).run(progress)``.

    The options are ``Sampler``'s (``help(generate)`` and Shift-Tab list them): settings
    left as None come from ``model_defaults(pipe)`` (size, steps, CFG scale, negative
    prompt); each control resolves its own (MAG's α, λ, threshold) the same way.
    ``controls`` plug methods into the loop, ``store`` records attention, ``callbacks`` run
    after every step, ``keep_latents``/``keep_x0`` keep each step's x_t / predicted x_0,
    ``latents`` replaces the initial noise (e.g. an inverted x_T).
    """
    return Sampler(pipe, prompt, **options).run(progress=progress)


def _signature_of_generate() -> inspect.Signature:
    """``generate(pipe, prompt, *, <every Sampler option>, progress=True)``: one list of options, shown twice."""
    sampler = list(inspect.signature(Sampler.__init__).parameters.values())[1:]  # without self
    progress = inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool")
    return inspect.signature(generate).replace(parameters=[*sampler, progress])


generate.__signature__ = _signature_of_generate()
