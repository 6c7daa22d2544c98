"""Chroma (``ChromaPipeline``): Flux.1's blocks, T5 only, a text mask, ordinary CFG.

Chroma is Flux.1-schnell's transformer with the pooled CLIP vector and the guidance
embedding taken out (a small "approximator" makes the modulation from the timestep alone).
What differs from :mod:`.mmdit`'s Flux.1, as diffusers 0.42 encodes it:

* **text**: T5 only, padded to ``max_sequence_length`` (512). T5 itself sees the tokenizer's
  mask (the prompt and ``</s>``); the transformer gets a mask that keeps the prompt, ``</s>``
  *and one pad* (``ChromaPipeline._get_t5_prompt_embeds``), joined with ones for the image
  tokens, as the *outer product* mask·maskᵀ of the whole [txt, img] sequence.
  The mask is a float tensor of 0/1, and ``scaled_dot_product_attention`` *adds* a float mask
  to the scores: kept pairs get +1, the other pads +0. So the pads are not cut out, only
  weighed e⁻¹ against the kept keys. We reproduce that exactly (``joint_probs`` adds a float
  mask as SDPA does); it is diffusers' behaviour, not a choice of ours.
* **guidance**: ordinary CFG with two passes, on when ``guidance_scale`` > 1 (default 5.0);
  a missing negative prompt is "" (encoded, with its own mask).
* **defaults**: 35 steps, 1024² (``default_sample_size`` 128 × VAE factor 8).

Packing, image ids, the schedule (``mu`` shift) and the [txt, img] order are Flux.1's.
"""
from __future__ import annotations

import torch

from ..attention.joint import joint_attention_hooks, joint_attention_layer_names, joint_layer_place
from . import mmdit
from .base import Family
from .conditioning import Conditioning

CHROMA = "chroma"
MAX_SEQUENCE_LENGTH = 512  # the pipeline's default, and its maximum
#: ``ChromaPipeline.__call__``'s defaults. MAG's α is NOT calibrated on real Chroma weights.
DEFAULTS = {"guidance_scale": 5.0, "num_inference_steps": 35, "negative_prompt": "",
            "max_sequence_length": MAX_SEQUENCE_LENGTH}
COMPONENTS = ("ChromaPipeline", {
    "transformer": {("diffusers", "ChromaTransformer2DModel")}, "vae": {("diffusers", "AutoencoderKL")},
    "scheduler": {("diffusers", "FlowMatchEulerDiscreteScheduler")},
    "text_encoder": {("transformers", "T5EncoderModel")},
    "tokenizer": {("transformers", "T5Tokenizer"), ("transformers", "T5TokenizerFast")}})


def is_chroma(pipe) -> bool:
    return type(getattr(pipe, "transformer", None)).__name__ == "ChromaTransformer2DModel"


def encode_prompt(pipe, text: str | None, batch: int = 1, max_sequence_length: int | None = None) -> Conditioning:
    """``text`` ("" for None) -> T5 states and the transformer's text mask, ``batch`` identical rows."""
    length = max_sequence_length or MAX_SEQUENCE_LENGTH
    tokens = pipe.tokenizer([text or ""], padding="max_length", max_length=length, truncation=True,
                            return_tensors="pt")
    device, dtype = pipe.text_encoder.device, pipe.text_encoder.dtype
    with torch.no_grad():
        states = pipe.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device),
                                   output_hidden_states=False)[0].to(dtype)
    # keep the prompt, </s> and the first pad: position <= number of real tokens
    kept = torch.arange(length, device=device)[None] <= tokens.attention_mask.to(device).sum(1, keepdim=True)
    return Conditioning(states.repeat(batch, 1, 1), mask=kept.to(dtype).repeat(batch, 1))


def num_prompt_tokens(pipe, prompt: str, max_sequence_length: int | None = None) -> int:
    """The prompt's T5 tokens with ``</s>`` (the first keys; the kept pad after them belongs to no word)."""
    length = max_sequence_length or MAX_SEQUENCE_LENGTH
    return len(pipe.tokenizer(prompt, truncation=True, max_length=length).input_ids)


def joint_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """[text mask, ones for the image]: ``ChromaPipeline._prepare_attention_mask`` (float: cat promotes the bools)."""
    ones = torch.ones(text_mask.shape[0], image_tokens, device=text_mask.device, dtype=torch.bool)
    return torch.cat([text_mask, ones], dim=1)


def denoise(pipe, latents: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
    """The transformer's velocity for unpacked ``latents`` (one row per row of ``cond``), unpacked."""
    batch, (h, w) = latents.shape[0], latents.shape[-2:]
    t = torch.as_tensor(timestep, device=latents.device).expand(batch).to(latents.dtype)
    text_ids = torch.zeros(cond.embeddings.shape[1], 3, device=latents.device, dtype=cond.embeddings.dtype)
    out = pipe.transformer(hidden_states=mmdit.pack(latents), timestep=t / 1000,
                           encoder_hidden_states=cond.embeddings, txt_ids=text_ids,
                           img_ids=mmdit.image_ids(h, w, latents.device, latents.dtype),
                           attention_mask=joint_mask(cond.mask, (h // 2) * (w // 2)), return_dict=False)[0]
    return mmdit.unpack(out, h, w)


def predict(pipe, latents, t, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
            attention=None) -> torch.Tensor:
    """The guided velocity (float32): the cond pass, then (guidance_scale > 1) the uncond pass and CFG."""
    x = latents.to(pipe.transformer.dtype)
    with torch.no_grad():
        with mmdit._roles(attention, ("cond",) * len(cond)):
            velocity = denoise(pipe, x, t, cond)
        if guidance_scale > 1:  # ChromaPipeline.do_classifier_free_guidance
            with mmdit._roles(attention, ("uncond",) * len(uncond)):
                negative = denoise(pipe, x, t, uncond)
            velocity = negative + guidance_scale * (velocity - negative)
    return velocity.float()


def native_size(pipe) -> tuple[int, int]:
    side = 128 * pipe.vae_scale_factor  # ChromaPipeline.default_sample_size
    return side, side


class ChromaFamily(Family):
    """Chroma: T5 keys with Chroma's mask (text first), 2×2 packed latents, CFG in two passes."""

    name, title, pipeline_class = CHROMA, "Chroma (ChromaPipeline)", COMPONENTS[0]
    components = COMPONENTS[1]
    example = "lodestones/Chroma1-HD"
    options = ("max_sequence_length",)
    defaults = DEFAULTS
    joint_attention = True

    def encode_prompt(self, pipe, text, batch=1, size=None, *, max_sequence_length=None, guidance_scale=None):
        return encode_prompt(pipe, text, batch, max_sequence_length)

    def span_tokenizer(self, pipe, max_sequence_length=None):
        return pipe.tokenizer  # T5: key j = token j (the kept pad after </s> belongs to no word)

    def num_prompt_tokens(self, pipe, prompt, max_sequence_length=None) -> int:
        return num_prompt_tokens(pipe, prompt, max_sequence_length)

    def denoise(self, pipe, model_input, timestep, cond):
        return denoise(pipe, model_input, timestep, cond)

    def predict(self, pipe, scheduler, latents, t, cond, uncond, guidance_scale, true_cfg_scale=1.0, attention=None):
        return predict(pipe, latents, t, cond, uncond, guidance_scale, attention)

    def make_scheduler(self, pipe, num_inference_steps, latent_hw, device=None, scheduler=None):
        return mmdit.flow_scheduler(pipe, num_inference_steps, latent_hw, device, scheduler)  # Flux.1's: sigmas, mu

    def latent_shape(self, pipe, num_images, height, width):
        factor = pipe.vae_scale_factor  # ChromaPipeline.prepare_latents: 2 * (size // (factor * 2))
        channels = pipe.transformer.config.in_channels // 4
        return (num_images, channels, 2 * (height // (factor * 2)), 2 * (width // (factor * 2)))

    def size_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2

    def native_size(self, pipe):
        return native_size(pipe)

    def attention_layer_names(self, pipe):
        return joint_attention_layer_names(pipe.transformer)

    def install_attention_hooks(self, pipe, hooks):
        return joint_attention_hooks(pipe.transformer, hooks)

    def attention_grids(self, pipe, latent_hw):
        return {name: (latent_hw[0] // 2, latent_hw[1] // 2) for name in self.attention_layer_names(pipe)}

    def attention_places(self, pipe):
        return {n: joint_layer_place(pipe.transformer, n) for n in self.attention_layer_names(pipe)}
