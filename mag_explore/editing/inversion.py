"""DDIM inversion: find the noise x_T from which the sampler redraws a given image.

Sampling with DDIM (eta 0) is deterministic. One step from timestep t down to the
previous level reads

    x0  = (x_t - sqrt(1 - a_t) · eps) / sqrt(a_t)          eps = UNet(x_t, t, prompt)
    x_p = sqrt(a_p) · x0 + sqrt(1 - a_p) · eps               a = alphas_cumprod

Inversion runs the same two lines the other way, from the image up to the noise:

    image --VAE encode--> x_0 --for t = 1, 21, …, 981 (the sampler's timesteps, reversed):--> x_T
                                   eps = UNet(x_p, t, prompt)      <- x_t is not known yet
                                   x0  = (x_p - sqrt(1 - a_p) · eps) / sqrt(a_p)
                                   x_t = sqrt(a_t) · x0 + sqrt(1 - a_t) · eps

The only approximation is ``UNet(x_p, t) ≈ UNet(x_t, t)``: the noise is predicted at the
latent one step *before* the one it is for. The error shrinks with the step size, which is
why more steps reconstruct better (tested), and ``fixed_point_iterations`` removes it by
predicting again at the x_t just found (as in AIDI, Pan et al. 2023, and ReNoise, 2024).

Classifier-free guidance is 1 by default (the conditional prediction alone), as in the
null-text-inversion practice (Mokady et al. 2023): guidance multiplies every small error
of the approximation by the scale (the README's editing section gives the measured cost).
Sample back with the same scale (``reconstruct`` does).

Why not diffusers' ``DDIMInverseScheduler``? It does the same arithmetic, but builds its
own timesteps and refuses the "linspace" spacing that some configs use. Here the inverse
step is written against the very scheduler object the sampler uses, so the inverted
timesteps are exactly the sampler's, for any spacing; a test checks that both agree where
diffusers' scheduler applies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm.auto import tqdm

from ..families import Conditioning, check_token_positions, require_unet, denoise, encode_prompt, scale_latents, vae_in_working_dtype
from ..models.load import model_defaults
from ..sampling import Control, GenerationResult, generate
from ..validation import check_count, check_number

_PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass
class InversionResult:
    """The inverted noise and the way up to it.

    ``latents`` is x_T, ready for ``Sampler(..., latents=inversion.latents)``;
    ``step_latents`` are x_0 (the encoded image), then the latent after each inversion
    step, so ``step_latents[-1] is latents``. ``timesteps`` are in the sampler's order
    (981 … 1), the order in which sampling will visit them.
    """

    latents: torch.Tensor
    step_latents: list[torch.Tensor]
    image_latents: torch.Tensor
    timesteps: list[int]
    prompt: str
    image: Image.Image
    settings: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def width(self) -> int:
        return self.image.width


# ----------------------------------------------------------------------------- images
def as_pil_image(image: Any) -> Image.Image:
    """A path, a PIL image, or an (H, W, 3) array (uint8 0..255, or float 0..1) -> RGB PIL image."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:  # keeps Pillow's decompression-bomb check
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image array must be (height, width, 3), got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"float image values must lie in [0, 1], got {array.min():.3g}..{array.max():.3g}; "
                "pass uint8 for 0..255"
            )
        array = (array * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _as_float_pixels(image: Any) -> np.ndarray:
    return np.asarray(as_pil_image(image), dtype=np.float64) / 255.0


def psnr(reference: Any, test: Any) -> float:
    """Peak signal-to-noise ratio in dB between two RGB images (peak 1 on the [0, 1] scale).

    Each image may be a path, a PIL image or an (H, W, 3) array (uint8 or float in [0, 1]).
    ``inf`` for identical images. What the VAE alone gives (encode, decode) is the ceiling
    for any latent; the README lists measured reconstructions.
    """
    a, b = _as_float_pixels(reference), _as_float_pixels(test)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]} (width x height)")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def encode_image(pipe, image: Any) -> torch.Tensor:
    """VAE encode -> latents (1, 4, H/f, W/f) scaled as the UNet expects: the inverse of
    ``decode_latents``. The posterior mean is used, so encoding is deterministic."""
    image = as_pil_image(image)
    factor = pipe.vae_scale_factor
    if image.height % factor or image.width % factor:
        raise ValueError(
            f"image size {image.width}x{image.height} (width x height) is not a multiple of {factor}, "
            f"the VAE factor of this model; resize or crop it first, e.g. image.resize((64, 64))"
        )
    vae = pipe.vae
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad(), vae_in_working_dtype(pipe) as dtype:  # SDXL's fp16 VAE encodes in fp32
        latents = vae.encode(pixels.to(vae.device, dtype)).latent_dist.mean
    return scale_latents(vae, latents).to(pipe.unet.dtype)


# ----------------------------------------------------------------------------- the inverse step
def _alpha_before(scheduler, timestep: int) -> torch.Tensor:
    """a_p: the noise level one sampling step below ``timestep``, by the rule of
    ``DDIMScheduler.step`` (the final level when that falls below 0)."""
    previous = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod


def inversion_step(scheduler, model_output: torch.Tensor, timestep: int, sample: torch.Tensor):
    """One step up: ``sample`` at the level just below ``timestep`` -> the latent at ``timestep``.

    With noise prediction this is the exact inverse of ``scheduler.step(model_output,
    timestep, x_t)`` (eta 0) for the same ``model_output``; v- and x0-predictions are
    first turned into noise at the latent at hand, as diffusers' ``DDIMInverseScheduler``
    does. Returns (x_t, predicted x_0).
    """
    prediction = scheduler.config.prediction_type
    if prediction not in _PREDICTIONS:
        raise ValueError(f"prediction_type {prediction!r} is not supported; use one of {_PREDICTIONS}")
    a_p, a_t = _alpha_before(scheduler, int(timestep)), scheduler.alphas_cumprod[int(timestep)]
    a_p, a_t = a_p.to(sample.device, sample.dtype), a_t.to(sample.device, sample.dtype)
    if prediction == "epsilon":
        eps = model_output
        x0 = (sample - (1 - a_p).sqrt() * eps) / a_p.sqrt()
    elif prediction == "v_prediction":
        x0 = a_p.sqrt() * sample - (1 - a_p).sqrt() * model_output
        eps = a_p.sqrt() * model_output + (1 - a_p).sqrt() * sample
    else:
        x0 = model_output
        eps = (sample - a_p.sqrt() * x0) / (1 - a_p).sqrt()
    if scheduler.config.clip_sample:  # as the sampler does, so that the steps stay each other's inverse
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps, x0


# ----------------------------------------------------------------------------- inversion
def invert(
    pipe,
    image: Any,
    prompt: str,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float = 1.0,
    negative_prompt: str | None = None,
    fixed_point_iterations: int = 0,
    progress: bool = True,
) -> InversionResult:
    """DDIM-invert ``image`` (path, PIL image or array) under ``prompt``.

    Uses a fresh ``DDIMScheduler`` built from the pipeline's config, set to the same
    timesteps that ``generate(..., num_inference_steps=...)`` will use; the pipeline
    itself is not changed. ``guidance_scale`` 1 (the default) runs the conditional
    prediction only; other scales also run the unconditional half, as sampling does.
    ``fixed_point_iterations`` k > 0 removes the one approximation: each step's noise is
    predicted again at the x_t it just gave, k times, converging to the x_t that the
    sampler's step takes back to x_p exactly (for noise prediction), at k more UNet calls
    per step (measured gains: the README; floors: ``tests/test_inversion.py``).
    """
    require_unet(pipe, "DDIM inversion")  # flow matching inverts differently (not implemented)
    if fixed_point_iterations < 0:
        raise ValueError(f"fixed_point_iterations={fixed_point_iterations}; use 0 (plain DDIM inversion) or more")
    defaults = model_defaults(pipe)
    steps = check_count("num_inference_steps",
                        defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
                        maximum=pipe.scheduler.config.num_train_timesteps)
    guidance_scale = check_number("guidance_scale", guidance_scale, minimum=0)
    negative_prompt = defaults["negative_prompt"] if negative_prompt is None else negative_prompt
    image = as_pil_image(image)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=pipe.unet.device)
    timesteps = [int(t) for t in scheduler.timesteps]

    check_token_positions(pipe, prompt)
    size = (image.height, image.width)
    cond = encode_prompt(pipe, prompt, 1, size)
    uncond = encode_prompt(pipe, negative_prompt, 1, size) if guidance_scale != 1 else None
    latents = encode_image(pipe, image)
    step_latents = [latents.detach().cpu()]
    for t in tqdm(reversed(timesteps), total=steps, desc="inverting", disable=not progress):
        below = latents  # x_p, the level this step starts from
        # The first prediction is made at x_p (the approximation); each further one at the
        # x_t the last one gave, always stepping up from the same x_p.
        for _ in range(1 + fixed_point_iterations):
            noise = _predict(pipe, scheduler, latents, t, cond, uncond, guidance_scale)
            latents, _ = inversion_step(scheduler, noise, t, below)
        step_latents.append(latents.detach().cpu())
    settings = dict(num_inference_steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                    fixed_point_iterations=fixed_point_iterations)
    return InversionResult(latents=latents, step_latents=step_latents, image_latents=step_latents[0],
                           timesteps=timesteps, prompt=prompt, image=image, settings=settings)


def _predict(pipe, scheduler, latents, t, cond, uncond, guidance_scale) -> torch.Tensor:
    """The UNet's prediction at ``latents`` for timestep ``t``, with CFG when the scale is not 1."""
    timestep = torch.tensor(t, device=latents.device)
    model_input = scheduler.scale_model_input(latents, timestep)
    with torch.no_grad():
        if uncond is None:
            return denoise(pipe, model_input, timestep, cond)
        both = denoise(pipe, torch.cat([model_input] * 2), timestep, Conditioning.cat([uncond, cond]))
    noise_uncond, noise_cond = both.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def reconstruct(pipe, inversion: InversionResult, *, controls: tuple[Control, ...] | list = (),
                progress: bool = True, **kwargs) -> GenerationResult:
    """Sample from the inverted noise with the inversion's prompt, steps and guidance scale.

    Without controls this should give back the input image (``psnr`` measures how well);
    ``store=AttentionStore()`` records the source run's attention, ``controls`` edit it.
    """
    s = inversion.settings
    options = dict(num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                   negative_prompt=s["negative_prompt"], height=inversion.height, width=inversion.width)
    options.update(kwargs)
    return generate(pipe, inversion.prompt, latents=inversion.latents, controls=controls, progress=progress,
                    **options)
