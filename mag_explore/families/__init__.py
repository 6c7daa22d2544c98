"""Model families: how each one encodes a prompt, schedules and calls its denoiser, and nothing else.

Each family is one object of a :class:`Family` subclass (the interface: ``families/base.py``),
kept in a small registry; :func:`family_of` picks the one a pipeline belongs to. Everything
above this package (the sampler, the methods) calls the functions below, which ask that
object: nothing outside ``families/`` asks which family it is. Built in: ``unet`` (SD 1.x/2.x,
SDXL: UNet cross-attention, DDIM), ``mmdit`` (Flux.1, SD3/3.5: joint attention, flow matching),
``pixart`` (PixArt-Σ) and ``sana`` (Sana): transformers with cross-attention and a text mask.
A user adds a family with :func:`register_family` (docs/howto_add_a_family.md).
"""
from __future__ import annotations

import torch

from ..validation import InputError, check_count, check_number
from . import mmdit, unet
from .base import (FAMILY_OPTIONS, Family, family_for_index, family_named, family_names, family_of,  # noqa: F401
                   model_input, register_family, registered_families, supported_families, unregister_family)
from .chroma import ChromaFamily
from .conditioning import Conditioning
from .flux2 import Flux2KleinFamily
from .mmdit import FLUX, SD3, FluxFamily, SD3Family
from .pixart import PIXART, PixArtSigmaFamily
from .qwenimage import QwenImageFamily
from .sana import SANA, SanaFamily
from .unet import (SD, SDXL, SDXL_COMPONENTS, SDFamily, SDXLFamily,
                   check_token_positions, scale_latents, time_ids, unscale_latents, vae_in_working_dtype)
from .zimage import ZImageFamily

for _family in (SDFamily(), SDXLFamily(), FluxFamily(), SD3Family(), PixArtSigmaFamily(), SanaFamily(),
                ChromaFamily(), QwenImageFamily(), ZImageFamily(), Flux2KleinFamily()):
    register_family(_family)

MMDIT = (FLUX, SD3)
FAMILIES = (SD, SDXL, FLUX, SD3)

#: Defaults that differ by family (see ``models.model_defaults``; each family's ``defaults``). SDXL's
#: MAG step size: the loss sums over every cross-attention layer, head and pixel, and SDXL base at
#: 1024² has about 7.6x as many of those terms as SD 1.5 at 512² (70 layers of 10-20 heads at
#: 64² and 32², against 16 layers of 8 heads at 64² ... 8²: 1.64 M vs 0.22 M), so the
#: official 0.08 is divided by 7.6 to keep the step on x_t of a similar size. NOT calibrated
#: on real SDXL weights: a first guess until someone measures it on a GPU. Flux and SD3: the
#: pipelines' own defaults (steps, guidance, no negative prompt, T5 length); their MAG α is
#: NOT calibrated on real weights either.
FAMILY_DEFAULTS: dict[str, dict] = {f.name: f.defaults for f in registered_families()}


def family(pipe) -> str:
    """The name of ``pipe``'s family: "sd", "sdxl", "flux", "sd3", ... (see :func:`family_of`)."""
    return family_of(pipe).name


def is_mmdit(pipe) -> bool:
    """Whether hooks see joint attention's image→text block (Flux, SD3, ...) rather than cross-attention."""
    return family_of(pipe).joint_attention


def denoiser(pipe) -> torch.nn.Module:
    """The UNet, or the transformer."""
    return family_of(pipe).denoiser(pipe)


def encode_prompt(pipe, text: str | None, batch: int = 1, size: tuple[int, int] | None = None, *,
                  max_sequence_length: int | None = None, guidance_scale: float | None = None) -> Conditioning | None:
    """``text`` through the pipeline's text encoder(s), ``batch`` identical rows (see each family)."""
    return family_of(pipe).encode_prompt(pipe, text, batch, size, max_sequence_length=max_sequence_length,
                                         guidance_scale=guidance_scale)


def encode_negative_prompt(pipe, text: str | None, batch: int = 1, size: tuple[int, int] | None = None, *,
                           max_sequence_length: int | None = None, guidance_scale: float | None = None
                           ) -> Conditioning | None:
    """The negative prompt's conditioning (as ``encode_prompt``, except where a family treats it apart: Sana)."""
    return family_of(pipe).encode_negative_prompt(pipe, text, batch, size, max_sequence_length=max_sequence_length,
                                                  guidance_scale=guidance_scale)


def denoise(pipe, model_input: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
    """The denoiser's prediction for ``model_input`` (noise or v for a UNet, velocity for flow matching)."""
    return family_of(pipe).denoise(pipe, model_input, timestep, cond)


def noise_std(scheduler, timestep) -> float:
    """The noise level of x_t: √(1 − ᾱ_t) for DDIM, σ = t / 1000 for flow matching (also DPM-Solver's flow sigmas)."""
    if hasattr(scheduler, "alphas_cumprod") and not scheduler.config.get("use_flow_sigmas", False):
        return float(1 - scheduler.alphas_cumprod[int(timestep)]) ** 0.5
    return float(timestep) / scheduler.config.num_train_timesteps


def install_attention_hooks(pipe, hooks):
    """A ``with`` block running ``hooks`` in the family's attention layers (cross- or joint attention)."""
    return family_of(pipe).install_attention_hooks(pipe, hooks)


def attention_grids(pipe, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Each hooked attention layer's h×w grid of image tokens, without running the model."""
    return family_of(pipe).attention_grids(pipe, latent_hw)


def attention_places(pipe) -> dict[str, str]:
    """Each hooked layer's place: "down"/"mid"/"up" (UNet), "double"/"single" (Flux), "joint" (SD3), "block"."""
    return family_of(pipe).attention_places(pipe)


def span_tokenizer(pipe, max_sequence_length: int | None = None):
    """What turns words into the attention's text-key indices: CLIP's tokenizer, Flux's T5, SD3's joint keys, ..."""
    return family_of(pipe).span_tokenizer(pipe, max_sequence_length)


def num_prompt_tokens(pipe, prompt: str, max_sequence_length: int | None = None) -> int:
    return family_of(pipe).num_prompt_tokens(pipe, prompt, max_sequence_length)


def check_prompt(pipe, prompt: str) -> None:
    """SDXL and SD3: both CLIP tokenizers must split ``prompt`` alike (key i joins token i of both)."""
    family_of(pipe).check_prompt(pipe, prompt)


def latent_shape(pipe, num_images: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The shape of x_t (unpacked, also for Flux)."""
    return family_of(pipe).latent_shape(pipe, num_images, height, width)


def size_multiple(pipe) -> int:
    return family_of(pipe).size_multiple(pipe)


def native_size(pipe) -> tuple[int, int]:
    """The model's default (height, width) in pixels."""
    return family_of(pipe).native_size(pipe)


def make_scheduler(pipe, num_inference_steps: int, latent_hw: tuple[int, int], device=None, scheduler=None):
    """A fresh scheduler set to ``num_inference_steps``: DDIM (UNet), the pipeline's own (transformers)."""
    return family_of(pipe).make_scheduler(pipe, num_inference_steps, latent_hw, device, scheduler)


def predict(pipe, scheduler, latents, t, cond, uncond, guidance_scale: float, true_cfg_scale: float = 1.0,
            attention=None) -> torch.Tensor:
    """The guided prediction (float32) for x_t = ``latents`` (each family's CFG rule)."""
    return family_of(pipe).predict(pipe, scheduler, latents, t, cond, uncond, guidance_scale, true_cfg_scale,
                                   attention)


def check_options(pipe, defaults: dict, true_cfg_scale, max_sequence_length) -> tuple[float, int | None]:
    """``true_cfg_scale`` (Flux) and ``max_sequence_length`` (T5 / LM families), resolved and checked."""
    kind = family_of(pipe)
    for name, value in (("true_cfg_scale", true_cfg_scale), ("max_sequence_length", max_sequence_length)):
        if value is not None and name not in kind.options:
            accepting = [f.name for f in registered_families() if name in f.options]
            raise InputError(f"{name}={value!r} is a setting of {' and '.join(accepting)} pipelines, not of this "
                             f"{kind.name} pipeline")
    scale = check_number("true_cfg_scale", defaults.get("true_cfg_scale", 1.0) if true_cfg_scale is None
                         else true_cfg_scale, minimum=0)
    length = defaults.get("max_sequence_length") if max_sequence_length is None else max_sequence_length
    if "max_sequence_length" in kind.options:
        length = check_count("max_sequence_length", length)
    return scale, length


check_mmdit_options = check_options  # the name before families had options of their own


def require_unet(pipe, what: str) -> None:
    """Refuse, naming the family, what is defined for UNet cross-attention (down/mid/up places) only."""
    kind = family_of(pipe)
    if not kind.unet:
        attention = "joint attention" if kind.joint_attention else "transformer cross-attention"
        raise NotImplementedError(f"{what} is defined for UNet cross-attention (SD 1.x/2.x, SDXL) only, not for "
                                  f"this {kind.name} pipeline's {attention}")
