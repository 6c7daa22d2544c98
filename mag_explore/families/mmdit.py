"""The MMDiT families: how Flux.1 and SD3 encode a prompt, schedule, and call their transformer.

Both sample with **flow matching**: x_t = (1 − σ)·x_0 + σ·noise, the transformer predicts the
velocity v = noise − x_0 and FlowMatchEulerDiscreteScheduler steps x ← x + (σ_next − σ)·v.
Its timesteps are t = 1000·σ (``num_train_timesteps`` = 1000), so "while t > 700" means σ > 0.7.

* **Flux.1** (``FluxPipeline``): text keys = T5 (``max_sequence_length``, default 512); CLIP only
  gives the pooled vector. Latents (batch, c, h, w) are *packed* into tokens of 2×2 patches
  (batch, h/2·w/2, 4c) for the transformer and unpacked after; packing is a permutation, so
  the sampler keeps x_t unpacked. Flux.1-dev is guidance-distilled: ``guidance_scale`` is fed
  in as an embedding (one pass per step); with a negative prompt and ``true_cfg_scale`` > 1 it
  also runs a second pass on the negative prompt ("true CFG", FluxPipeline's rule). The
  schedule's shift ``mu`` grows with the number of image tokens (``calculate_shift``).
* **SD3** (``StableDiffusion3Pipeline``): text keys = 77 CLIP (both encoders' penultimate states,
  concatenated and zero-padded to T5's width), then T5 (default 256; zeros without
  text_encoder_3); pooled = both CLIPs' projections. Ordinary CFG on the batch [uncond, cond]
  when guidance_scale > 1; a missing negative prompt is "" (encoded, not zeros).

Everything follows diffusers' pipelines step by step (written against 0.42; pyproject allows
0.30-0.49), so without controls the pixels are the same as the pipeline's: the tests compare
them on tiny random pipelines with the installed diffusers.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Family
from .conditioning import Conditioning

FLUX, SD3 = "flux", "sd3"
MAX_SEQUENCE_LENGTH = {FLUX: 512, SD3: 256}  # the pipelines' defaults

_CLIP_TOKENIZERS = {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")}
_T5_TOKENIZERS = {("transformers", "T5Tokenizer"), ("transformers", "T5TokenizerFast")}
_FLOW = {("diffusers", "FlowMatchEulerDiscreteScheduler")}
#: The pipeline class, and its components: name -> accepted (library, class) pairs (None: may be left out).
MMDIT_COMPONENTS: dict[str, tuple[str, dict[str, set | None]]] = {
    FLUX: ("FluxPipeline", {
        "transformer": {("diffusers", "FluxTransformer2DModel")}, "vae": {("diffusers", "AutoencoderKL")},
        "scheduler": _FLOW, "text_encoder": {("transformers", "CLIPTextModel")}, "tokenizer": _CLIP_TOKENIZERS,
        "text_encoder_2": {("transformers", "T5EncoderModel")}, "tokenizer_2": _T5_TOKENIZERS}),
    SD3: ("StableDiffusion3Pipeline", {
        "transformer": {("diffusers", "SD3Transformer2DModel")}, "vae": {("diffusers", "AutoencoderKL")},
        "scheduler": _FLOW, "text_encoder": {("transformers", "CLIPTextModelWithProjection")},
        "tokenizer": _CLIP_TOKENIZERS, "text_encoder_2": {("transformers", "CLIPTextModelWithProjection")},
        "tokenizer_2": _CLIP_TOKENIZERS, "text_encoder_3": None, "tokenizer_3": None}),
}
_OPTIONAL = {"text_encoder_3": {("transformers", "T5EncoderModel")}, "tokenizer_3": _T5_TOKENIZERS}


def mmdit_family(pipe) -> str:
    """``"sd3"`` for a pipeline with a third text encoder slot, else ``"flux"``."""
    return SD3 if hasattr(pipe, "text_encoder_3") else FLUX


# --------------------------------------------------------------------------- text
def encode_prompt(pipe, text: str | None, batch: int = 1, max_sequence_length: int | None = None,
                  guidance_scale: float | None = None) -> Conditioning | None:
    """``text`` -> the transformer's text keys and pooled vector, ``batch`` identical rows.

    Flux: ``text=None`` (no negative prompt) gives None: no true-CFG pass. Its guidance
    embedding (``guidance_scale``) is stored per row in ``time_ids``. SD3: None is "".
    """
    kind = mmdit_family(pipe)
    length = max_sequence_length or MAX_SEQUENCE_LENGTH[kind]
    if kind == FLUX:
        if text is None:
            return None
        embeddings = _t5_states(pipe.tokenizer_2, pipe.text_encoder_2, text, length)
        pooled = _clip(pipe.tokenizer, pipe.text_encoder, text).pooler_output.to(pipe.text_encoder.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([batch], float(guidance_scale), dtype=torch.float32, device=embeddings.device)
        return Conditioning(embeddings.repeat(batch, 1, 1), pooled.repeat(batch, 1), guidance)
    text = text or ""
    first, second = (_clip(tok, enc, text, hidden=True) for tok, enc in
                     ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)))
    clip = torch.cat([first.hidden_states[-2].to(pipe.text_encoder.dtype),
                      second.hidden_states[-2].to(pipe.text_encoder_2.dtype)], dim=-1)
    if pipe.text_encoder_3 is None:  # as diffusers: T5 keys of zeros
        t5 = torch.zeros(1, length, pipe.transformer.config.joint_attention_dim, dtype=pipe.text_encoder.dtype,
                         device=clip.device)
    else:
        t5 = _t5_states(pipe.tokenizer_3, pipe.text_encoder_3, text, length)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    embeddings = torch.cat([clip, t5], dim=-2)
    pooled = torch.cat([first[0], second[0]], dim=-1)  # CLIPTextModelWithProjection: text_embeds first
    return Conditioning(embeddings.repeat(batch, 1, 1), pooled.repeat(batch, 1))


def _t5_states(tokenizer, encoder, text: str, length: int) -> torch.Tensor:
    ids = tokenizer([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids.to(encoder.device), output_hidden_states=False)[0].to(encoder.dtype)


def _clip(tokenizer, encoder, text: str, hidden: bool = False):
    ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids.to(encoder.device), output_hidden_states=hidden)


def num_prompt_tokens(pipe, prompt: str, max_sequence_length: int | None = None) -> int:
    """How many leading text keys belong to the prompt (with EOS): T5's; SD3: the 77 CLIP keys plus T5's."""
    kind = mmdit_family(pipe)
    length = max_sequence_length or MAX_SEQUENCE_LENGTH[kind]
    t5 = pipe.tokenizer_2 if kind == FLUX else pipe.tokenizer_3
    count = len(t5(prompt, truncation=True, max_length=length).input_ids) if t5 is not None else 0
    return count if kind == FLUX else pipe.tokenizer.model_max_length + count


# --------------------------------------------------------------------------- latents and the transformer
def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE factor times Flux's 2×2 packing / SD3's patch size."""
    patch = 2 if mmdit_family(pipe) == FLUX else pipe.transformer.config.patch_size
    return pipe.vae_scale_factor * patch


def latent_channels(pipe) -> int:
    channels = pipe.transformer.config.in_channels
    return channels // 4 if mmdit_family(pipe) == FLUX else channels  # Flux's in_channels count packed 2×2 patches


def token_grid(pipe, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The h×w grid of image tokens for latents of ``latent_hw``."""
    patch = 2 if mmdit_family(pipe) == FLUX else pipe.transformer.config.patch_size
    return latent_hw[0] // patch, latent_hw[1] // patch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, h/2·w/2, 4c): FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of h×w."""
    b, _, packed = tokens.shape
    return tokens.view(b, h // 2, w // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, packed // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Each packed token's (0, row, column): FluxPipeline._prepare_latent_image_ids, for the rotary embedding."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def denoise(pipe, latents: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
    """The transformer's velocity for unpacked ``latents`` (one row per row of ``cond``), unpacked."""
    transformer, batch = pipe.transformer, latents.shape[0]
    t = torch.as_tensor(timestep, device=latents.device).expand(batch).to(latents.dtype)
    if mmdit_family(pipe) == SD3:
        return transformer(hidden_states=latents, timestep=t, encoder_hidden_states=cond.embeddings,
                           pooled_projections=cond.pooled, return_dict=False)[0]
    h, w = latents.shape[-2:]
    text_ids = torch.zeros(cond.embeddings.shape[1], 3, device=latents.device, dtype=cond.embeddings.dtype)
    out = transformer(hidden_states=pack(latents), timestep=t / 1000, guidance=cond.time_ids,
                      pooled_projections=cond.pooled, encoder_hidden_states=cond.embeddings, txt_ids=text_ids,
                      img_ids=image_ids(h, w, latents.device, latents.dtype), return_dict=False)[0]
    return unpack(out, h, w)


def predict(pipe, latents, t, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
            true_cfg_scale: float, attention=None) -> torch.Tensor:
    """The guided velocity (float32): Flux's one pass (+ true CFG), SD3's CFG on [uncond, cond]."""
    dtype = pipe.transformer.dtype
    x = latents.to(dtype)
    with torch.no_grad():
        if mmdit_family(pipe) == FLUX:
            with _roles(attention, ("cond",) * len(cond)):
                velocity = denoise(pipe, x, t, cond)
            if uncond is not None and true_cfg_scale > 1:  # FluxPipeline's do_true_cfg
                with _roles(attention, ("uncond",) * len(uncond)):
                    negative = denoise(pipe, x, t, uncond)
                velocity = negative + true_cfg_scale * (velocity - negative)
            return velocity.float()
        if guidance_scale <= 1:  # SD3's do_classifier_free_guidance is guidance_scale > 1
            return denoise(pipe, x, t, cond).float()
        negative, velocity = denoise(pipe, torch.cat([x, x]), t, Conditioning.cat([uncond, cond])).chunk(2)
        return (negative + guidance_scale * (velocity - negative)).float()


def _roles(attention, roles):
    from contextlib import nullcontext

    return attention.phase_as("denoise", roles) if attention is not None else nullcontext()


# --------------------------------------------------------------------------- the schedule
def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The schedule's shift mu, linear in the number of image tokens (FluxPipeline's calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flow_scheduler(pipe, num_inference_steps: int, latent_hw: tuple[int, int], device=None, scheduler=None):
    """A fresh copy of the pipeline's FlowMatchEulerDiscreteScheduler (or ``scheduler``), set as the pipeline sets it."""
    if scheduler is None:
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    config = scheduler.config
    seq_len = int(np.prod(token_grid(pipe, latent_hw)))
    if mmdit_family(pipe) == FLUX:
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps,
                                                                        num_inference_steps)
        mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    else:
        extra = {}
        if config.get("use_dynamic_shifting"):  # SD3's default max_shift is 1.16
            extra["mu"] = calculate_shift(seq_len, config.get("base_image_seq_len", 256),
                                          config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                          config.get("max_shift", 1.16))
        scheduler.set_timesteps(num_inference_steps, device=device, **extra)
    scheduler.set_begin_index(0)
    return scheduler


# --------------------------------------------------------------------------- the two families
class _MMDiTFamily(Family):
    """What Flux.1 and SD3 share: joint attention, flow matching, T5's ``max_sequence_length``."""

    joint_attention = True

    def encode_prompt(self, pipe, text, batch=1, size=None, *, max_sequence_length=None, guidance_scale=None):
        return encode_prompt(pipe, text, batch, max_sequence_length, guidance_scale)

    def num_prompt_tokens(self, pipe, prompt, max_sequence_length=None) -> int:
        return num_prompt_tokens(pipe, prompt, max_sequence_length)

    def denoise(self, pipe, model_input, timestep, cond):
        return denoise(pipe, model_input, timestep, cond)

    def predict(self, pipe, scheduler, latents, t, cond, uncond, guidance_scale, true_cfg_scale=1.0, attention=None):
        return predict(pipe, latents, t, cond, uncond, guidance_scale, true_cfg_scale, attention)

    def make_scheduler(self, pipe, num_inference_steps, latent_hw, device=None, scheduler=None):
        return flow_scheduler(pipe, num_inference_steps, latent_hw, device, scheduler)

    def latent_shape(self, pipe, num_images, height, width):
        return (num_images, latent_channels(pipe), height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)

    def size_multiple(self, pipe) -> int:
        return size_multiple(pipe)

    def attention_layer_names(self, pipe):
        from ..attention.joint import joint_attention_layer_names
        return joint_attention_layer_names(pipe.transformer)

    def install_attention_hooks(self, pipe, hooks):
        from ..attention.joint import joint_attention_hooks
        return joint_attention_hooks(pipe.transformer, hooks)

    def attention_grids(self, pipe, latent_hw):
        grid = token_grid(pipe, latent_hw)
        return {name: grid for name in self.attention_layer_names(pipe)}

    def attention_places(self, pipe):
        from ..attention.joint import joint_layer_place
        return {n: joint_layer_place(pipe.transformer, n) for n in self.attention_layer_names(pipe)}


class FluxFamily(_MMDiTFamily):
    """Flux.1: T5 keys (text first), CLIP pooled only, 2×2 packed latents, distilled guidance."""

    name, title, pipeline_class = FLUX, "Flux.1 (FluxPipeline)", "FluxPipeline"
    components = MMDIT_COMPONENTS[FLUX][1]
    example = "black-forest-labs/FLUX.1-dev"
    options = ("true_cfg_scale", "max_sequence_length")
    defaults = {"guidance_scale": 3.5, "true_cfg_scale": 1.0, "num_inference_steps": 28, "negative_prompt": None,
                "max_sequence_length": MAX_SEQUENCE_LENGTH[FLUX]}

    def matches(self, pipe) -> bool:  # a transformer, T5 as the second tokenizer, no third encoder slot
        return (getattr(pipe, "transformer", None) is not None and not hasattr(pipe, "text_encoder_3")
                and hasattr(pipe, "tokenizer_2"))

    def span_tokenizer(self, pipe, max_sequence_length=None):
        return pipe.tokenizer_2

    def latent_shape(self, pipe, num_images, height, width):
        factor = pipe.vae_scale_factor  # FluxPipeline: 2 * (size // (factor * 2))
        return (num_images, latent_channels(pipe), 2 * (height // (factor * 2)), 2 * (width // (factor * 2)))

    def native_size(self, pipe):
        side = 128 * pipe.vae_scale_factor  # FluxPipeline.default_sample_size
        return side, side


class SD3Family(_MMDiTFamily):
    """SD3 / SD3.5: 77 CLIP keys then T5 (image first), CFG on [uncond, cond]."""

    name, title, pipeline_class = SD3, "SD3 / SD3.5 (StableDiffusion3Pipeline)", "StableDiffusion3Pipeline"
    components = {k: v for k, v in MMDIT_COMPONENTS[SD3][1].items() if v is not None}
    optional_components = _OPTIONAL
    example = "stabilityai/stable-diffusion-3-medium-diffusers"
    options = ("max_sequence_length",)
    defaults = {"guidance_scale": 7.0, "num_inference_steps": 28, "negative_prompt": None,
                "max_sequence_length": MAX_SEQUENCE_LENGTH[SD3]}

    def matches(self, pipe) -> bool:
        return getattr(pipe, "transformer", None) is not None and hasattr(pipe, "text_encoder_3")

    def load_options(self, index: dict) -> dict:
        value = index.get("text_encoder_3")  # an SD3 folder without T5: its keys are zeros, as diffusers
        present = isinstance(value, (list, tuple)) and len(value) == 2 and value[1] is not None
        return {} if present else dict(text_encoder_3=None, tokenizer_3=None)

    def check_prompt(self, pipe, prompt: str) -> None:
        from .unet import check_token_positions
        check_token_positions(pipe, prompt)

    def span_tokenizer(self, pipe, max_sequence_length=None):
        from ..text.t5 import JointPromptTokens
        return JointPromptTokens(pipe.tokenizer, pipe.tokenizer_3 if pipe.text_encoder_3 is not None else None,
                                 max_sequence_length or MAX_SEQUENCE_LENGTH[SD3])
