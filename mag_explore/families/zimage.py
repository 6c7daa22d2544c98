"""Z-Image (``ZImagePipeline``): Qwen3 caption states, one single-stream sequence [img, cap].

As diffusers 0.42 encodes it:

* **text**: the prompt goes through Qwen3's chat template (``enable_thinking=True``, which
  with Qwen3's template adds no think block): ``<|im_start|>user\\n{prompt}<|im_end|>\\n
  <|im_start|>assistant\\n``, padded to 512, through the language model; the *second to last*
  hidden states (``hidden_states[-2]``) are kept at the real tokens only, so each prompt has a
  caption of its own length. Caption token j is key j: the prompt starts at key 3.
* **transformer**: image tokens (2×2 patches) and caption tokens are refined apart, then each
  padded to a multiple of 32 (pads get learned pad embeddings) and joined as
  [img, img pads, cap, cap pads] for the main ``layers.i.attention`` (one softmax, q/k RMS
  norms, complex rotary). Items of a batch with different lengths are padded to the longest
  and masked. Hooks see rows = the real image tokens, columns = the caption keys.
  The transformer has no ``attn_processors``: hooks go in through each attention module's own
  ``processor`` / ``set_processor`` (diffusers' per-module attention-processor API).
* **guidance**: ``guidance_scale`` > 0 (default 5.0) runs [cond, uncond] in one batch and takes
  pos + g·(pos − neg) (not neg + g·(pos − neg): g = 0 is the conditional prediction); a missing
  negative prompt is "". The transformer's output is the *negative* velocity, and its timestep
  is (1000 − t) / 1000. ``cfg_truncation`` (1.0) and ``cfg_normalization`` (off) are left at
  the pipeline's defaults, where they change nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch

from ..attention.joint import JointAttentionController, JointAttentionProcessor, joint_probs
from ..attention.processor import join_installation
from . import mmdit
from .base import Family
from .conditioning import Conditioning

ZIMAGE = "zimage"
MAX_SEQUENCE_LENGTH = 512
PATCH, SEQ_MULTIPLE = 2, 32  # ZImageTransformer2DModel's patch size and SEQ_MULTI_OF
#: ``ZImagePipeline.__call__``'s defaults. MAG's α is NOT calibrated on real Z-Image weights.
DEFAULTS = {"guidance_scale": 5.0, "num_inference_steps": 50, "negative_prompt": "",
            "max_sequence_length": MAX_SEQUENCE_LENGTH}


def chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


def encode_prompt(pipe, text: str | None, batch: int = 1, max_sequence_length: int | None = None) -> Conditioning:
    """``text`` ("" for None) -> hidden_states[-2] at the caption's real tokens, ``batch`` identical rows."""
    tokens = pipe.tokenizer([chat(pipe.tokenizer, text or "")], padding="max_length",
                            max_length=max_sequence_length or MAX_SEQUENCE_LENGTH, truncation=True,
                            return_tensors="pt").to(pipe.text_encoder.device)
    mask = tokens.attention_mask.bool()
    with torch.no_grad():
        states = pipe.text_encoder(input_ids=tokens.input_ids, attention_mask=mask,
                                   output_hidden_states=True).hidden_states[-2]
    return Conditioning(states[0][mask[0]][None].repeat(batch, 1, 1))


def span_tokenizer(pipe, max_sequence_length: int | None = None):
    """Words -> caption keys: key j = token j of the filled-in chat template."""
    from ..text.keys import TextKeys

    prefix = chat(pipe.tokenizer, "{}").split("{}")[0]  # what the template puts before the prompt
    return TextKeys(pipe.tokenizer, max_sequence_length or MAX_SEQUENCE_LENGTH, prefix=prefix)


def num_prompt_tokens(pipe, prompt: str, max_sequence_length: int | None = None) -> int:
    """The caption keys up to the prompt's last token (the template's 3 opening tokens included)."""
    keys = span_tokenizer(pipe, max_sequence_length).prompt_tokens(prompt)
    return len(keys)


def _call(pipe, latents: torch.Tensor, timestep, captions: list[torch.Tensor]) -> torch.Tensor:
    """The transformer on a batch of latents (b, c, h, w) and one caption per row: its raw output, stacked."""
    t = torch.as_tensor(timestep, device=latents.device).expand(latents.shape[0])
    out = pipe.transformer(list(latents.unsqueeze(2).unbind(0)), (1000 - t) / 1000, captions, return_dict=False)[0]
    return torch.stack([o.float() for o in out]).squeeze(2)


def denoise(pipe, latents: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
    """The velocity the scheduler steps with (the transformer's output, negated)."""
    return -_call(pipe, latents, timestep, list(cond.embeddings.unbind(0)))


def predict(pipe, latents, t, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
            attention=None) -> torch.Tensor:
    """The guided velocity (float32): one batch [cond, uncond] and pos + g·(pos − neg) when g > 0."""
    x = latents.to(pipe.transformer.dtype)
    with torch.no_grad():
        if guidance_scale <= 0 or uncond is None:
            with mmdit._roles(attention, ("cond",) * len(cond)):
                return denoise(pipe, x, t, cond).float()
        captions = list(cond.embeddings.unbind(0)) + list(uncond.embeddings.unbind(0))
        with mmdit._roles(attention, ("cond",) * len(cond) + ("uncond",) * len(uncond)):
            positive, negative = _call(pipe, torch.cat([x, x]), t, captions).chunk(2)
    return -(positive + guidance_scale * (positive - negative))


# --------------------------------------------------------------------------- attention
def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


class ZImageController(JointAttentionController):
    """Reads the image grid and the (padded) caption length from the transformer's list inputs."""

    def _remember_latent(self, module, args, kwargs) -> None:
        images = args[0] if args else kwargs["x"]
        captions = args[2] if len(args) > 2 else kwargs["cap_feats"]
        h, w = images[0].shape[-2:]
        self.latent_hw = (h // PATCH, w // PATCH)
        self.image_tokens = _padded(self.latent_hw[0] * self.latent_hw[1])  # [img, img pads] come first
        self.num_text_tokens = max(_padded(len(c)) for c in captions)

    def joint_context(self, layer, place, batch, heads):
        return replace(super().joint_context(layer, place, batch, heads), text_first=False)  # [img, cap]


class ZImageProcessor(JointAttentionProcessor):
    """Explicit probabilities where a hook is active, in ZSingleStreamAttnProcessor's signature."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        ctx = self.controller.joint_context(self.layer, self.place, hidden_states.shape[0], attn.heads)
        hooks = [hook for hook in self.controller.hooks if hook.active(ctx)]
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        query, key, value = (f(hidden_states).unflatten(-1, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v))
        query = attn.norm_q(query) if attn.norm_q is not None else query
        key = attn.norm_k(key) if attn.norm_k is not None else key
        if freqs_cis is not None:  # complex rotary on channel pairs, as the original
            query, key = (torch.view_as_real(torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
                                             * freqs_cis.unsqueeze(2)).flatten(3).type_as(x) for x in (query, key))
        first = self.controller.image_tokens
        pixels = ctx.height * ctx.width
        block = (slice(0, pixels), slice(first, first + ctx.num_text_tokens))
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        probs = joint_probs(query, key, hooks, ctx, attention_mask, block=block)
        out = (probs.to(value.dtype) @ value).transpose(1, 2).flatten(2).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def attention_layer_names(transformer) -> list[str]:
    """The main layers' attention (the image-only and caption-only refiners see no image→text block)."""
    return [f"layers.{i}.attention" for i in range(len(transformer.layers))]


@contextmanager
def zimage_attention_hooks(transformer, hooks):
    """Run ``hooks`` in the main layers' attention; every module gets back its own processor object on exit."""
    hooks = list(hooks)
    modules = {name: transformer.get_submodule(name) for name in attention_layer_names(transformer)}
    current = next((m.processor.controller for m in modules.values() if isinstance(m.processor, ZImageProcessor)),
                   None)
    if current is not None and current.installed:
        with join_installation(current, hooks):  # nested: join, do not stack
            yield current
        return
    originals = {n: (m.processor.original if isinstance(m.processor, ZImageProcessor) else m.processor)
                 for n, m in modules.items()}
    controller = ZImageController(transformer)
    controller.hooks = hooks
    try:
        for name, module in modules.items():
            module.set_processor(ZImageProcessor(controller, name, "single", originals[name]))
        controller.installed = True
        controller._pre_hook = transformer.register_forward_pre_hook(controller._remember_latent, with_kwargs=True)
        yield controller
    finally:
        controller.installed = False
        if controller._pre_hook is not None:
            controller._pre_hook.remove()
        for name, module in modules.items():
            module.set_processor(originals[name])


class ZImageFamily(Family):
    """Z-Image: Qwen3 caption keys after the image (one stream), 2×2 patches, CFG pos + g·(pos − neg)."""

    name, title, pipeline_class = ZIMAGE, "Z-Image (ZImagePipeline)", "ZImagePipeline"
    components = {
        "transformer": {("diffusers", "ZImageTransformer2DModel")}, "vae": {("diffusers", "AutoencoderKL")},
        "scheduler": {("diffusers", "FlowMatchEulerDiscreteScheduler")},
        "text_encoder": {("transformers", "Qwen3Model"), ("transformers", "Qwen3ForCausalLM")},
        "tokenizer": {("transformers", "Qwen2Tokenizer"), ("transformers", "Qwen2TokenizerFast")}}
    example = "Tongyi-MAI/Z-Image"
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
        return mmdit.flow_scheduler(pipe, num_inference_steps, latent_hw, device, scheduler)  # sigmas, mu: as Flux

    def latent_shape(self, pipe, num_images, height, width):
        factor = pipe.vae_scale_factor  # ZImagePipeline.prepare_latents
        return (num_images, pipe.transformer.config.in_channels, 2 * (height // (factor * 2)),
                2 * (width // (factor * 2)))

    def size_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2

    def native_size(self, pipe):
        return 1024, 1024  # ZImagePipeline: height or 1024

    def attention_layer_names(self, pipe):
        return attention_layer_names(pipe.transformer)

    def install_attention_hooks(self, pipe, hooks):
        return zimage_attention_hooks(pipe.transformer, hooks)

    def attention_grids(self, pipe, latent_hw):
        return {name: (latent_hw[0] // PATCH, latent_hw[1] // PATCH) for name in self.attention_layer_names(pipe)}

    def attention_places(self, pipe):
        return {name: "single" for name in self.attention_layer_names(pipe)}
