"""Flux.2 Klein (``Flux2KleinPipeline``): Qwen3 states of three layers, joint [txt, img] attention.

As diffusers 0.42 encodes it:

* **text**: Qwen3's chat template with ``enable_thinking=False``: ``<|im_start|>user\\n{prompt}
  <|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``, padded to 512, through the
  language model; the hidden states of layers 9, 18 and 27 are *joined per token* (features
  3 × hidden). All 512 positions are keys (pads included) and no mask reaches the transformer.
  Key j = template token j, so the prompt starts at key 3. Text ids are 4-axis (0, 0, 0, j).
* **latents**: the noise is drawn already patchified, (batch, 4c, h/2, w/2), and packed row by
  row into tokens with ids (0, row, column, 0); the VAE decodes after undoing its batch-norm
  statistics and the 2×2 patchify.
* **attention**: double-stream blocks (``Flux2Attention``: own text projections, [txt, img])
  then single-stream blocks (``Flux2ParallelSelfAttention``: one fused matrix makes q, k, v
  *and* the MLP input); q/k RMS norms and rotary embeddings as Flux.1.
* **guidance**: CFG with a fixed "" negative prompt when ``guidance_scale`` > 1 (default 4.0)
  and the model is not ``is_distilled``; ``__call__``'s first positional argument is ``image``
  (call it with ``prompt=``). The schedule's shift ``mu`` is ``compute_empirical_mu``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..attention.joint import (JointAttentionProcessor, joint_attention_hooks, joint_attention_layer_names,
                               joint_layer_place, joint_outputs, joint_probs)
from . import mmdit
from .base import Family
from .conditioning import Conditioning

FLUX2 = "flux2_klein"
MAX_SEQUENCE_LENGTH = 512
LAYERS = (9, 18, 27)  # text_encoder_out_layers
#: ``Flux2KleinPipeline.__call__``'s defaults. MAG's α is NOT calibrated on real Flux.2 weights.
DEFAULTS = {"guidance_scale": 4.0, "num_inference_steps": 50, "negative_prompt": "",
            "max_sequence_length": MAX_SEQUENCE_LENGTH}


def chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def encode_prompt(pipe, text: str | None, batch: int = 1, max_sequence_length: int | None = None) -> Conditioning:
    """``text`` ("" for None) -> Qwen3's states of layers 9, 18, 27 joined per token, ``batch`` identical rows."""
    tokens = pipe.tokenizer(chat(pipe.tokenizer, text or ""), return_tensors="pt", padding="max_length",
                            truncation=True, max_length=max_sequence_length or MAX_SEQUENCE_LENGTH)
    tokens = tokens.to(pipe.text_encoder.device)
    with torch.no_grad():
        out = pipe.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                output_hidden_states=True, use_cache=False)
    states = torch.stack([out.hidden_states[k] for k in LAYERS], dim=1).to(pipe.text_encoder.dtype)
    b, layers, length, width = states.shape
    return Conditioning(states.permute(0, 2, 1, 3).reshape(b, length, layers * width).repeat(batch, 1, 1))


def span_tokenizer(pipe, max_sequence_length: int | None = None):
    """Words -> keys: key j = token j of the filled-in chat template (the prompt starts at 3)."""
    from ..text.keys import TextKeys

    prefix = chat(pipe.tokenizer, "{}").split("{}")[0]
    return TextKeys(pipe.tokenizer, max_sequence_length or MAX_SEQUENCE_LENGTH, prefix=prefix)


def num_prompt_tokens(pipe, prompt: str, max_sequence_length: int | None = None) -> int:
    return len(span_tokenizer(pipe, max_sequence_length).prompt_tokens(prompt))


def denoise(pipe, latents: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
    """The transformer's velocity for patchified latents (b, 4c, h, w), in that shape."""
    b, c, h, w = latents.shape
    t = torch.as_tensor(timestep, device=latents.device).expand(b).to(latents.dtype)
    length = cond.embeddings.shape[1]
    # 4-axis ids (t, h, w, l) as Flux2KleinPipeline: text (0, 0, 0, j), image (0, row, column, 0)
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    out = pipe.transformer(hidden_states=latents.reshape(b, c, h * w).permute(0, 2, 1), timestep=t / 1000,
                           guidance=None, encoder_hidden_states=cond.embeddings,
                           txt_ids=text_ids[None].expand(b, -1, -1).to(latents.device),
                           img_ids=image_ids[None].expand(b, -1, -1).to(latents.device), return_dict=False)[0]
    return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w)


def predict(pipe, latents, t, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
            attention=None) -> torch.Tensor:
    """The guided velocity (float32): cond pass, then (g > 1, not distilled) the "" pass and CFG."""
    x = latents.to(pipe.transformer.dtype)
    with torch.no_grad():
        with mmdit._roles(attention, ("cond",) * len(cond)):
            velocity = denoise(pipe, x, t, cond)
        if guidance_scale > 1 and not pipe.config.is_distilled and uncond is not None:
            with mmdit._roles(attention, ("uncond",) * len(uncond)):
                negative = denoise(pipe, x, t, uncond)
            velocity = negative + guidance_scale * (velocity - negative)
    return velocity.float()


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Flux.2's schedule shift, fitted on the number of image tokens and of steps (the pipeline's)."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


def flow_scheduler(pipe, num_inference_steps, latent_hw, device=None, scheduler=None):
    if scheduler is None:
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps,
                                                                              num_inference_steps)
    mu = compute_empirical_mu(latent_hw[0] * latent_hw[1], num_inference_steps)
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Patchified latents -> the VAE's image: undo the batch-norm statistics, unpatchify, decode."""
    vae = pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
    x = latents * std + mean
    b, c, h, w = x.shape  # Flux2KleinPipeline._unpatchify_latents
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
    with torch.no_grad():
        return vae.decode(x.to(vae.dtype), return_dict=False)[0]


# --------------------------------------------------------------------------- attention
def flux2_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Queries, keys, values (batch, heads, sequence, dim), [txt, img]; the single-stream MLP input too."""
    from diffusers.models.embeddings import apply_rotary_emb

    mlp = None
    if hasattr(attn, "to_qkv_mlp_proj"):  # single-stream: one fused matrix, q k v first (global ratio)
        fused = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = fused.split([3 * attn.inner_dim, fused.shape[-1] - 3 * attn.inner_dim], dim=-1)
        parts = list(qkv.chunk(3, dim=-1))
    else:
        parts = [attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)]
    parts = [x.unflatten(-1, (-1, attn.head_dim)) for x in parts]
    parts[0], parts[1] = attn.norm_q(parts[0]), attn.norm_k(parts[1])
    if encoder_hidden_states is not None and getattr(attn, "added_kv_proj_dim", None) is not None:
        text = [f(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        text[0], text[1] = attn.norm_added_q(text[0]), attn.norm_added_k(text[1])
        parts = [torch.cat(pair, dim=1) for pair in zip(text, parts)]
    if image_rotary_emb is not None:
        parts[0], parts[1] = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in parts[:2])
    return [x.transpose(1, 2) for x in parts], mlp


class Flux2Processor(JointAttentionProcessor):
    """Explicit probabilities where a hook is active, in Flux2AttnProcessor's signature (double-stream)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        ctx = self.controller.joint_context(self.layer, self.place, hidden_states.shape[0], attn.heads)
        hooks = [hook for hook in self.controller.hooks if hook.active(ctx)]
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.explicit(attn, hooks, ctx, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def explicit(self, attn, hooks, ctx, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        (query, key, value), mlp = flux2_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        probs = joint_probs(query, key, hooks, ctx, attention_mask)
        out = (probs.to(value.dtype) @ value).transpose(1, 2).flatten(2).to(query.dtype)
        if mlp is not None:  # single-stream: attention and MLP share the output projection
            return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))
        return joint_outputs(attn, out, hidden_states, encoder_hidden_states, True)


class Flux2SingleProcessor(Flux2Processor):
    """The same in Flux2ParallelSelfAttnProcessor's signature: its module passes (hidden, mask, rotary) by position."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        ctx = self.controller.joint_context(self.layer, self.place, hidden_states.shape[0], attn.heads)
        hooks = [hook for hook in self.controller.hooks if hook.active(ctx)]
        if not hooks:
            return self.original(attn, hidden_states, attention_mask, image_rotary_emb)
        return self.explicit(attn, hooks, ctx, hidden_states, None, attention_mask, image_rotary_emb)


def flux2_processor(controller, layer: str, place: str, original):
    """The processor for one layer: the single-stream modules call theirs with other arguments."""
    return (Flux2SingleProcessor if place == "single" else Flux2Processor)(controller, layer, place, original)


class Flux2KleinFamily(Family):
    """Flux.2 Klein: Qwen3 keys (three layers joined, text first), patchified latents, CFG with ""."""

    name, title, pipeline_class = FLUX2, "Flux.2 Klein (Flux2KleinPipeline)", "Flux2KleinPipeline"
    components = {
        "transformer": {("diffusers", "Flux2Transformer2DModel")}, "vae": {("diffusers", "AutoencoderKLFlux2")},
        "scheduler": {("diffusers", "FlowMatchEulerDiscreteScheduler")},
        "text_encoder": {("transformers", "Qwen3ForCausalLM")},
        "tokenizer": {("transformers", "Qwen2Tokenizer"), ("transformers", "Qwen2TokenizerFast")}}
    example = "black-forest-labs/FLUX.2-klein-4B"
    options = ("max_sequence_length",)
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
        return predict(pipe, latents, t, cond, uncond, guidance_scale, attention)

    def make_scheduler(self, pipe, num_inference_steps, latent_hw, device=None, scheduler=None):
        return flow_scheduler(pipe, num_inference_steps, latent_hw, device, scheduler)

    def latent_shape(self, pipe, num_images, height, width):
        factor = pipe.vae_scale_factor * 2  # Flux2KleinPipeline.prepare_latents: patchified noise
        return (num_images, pipe.transformer.config.in_channels, height // factor, width // factor)

    def size_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2

    def native_size(self, pipe):
        side = 128 * pipe.vae_scale_factor  # default_sample_size
        return side, side

    def decode(self, pipe, latents):
        return decode(pipe, latents)

    def attention_layer_names(self, pipe):
        return joint_attention_layer_names(pipe.transformer)

    def install_attention_hooks(self, pipe, hooks):
        return joint_attention_hooks(pipe.transformer, hooks, flux2_processor)

    def attention_grids(self, pipe, latent_hw):
        return {name: tuple(latent_hw) for name in self.attention_layer_names(pipe)}  # one token per latent cell

    def attention_places(self, pipe):
        return {n: joint_layer_place(pipe.transformer, n) for n in self.attention_layer_names(pipe)}
