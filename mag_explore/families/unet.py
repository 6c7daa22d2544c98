"""The UNet families: how SD 1.x/2.x and SDXL encode a prompt and call their UNet.

* **SD 1.x/2.x**: one CLIP text encoder; the UNet attends to its last hidden states
  ``(batch, 77, 768 | 1024)``.
* **SDXL**: two CLIP text encoders (ViT-L, then OpenCLIP bigG with a projection). The UNet
  attends to the *penultimate* hidden states of both, concatenated along the feature axis
  ``(batch, 77, 768 + 1280 = 2048)``, so key ``i`` of every cross-attention layer is token
  ``i`` of *both* tokenizers (checked: :func:`check_token_positions`). It also gets two
  extra vectors through ``added_cond_kwargs``: the second encoder's pooled, projected
  embedding (``text_embeds``, 1280) and six "micro-conditioning" numbers (``time_ids``:
  original size, crop top-left, target size). With ``force_zeros_for_empty_prompt`` (SDXL
  base: true) a missing negative prompt is all zeros, not the encoding of "". Its VAE
  overflows in fp16, so it decodes in fp32 (``force_upcast``), as diffusers does.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..text.tokens import prompt_tokens
from .base import Family
from .conditioning import Conditioning

SD, SDXL = "sd", "sdxl"

# Components an SDXL base pipeline must have, beside SD's unet and vae: name -> accepted
# (library, class) pairs. The refiner (no first text encoder) and other variants are refused.
SDXL_COMPONENTS: dict[str, set[tuple[str, str]]] = {
    "text_encoder": {("transformers", "CLIPTextModel")},
    "text_encoder_2": {("transformers", "CLIPTextModelWithProjection")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "tokenizer_2": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
}

def denoise(pipe, model_input: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
    """The UNet's prediction for ``model_input`` (one row per row of ``cond``)."""
    return pipe.unet(model_input, timestep, **cond.unet_kwargs(), return_dict=False)[0]


def encode_prompt(pipe, text: str | None, batch: int = 1, size: tuple[int, int] | None = None) -> Conditioning:
    """``text`` through the pipeline's text encoder(s), ``batch`` identical rows.

    ``text=None`` is a missing negative prompt: "" for SD, zeros for SDXL when its
    ``force_zeros_for_empty_prompt`` is set (as diffusers). ``size`` (height, width) is
    SDXL's original and target size in ``time_ids`` (default: the model's native size).
    """
    if getattr(pipe, "text_encoder_2", None) is None:  # SD 1.x/2.x
        return Conditioning(_clip_hidden_states(pipe.tokenizer, pipe.text_encoder, text or "", -1)[0]
                            .to(pipe.unet.dtype).repeat(batch, 1, 1))
    dtype = pipe.text_encoder_2.dtype
    if text is None and pipe.config.force_zeros_for_empty_prompt:
        like = encode_prompt(pipe, "", 1, size)
        embeddings, pooled = torch.zeros_like(like.embeddings), torch.zeros_like(like.pooled)
    else:
        first, _ = _clip_hidden_states(pipe.tokenizer, pipe.text_encoder, text or "", -2)
        second, pooled = _clip_hidden_states(pipe.tokenizer_2, pipe.text_encoder_2, text or "", -2)
        embeddings = torch.cat([first, second], dim=-1).to(dtype)
        pooled = pooled.to(dtype)
    return Conditioning(embeddings.repeat(batch, 1, 1), pooled.repeat(batch, 1),
                        time_ids(pipe, size, dtype).to(embeddings.device).repeat(batch, 1))


def _clip_hidden_states(tokenizer, text_encoder, text: str, layer: int):
    """Hidden states of ``layer`` (-1: the last, after the final layer norm) and the encoder's first output."""
    tokens = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    device = text_encoder.device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        if layer == -1:  # SD 1.x/2.x: the last hidden state, final layer norm applied
            return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0], None
        output = text_encoder(tokens.input_ids.to(device), output_hidden_states=True)
    # CLIPTextModelWithProjection's first output is the pooled, projected text embedding
    pooled = output[0] if output[0].ndim == 2 else None
    return output.hidden_states[layer], pooled


def time_ids(pipe, size: tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w), shape (1, 6)."""
    if size is None:
        sample = pipe.unet.config.sample_size
        sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
        size = (sample[0] * pipe.vae_scale_factor, sample[1] * pipe.vae_scale_factor)
    ids = [*size, 0, 0, *size]
    expected = pipe.unet.add_embedding.linear_1.in_features
    given = pipe.unet.config.addition_time_embed_dim * len(ids) + pipe.text_encoder_2.config.projection_dim
    if given != expected:
        raise ValueError(f"this SDXL UNet expects {expected} added-conditioning features, but 6 time ids and "
                         f"text_encoder_2's projection_dim give {given}: the model's configs do not fit together")
    return torch.tensor([ids], dtype=dtype)


def check_token_positions(pipe, prompt: str) -> None:
    """SDXL: both tokenizers must split ``prompt`` into the same tokens (key i = token i in both halves)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return
    first, second = prompt_tokens(pipe.tokenizer, prompt), prompt_tokens(pipe.tokenizer_2, prompt)
    if first != second:
        differ = next(i for i, (a, b) in enumerate(zip(first + [None], second + [None])) if a != b)
        raise ValueError(
            f"the two tokenizers of this model (SDXL or SD3: two CLIPs) split {prompt!r} differently from token "
            f"{differ} on: tokenizer gives {first}, tokenizer_2 gives {second}. Each text key joins token i of "
            f"both encoders, so word positions would be ambiguous; use tokenizers with the same vocabulary."
        )


@contextmanager
def vae_in_working_dtype(pipe) -> Iterator[torch.dtype]:
    """The VAE in the dtype it can decode in: fp32 for an fp16 VAE with ``force_upcast``
    (SDXL's VAE overflows in fp16), put back afterwards. Yields that dtype."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        _quiet_cast(vae, torch.float32)
    try:
        yield vae.dtype
    finally:
        if upcast:
            _quiet_cast(vae, torch.float16)


def _quiet_cast(module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` without diffusers' warning on every cast of a VAE ("should be kept in float32: []")."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        module.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """UNet latents -> what the VAE decodes (scaling factor; shift, or SDXL-style mean and std)."""
    statistics = _latent_statistics(vae, latents)
    if statistics is not None:
        mean, std = statistics
        return latents * std / vae.config.scaling_factor + mean
    latents = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    return latents


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`unscale_latents` (VAE encoder output -> UNet latents)."""
    statistics = _latent_statistics(vae, latents)
    if statistics is not None:
        mean, std = statistics
        return (latents - mean) * vae.config.scaling_factor / std
    if getattr(vae.config, "shift_factor", None):
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def _latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-channel latents_mean and latents_std of the VAE's config (shaped like ``like``), if it has both."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in (mean, std))


# --------------------------------------------------------------------------- the two families
class SDFamily(Family):
    """SD 1.x/2.x: one CLIP, a UNet with ``attn2`` cross-attention, DDIM (the official MAG code's sampler).

    Its model index is checked in :func:`mag_explore.models.files.check_supported` (UNet config
    included), so ``pipeline_class`` is left None: the UNet families are recognised there.
    """

    name, title, unet = SD, "Stable Diffusion 1.x/2.x (StableDiffusionPipeline)", True
    example = "stable-diffusion-v1-5/stable-diffusion-v1-5"

    def matches(self, pipe) -> bool:  # the fallback: any UNet pipeline without a second CLIP
        return getattr(pipe, "transformer", None) is None and getattr(pipe, "text_encoder_2", None) is None

    def denoiser(self, pipe):
        return pipe.unet

    def encode_prompt(self, pipe, text, batch=1, size=None, *, max_sequence_length=None, guidance_scale=None):
        return encode_prompt(pipe, text, batch, size)

    def span_tokenizer(self, pipe, max_sequence_length=None):
        return pipe.tokenizer

    def num_prompt_tokens(self, pipe, prompt, max_sequence_length=None) -> int:
        return len(pipe.tokenizer(prompt, truncation=True).input_ids)

    def denoise(self, pipe, model_input, timestep, cond):
        return denoise(pipe, model_input, timestep, cond)

    def predict(self, pipe, scheduler, latents, t, cond, uncond, guidance_scale, true_cfg_scale=1.0, attention=None):
        """CFG on the batch [uncond, cond], always (as StableDiffusionPipeline with the official scale 9)."""
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(pipe.unet.dtype)
        with torch.no_grad():
            noise = denoise(pipe, x, t, Conditioning.cat([uncond, cond]))
        noise_uncond, noise_cond = noise.float().chunk(2)
        return noise_uncond + guidance_scale * (noise_cond - noise_uncond)

    def make_scheduler(self, pipe, num_inference_steps, latent_hw, device=None, scheduler=None):
        """DDIM from the pipeline's config (or ``scheduler``), as the official code samples."""
        if scheduler is None:
            from ..schedule import ddim_scheduler
            return ddim_scheduler(pipe, num_inference_steps, device=device)
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler

    def size_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor

    def attention_grids(self, pipe, latent_hw):
        from ..attention import cross_attention_grids
        return cross_attention_grids(pipe.unet, latent_hw)

    def attention_places(self, pipe):
        from ..attention import cross_attention_layer_names, layer_place
        return {n: layer_place(n) for n in cross_attention_layer_names(pipe.unet)}


class SDXLFamily(SDFamily):
    """SDXL base: two CLIPs (penultimate states side by side), pooled embedding and time ids."""

    name, title = SDXL, "SDXL base (StableDiffusionXLPipeline)"
    example = "stabilityai/stable-diffusion-xl-base-1.0"
    #: SDXL's MAG step size: see ``families.FAMILY_DEFAULTS`` (NOT calibrated on real weights)
    defaults = {"mag_alpha": 0.01}

    def matches(self, pipe) -> bool:
        return getattr(pipe, "transformer", None) is None and getattr(pipe, "text_encoder_2", None) is not None

    def check_prompt(self, pipe, prompt: str) -> None:
        check_token_positions(pipe, prompt)
