"""Model families: how each one encodes a prompt, schedules and calls its denoiser, and nothing else.

Everything above this package (the sampler, the methods) works the same for every family;
only these functions know the difference. ``unet`` holds SD 1.x/2.x and SDXL (UNet
cross-attention, DDIM), ``mmdit`` Flux.1 and SD3 (joint attention, flow matching).
"""
from __future__ import annotations

import torch

from ..attention import cross_attention_grids, cross_attention_hooks, cross_attention_layer_names, layer_place
from ..attention.joint import joint_attention_hooks, joint_attention_layer_names, joint_layer_place
from ..t5_tokens import JointPromptTokens
from ..validation import InputError, check_count, check_number
from . import mmdit, unet
from .conditioning import Conditioning
from .mmdit import FLUX, SD3
from .unet import (SD, SDXL, SDXL_COMPONENTS, _clip_hidden_states, check_token_positions, scale_latents,  # noqa: F401
                   time_ids, unscale_latents, vae_in_working_dtype)

MMDIT = (FLUX, SD3)
FAMILIES = (SD, SDXL, FLUX, SD3)

#: Defaults that differ by family (see ``models.model_defaults``). SDXL's MAG step size:
#: the loss sums over every cross-attention layer, head and pixel, and SDXL base at 1024²
#: has about 7.6x as many of those terms as SD 1.5 at 512² (70 layers of 10-20 heads at
#: 64² and 32², against 16 layers of 8 heads at 64² ... 8²: 1.64 M vs 0.22 M), so the
#: official 0.08 is divided by 7.6 to keep the step on x_t of a similar size. NOT calibrated
#: on real SDXL weights: a first guess until someone measures it on a GPU. Flux and SD3: the
#: pipelines' own defaults (steps, guidance, no negative prompt, T5 length); their MAG α is
#: NOT calibrated on real weights either.
FAMILY_DEFAULTS: dict[str, dict] = {
    SD: {}, SDXL: {"mag_alpha": 0.01},
    FLUX: {"guidance_scale": 3.5, "true_cfg_scale": 1.0, "num_inference_steps": 28, "negative_prompt": None,
           "max_sequence_length": mmdit.MAX_SEQUENCE_LENGTH[FLUX]},
    SD3: {"guidance_scale": 7.0, "num_inference_steps": 28, "negative_prompt": None,
          "max_sequence_length": mmdit.MAX_SEQUENCE_LENGTH[SD3]},
}


def family(pipe) -> str:
    """"flux" or "sd3" for a pipeline with a transformer; "sdxl" with a second CLIP beside a UNet; else "sd"."""
    if getattr(pipe, "transformer", None) is not None:
        return mmdit.mmdit_family(pipe)
    return SDXL if getattr(pipe, "text_encoder_2", None) is not None else SD


def is_mmdit(pipe) -> bool:
    return family(pipe) in MMDIT


def denoiser(pipe) -> torch.nn.Module:
    """The UNet, or the MMDiT transformer."""
    return pipe.transformer if is_mmdit(pipe) else pipe.unet


def encode_prompt(pipe, text: str | None, batch: int = 1, size: tuple[int, int] | None = None, *,
                  max_sequence_length: int | None = None, guidance_scale: float | None = None) -> Conditioning | None:
    """``text`` through the pipeline's text encoder(s), ``batch`` identical rows (see unet / mmdit)."""
    if is_mmdit(pipe):
        return mmdit.encode_prompt(pipe, text, batch, max_sequence_length, guidance_scale)
    return unet.encode_prompt(pipe, text, batch, size)


def denoise(pipe, model_input: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
    """The denoiser's prediction for ``model_input`` (noise or v for a UNet, velocity for flow matching)."""
    return mmdit.denoise(pipe, model_input, timestep, cond) if is_mmdit(pipe) else unet.denoise(
        pipe, model_input, timestep, cond)


def model_input(scheduler, latents: torch.Tensor, timestep) -> torch.Tensor:
    """x_t as the denoiser takes it: DDIM-style schedulers scale it, flow matching does not."""
    scale = getattr(scheduler, "scale_model_input", None)
    return scale(latents, timestep) if scale is not None else latents


def noise_std(scheduler, timestep) -> float:
    """The noise level of x_t: √(1 − ᾱ_t) for DDIM, σ = t / 1000 for flow matching."""
    if hasattr(scheduler, "alphas_cumprod"):
        return float(1 - scheduler.alphas_cumprod[int(timestep)]) ** 0.5
    return float(timestep) / scheduler.config.num_train_timesteps


def attention_hooks(pipe, hooks):
    """``cross_attention_hooks`` on a UNet, ``joint_attention_hooks`` on an MMDiT transformer."""
    return joint_attention_hooks(pipe.transformer, hooks) if is_mmdit(pipe) else cross_attention_hooks(pipe.unet, hooks)


def attention_grids(pipe, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Each hooked attention layer's h×w grid of image tokens, without running the model."""
    if is_mmdit(pipe):
        grid = mmdit.token_grid(pipe, latent_hw)
        return {name: grid for name in joint_attention_layer_names(pipe.transformer)}
    return cross_attention_grids(pipe.unet, latent_hw)


def attention_places(pipe) -> dict[str, str]:
    """Each hooked layer's place: "down"/"mid"/"up" (UNet), "double"/"single" (Flux), "joint" (SD3)."""
    if is_mmdit(pipe):
        return {n: joint_layer_place(pipe.transformer, n) for n in joint_attention_layer_names(pipe.transformer)}
    return {n: layer_place(n) for n in cross_attention_layer_names(pipe.unet)}


def span_tokenizer(pipe, max_sequence_length: int | None = None):
    """What turns words into the attention's text-key indices: CLIP's tokenizer, Flux's T5, SD3's joint keys."""
    kind = family(pipe)
    if kind == FLUX:
        return pipe.tokenizer_2
    if kind == SD3:
        return JointPromptTokens(pipe.tokenizer, pipe.tokenizer_3 if pipe.text_encoder_3 is not None else None,
                                 max_sequence_length or mmdit.MAX_SEQUENCE_LENGTH[SD3])
    return pipe.tokenizer


def num_prompt_tokens(pipe, prompt: str, max_sequence_length: int | None = None) -> int:
    if is_mmdit(pipe):
        return mmdit.num_prompt_tokens(pipe, prompt, max_sequence_length)
    return len(pipe.tokenizer(prompt, truncation=True).input_ids)


def check_prompt(pipe, prompt: str) -> None:
    """SDXL and SD3: both CLIP tokenizers must split ``prompt`` alike (key i joins token i of both)."""
    if family(pipe) in (SDXL, SD3):
        unet.check_token_positions(pipe, prompt)


def latent_shape(pipe, num_images: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of x_t (unpacked, also for Flux)."""
    factor = pipe.vae_scale_factor
    channels = mmdit.latent_channels(pipe) if is_mmdit(pipe) else pipe.unet.config.in_channels
    if family(pipe) == FLUX:  # FluxPipeline: 2 * (size // (factor * 2))
        return (num_images, channels, 2 * (height // (factor * 2)), 2 * (width // (factor * 2)))
    return (num_images, channels, height // factor, width // factor)


def size_multiple(pipe) -> int:
    return mmdit.size_multiple(pipe) if is_mmdit(pipe) else pipe.vae_scale_factor


def native_size(pipe) -> tuple[int, int]:
    """The model's default (height, width) in pixels."""
    if family(pipe) == FLUX:  # FluxPipeline.default_sample_size
        side = 128 * pipe.vae_scale_factor
        return side, side
    sample = denoiser(pipe).config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


def make_scheduler(pipe, num_inference_steps: int, latent_hw: tuple[int, int], device=None, scheduler=None):
    """A fresh scheduler set to ``num_inference_steps``: DDIM from the config (UNet), the pipeline's flow matching (MMDiT)."""
    if is_mmdit(pipe):
        return mmdit.flow_scheduler(pipe, num_inference_steps, latent_hw, device, scheduler)
    if scheduler is None:
        from ..schedule import ddim_scheduler
        return ddim_scheduler(pipe, num_inference_steps, device=device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler


def predict(pipe, scheduler, latents, t, cond, uncond, guidance_scale: float, true_cfg_scale: float = 1.0,
            attention=None) -> torch.Tensor:
    """The guided prediction (float32) for x_t = ``latents``: UNet CFG on [uncond, cond], or mmdit.predict."""
    if is_mmdit(pipe):
        return mmdit.predict(pipe, latents, t, cond, uncond, guidance_scale, true_cfg_scale, attention)
    x = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(pipe.unet.dtype)
    with torch.no_grad():
        noise = unet.denoise(pipe, x, t, Conditioning.cat([uncond, cond]))
    noise_uncond, noise_cond = noise.float().chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def check_mmdit_options(pipe, defaults: dict, true_cfg_scale, max_sequence_length) -> tuple[float, int | None]:
    """Flux's ``true_cfg_scale`` and Flux/SD3's ``max_sequence_length``, resolved and checked."""
    kind = family(pipe)
    for name, value, families in (("true_cfg_scale", true_cfg_scale, (FLUX,)), ("max_sequence_length",
                                                                                 max_sequence_length, MMDIT)):
        if value is not None and kind not in families:
            raise InputError(f"{name}={value!r} is a setting of {' and '.join(families)} pipelines, not of this "
                             f"{kind} pipeline")
    scale = check_number("true_cfg_scale", defaults.get("true_cfg_scale", 1.0) if true_cfg_scale is None
                         else true_cfg_scale, minimum=0)
    length = defaults.get("max_sequence_length") if max_sequence_length is None else max_sequence_length
    if kind in MMDIT:
        length = check_count("max_sequence_length", length)
    return scale, length


def require_unet(pipe, what: str) -> None:
    """Refuse, naming the family, what is defined for UNet cross-attention only."""
    if is_mmdit(pipe):
        raise NotImplementedError(f"{what} is defined for UNet cross-attention (SD 1.x/2.x, SDXL) only, not for "
                                  f"this {family(pipe)} pipeline's joint attention")
