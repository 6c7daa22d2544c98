"""Qwen-Image (``QwenImagePipeline``): Qwen2.5-VL text states, joint [txt, img] attention, true CFG.

As diffusers 0.42 encodes it:

* **text**: the prompt is put into a chat template *as a string* (:data:`TEMPLATE`), the whole
  string goes through Qwen2.5-VL's language model, and its last hidden states are kept
  *after the first* :data:`DROP` *= 34 tokens* (the system turn and ``<|im_start|>user\\n``).
  So text key j is template token 34 + j: the prompt's tokens first, then the 5 tokens that
  close the template (``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``). No
  padding for one prompt, so no mask reaches the transformer (the pipeline drops an all-ones
  mask); the keys are cut to ``max_sequence_length`` (512).
* **attention**: every block is double-stream (``QwenDoubleStreamAttnProcessor2_0``): own
  projections and q/k RMS norms for text and image, complex rotary embeddings (image positions
  by frame/row/column, text positions after the image's), one softmax over [txt, img]. The
  processor takes ``encoder_hidden_states_mask`` and refuses an external ``attention_mask``.
* **guidance**: none by default. Only with a negative prompt *and* ``true_cfg_scale`` > 1
  (default 4.0) is there a second pass, and the combined velocity is rescaled to the norm of
  the conditional one (per token).
* **latents**: 2×2 packing as Flux.1; the VAE is a video VAE (one frame) with per-channel
  ``latents_mean`` / ``latents_std``.
"""
from __future__ import annotations

import torch

from ..attention.joint import (JointAttentionProcessor, joint_attention_hooks, joint_attention_layer_names,
                               joint_outputs, joint_probs)
from . import mmdit
from .base import Family
from .conditioning import Conditioning

QWENIMAGE = "qwenimage"
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34  # QwenImagePipeline.prompt_template_encode_start_idx
TOKENIZER_MAX_LENGTH = 1024
MAX_SEQUENCE_LENGTH = 512  # __call__'s default
#: ``QwenImagePipeline.__call__``'s defaults. MAG's α is NOT calibrated on real Qwen-Image weights.
DEFAULTS = {"true_cfg_scale": 4.0, "num_inference_steps": 50, "negative_prompt": None,
            "max_sequence_length": MAX_SEQUENCE_LENGTH}


def encode_prompt(pipe, text: str | None, batch: int = 1, max_sequence_length: int | None = None
                  ) -> Conditioning | None:
    """``text`` -> the language model's last hidden states after the template's first 34 tokens.

    ``None`` (no negative prompt) gives None: no second pass.
    """
    if text is None:
        return None
    tokens = pipe.tokenizer([TEMPLATE.format(text)], max_length=TOKENIZER_MAX_LENGTH + DROP, padding=True,
                            truncation=True, return_tensors="pt").to(pipe.text_encoder.device)
    with torch.no_grad():
        states = pipe.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
    states = states[:, DROP:][:, : max_sequence_length or MAX_SEQUENCE_LENGTH].to(pipe.text_encoder.dtype)
    return Conditioning(states.repeat(batch, 1, 1))


def num_prompt_tokens(pipe, prompt: str, max_sequence_length: int | None = None) -> int:
    """How many leading text keys are the prompt's (the 5 closing template tokens come after)."""
    return min(len(prompt_token_ids(pipe.tokenizer, prompt)), max_sequence_length or MAX_SEQUENCE_LENGTH)


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as they sit in the template (BPE can merge across a boundary, so
    they are read off the tokenized template, not from the prompt alone)."""
    ids = tokenizer(TEMPLATE.format(prompt)).input_ids
    return ids[DROP: len(ids) - 5]


def denoise(pipe, latents: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
    """The transformer's velocity for unpacked ``latents`` (one row per row of ``cond``), unpacked."""
    batch, (h, w) = latents.shape[0], latents.shape[-2:]
    t = torch.as_tensor(timestep, device=latents.device).expand(batch).to(latents.dtype)
    out = pipe.transformer(hidden_states=mmdit.pack(latents), timestep=t / 1000, guidance=None,
                           encoder_hidden_states_mask=cond.mask, encoder_hidden_states=cond.embeddings,
                           img_shapes=[[(1, h // 2, w // 2)]] * batch, return_dict=False)[0]
    return mmdit.unpack(out, h, w)


def predict(pipe, latents, t, cond: Conditioning, uncond: Conditioning | None, true_cfg_scale: float,
            attention=None) -> torch.Tensor:
    """The guided velocity (float32): the cond pass; with a negative prompt and true_cfg_scale > 1 also
    the uncond pass, combined and rescaled to the cond velocity's norm (QwenImagePipeline)."""
    x = latents.to(pipe.transformer.dtype)
    with torch.no_grad():
        with mmdit._roles(attention, ("cond",) * len(cond)):
            velocity = denoise(pipe, x, t, cond)
        if uncond is None or true_cfg_scale <= 1:
            return velocity.float()
        with mmdit._roles(attention, ("uncond",) * len(uncond)):
            negative = denoise(pipe, x, t, uncond)
    # the pipeline works on packed tokens: norms per token over its 4c packed channels
    h, w = latents.shape[-2:]
    velocity, negative = mmdit.pack(velocity), mmdit.pack(negative)
    combined = negative + true_cfg_scale * (velocity - negative)
    combined = combined * (velocity.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    return mmdit.unpack(combined, h, w).float()


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Unpacked latents -> the VAE's image in [-1, 1] (QwenImagePipeline: one video frame, mean/std per channel)."""
    config = pipe.vae.config
    x = latents[:, :, None].to(pipe.vae.dtype)
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(x)
    std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(x)
    return pipe.vae.decode(x / std + mean, return_dict=False)[0][:, :, 0]


# --------------------------------------------------------------------------- attention
def qwen_place(transformer, layer: str) -> str:
    return "double"  # every Qwen-Image block is double-stream: [txt, img]


def qwen_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Queries, keys, values (batch, heads, sequence, dim) of QwenDoubleStreamAttnProcessor2_0: [txt, img]."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    head_dim = attn.inner_dim // attn.heads
    split = lambda x: x.unflatten(-1, (-1, head_dim))  # noqa: E731
    img = [split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v)]
    txt = [split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
    for part, norms in ((img, (attn.norm_q, attn.norm_k)), (txt, (attn.norm_added_q, attn.norm_added_k))):
        for i, norm in enumerate(norms):
            if norm is not None:
                part[i] = norm(part[i])
    if image_rotary_emb is not None:
        img_freqs, txt_freqs = image_rotary_emb
        for part, freqs in ((img, img_freqs), (txt, txt_freqs)):
            part[0], part[1] = (apply_rotary_emb_qwen(x, freqs, use_real=False) for x in part[:2])
    return (torch.cat([t, i], dim=1).transpose(1, 2) for t, i in zip(txt, img))


class QwenJointProcessor(JointAttentionProcessor):
    """Explicit probabilities where a hook is active, in QwenDoubleStreamAttnProcessor2_0's signature
    (``Attention.forward`` passes only the keyword arguments a processor names)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        ctx = self.controller.joint_context(self.layer, self.place, hidden_states.shape[0], attn.heads)
        hooks = [hook for hook in self.controller.hooks if hook.active(ctx)]
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)
        if attention_mask is not None:  # as the original: it builds its own mask
            raise ValueError(f"{self.layer}: QwenDoubleStreamAttnProcessor2_0 accepts no external attention_mask")
        mask = None
        if encoder_hidden_states_mask is not None:  # [text mask, image ones], as the original
            ones = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask.bool(), ones], dim=1)  # 0/1: which keys are kept
        query, key, value = qwen_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        probs = joint_probs(query, key, hooks, ctx, mask)
        out = (probs.to(value.dtype) @ value).transpose(1, 2).flatten(2).to(query.dtype)
        image, text = joint_outputs(attn, out, hidden_states, encoder_hidden_states, True)
        return image, text


def span_tokenizer(pipe, max_sequence_length: int | None = None):
    """Words -> text keys through the template: key j is template token 34 + j."""
    from ..text.keys import TextKeys

    length = max_sequence_length or MAX_SEQUENCE_LENGTH
    prefix = TEMPLATE[: TEMPLATE.index("{}")]  # what follows the prompt starts with a special token: no merge
    return TextKeys(pipe.tokenizer, DROP + length, prefix=prefix, keep=range(DROP, DROP + length))


class QwenImageFamily(Family):
    """Qwen-Image: Qwen2.5-VL keys after a template (text first), 2×2 packed latents, true CFG."""

    name, title, pipeline_class = QWENIMAGE, "Qwen-Image (QwenImagePipeline)", "QwenImagePipeline"
    components = {
        "transformer": {("diffusers", "QwenImageTransformer2DModel")},
        "vae": {("diffusers", "AutoencoderKLQwenImage")},
        "scheduler": {("diffusers", "FlowMatchEulerDiscreteScheduler")},
        "text_encoder": {("transformers", "Qwen2_5_VLForConditionalGeneration")},
        "tokenizer": {("transformers", "Qwen2Tokenizer"), ("transformers", "Qwen2TokenizerFast")}}
    example = "Qwen/Qwen-Image"
    options = ("true_cfg_scale", "max_sequence_length")
    defaults = DEFAULTS
    joint_attention = True

    def encode_prompt(self, pipe, text, batch=1, size=None, *, max_sequence_length=None, guidance_scale=None):
        return encode_prompt(pipe, text, batch, max_sequence_length)

    def span_tokenizer(self, pipe, max_sequence_length=None):
        return span_tokenizer(pipe, max_sequence_length)

    def num_prompt_tokens(self, pipe, prompt, max_sequence_length=None) -> int:
        return num_prompt_tokens(pipe, prompt, max_sequence_length)

    def denoise(self, pipe, model_input, timestep, cond):
        return denoise(pipe, model_input, timestep, cond)

    def predict(self, pipe, scheduler, latents, t, cond, uncond, guidance_scale, true_cfg_scale=1.0, attention=None):
        return predict(pipe, latents, t, cond, uncond, true_cfg_scale, attention)

    def make_scheduler(self, pipe, num_inference_steps, latent_hw, device=None, scheduler=None):
        return mmdit.flow_scheduler(pipe, num_inference_steps, latent_hw, device, scheduler)  # sigmas and mu, as Flux

    def latent_shape(self, pipe, num_images, height, width):
        factor = pipe.vae_scale_factor  # QwenImagePipeline.prepare_latents: 2 * (size // (factor * 2))
        return (num_images, pipe.transformer.config.in_channels // 4, 2 * (height // (factor * 2)),
                2 * (width // (factor * 2)))

    def size_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2

    def native_size(self, pipe):
        side = 128 * pipe.vae_scale_factor  # QwenImagePipeline.default_sample_size
        return side, side

    def decode(self, pipe, latents):
        with torch.no_grad():
            return decode_latents(pipe, latents)

    def attention_layer_names(self, pipe):
        return joint_attention_layer_names(pipe.transformer)

    def install_attention_hooks(self, pipe, hooks):
        return joint_attention_hooks(pipe.transformer, hooks, QwenJointProcessor, qwen_place)

    def attention_grids(self, pipe, latent_hw):
        return {name: (latent_hw[0] // 2, latent_hw[1] // 2) for name in self.attention_layer_names(pipe)}

    def attention_places(self, pipe):
        return {name: "double" for name in self.attention_layer_names(pipe)}
