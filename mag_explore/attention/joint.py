"""Hooks on the joint attention of MMDiT transformers (Flux.1, SD3), and taking them off again.

In an MMDiT block text and image tokens are concatenated into one sequence and attend to
each other in one softmax; there is no separate cross-attention. The *image→text block*
of that softmax (rows: image tokens, columns: text tokens) is what plays the role of a
cross-attention map, and it is what hooks see, shaped (batch, heads, image tokens, text
tokens) as on the UNet path. Its rows do not sum to one: the rest of each row's mass is
on the image tokens (image→image).

* **Flux.1**: double-stream blocks (``transformer_blocks.i.attn``, place "double": separate
  text and image projections, text first) and single-stream blocks
  (``single_transformer_blocks.i.attn``, place "single": one sequence [text, image] with
  shared projections); rotary position embeddings on queries and keys, applied as diffusers
  does (``apply_rotary_emb``, ``sequence_dim=1``).
* **SD3**: ``transformer_blocks.i.attn``, place "joint": image first, then the text
  (77 CLIP + T5); no rotary embeddings. The last block is ``context_pre_only``: its text
  output is not projected (and unused), as in diffusers' ``JointAttnProcessor2_0``.
  SD3.5's extra image-only self-attention (``attn2``) is left alone.

Every layer where no hook is active runs the processor it had (the fused kernel); the
installation uses the public ``attn_processors`` / ``set_attn_processor`` API and puts back
exactly the objects that were there on exit, also after an exception or an interrupt.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from .hooks import AttentionContext, AttentionHook
from .processor import AttentionController, join_installation


def joint_attention_layer_names(transformer) -> list[str]:
    """The transformer's joint-attention layers, in the order they run (double, then single blocks)."""
    return [name[: -len(".processor")] for name in transformer.attn_processors if name.endswith(".attn.processor")]


def joint_layer_place(transformer, layer: str) -> str:
    """"single" (Flux single-stream), "double" (Flux double-stream) or "joint" (SD3)."""
    if layer.startswith("single_transformer_blocks"):
        return "single"
    return "double" if hasattr(transformer, "single_transformer_blocks") else "joint"


class JointAttentionController(AttentionController):
    """The installation's shared state; reads the image grid and the text length from each forward call."""

    def __init__(self, transformer):
        super().__init__(transformer)
        self.num_text_tokens: int | None = None

    def _remember_latent(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        text = kwargs.get("encoder_hidden_states")
        self.num_text_tokens = None if text is None else text.shape[1]
        if hidden.ndim == 4:  # SD3: (batch, channels, h, w) latents, cut into patch_size² patches
            patch = module.config.patch_size
            self.latent_hw = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
        elif "img_shapes" in kwargs:  # Qwen-Image: packed tokens; img_shapes lists (frames, rows, columns)
            self.latent_hw = tuple(int(n) for n in kwargs["img_shapes"][0][0][1:])
        else:  # Flux: packed tokens; img_ids hold each token's (0, row, column)
            ids = kwargs["img_ids"]
            self.latent_hw = (int(ids[..., 1].max()) + 1, int(ids[..., 2].max()) + 1)
        if self.step_index is None and kwargs.get("timestep") is not None:
            self.timestep = int(torch.as_tensor(kwargs["timestep"]).flatten()[0])

    def joint_context(self, layer: str, place: str, batch: int, heads: int) -> AttentionContext:
        roles = self.batch_roles
        if roles is None or len(roles) != batch:  # SD3 pipeline call: [uncond…, cond…]; Flux: one half per call
            roles = ("uncond",) * (batch // 2) + ("cond",) * (batch - batch // 2) if batch % 2 == 0 else ("cond",) * batch
        h, w = self.latent_hw
        return AttentionContext(
            layer=layer, place=place, height=h, width=w, heads=heads, step_index=self.step_index,
            timestep=self.timestep, batch_roles=tuple(roles), phase=self.phase,
            num_prompt_tokens=self.num_prompt_tokens, num_text_tokens=self.num_text_tokens,
            text_first=place != "joint")


class JointAttentionProcessor:
    """Joint attention with explicit probabilities where a hook is active; the original elsewhere."""

    def __init__(self, controller: JointAttentionController, layer: str, place: str, original):
        self.controller, self.layer, self.place = controller, layer, place
        self.original = original  # the processor we replaced; put back on exit

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        ctx = self.controller.joint_context(self.layer, self.place, hidden_states.shape[0], attn.heads)
        hooks = [hook for hook in self.controller.hooks if hook.active(ctx)]
        if not hooks:
            rotary = () if image_rotary_emb is None else (image_rotary_emb,)  # SD3's processor takes none
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *rotary, **kwargs)
        if ctx.text_first:
            query, key, value = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        else:
            query, key, value = sd3_qkv(attn, hidden_states, encoder_hidden_states)
        probs = joint_probs(query, key, hooks, ctx, attention_mask)
        out = (probs.to(value.dtype) @ value).transpose(1, 2).flatten(2).to(query.dtype)
        return joint_outputs(attn, out, hidden_states, encoder_hidden_states, ctx.text_first)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (batch, sequence, heads, dim)


def flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Queries, keys, values (batch, heads, sequence, dim) of FluxAttnProcessor: [text, image], rotary applied."""
    from diffusers.models.embeddings import apply_rotary_emb

    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key, value = (_heads(x, attn.head_dim) for x in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:  # double-stream: own text projections
        if attn.fused_projections:
            text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                    attn.add_v_proj(encoder_hidden_states))
        text_q, text_k, text_v = (_heads(x, attn.head_dim) for x in text)
        text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((text_q, query), (text_k, key), (text_v, value)))
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return (x.transpose(1, 2) for x in (query, key, value))


def sd3_qkv(attn, hidden_states, encoder_hidden_states):
    """Queries, keys, values (batch, heads, sequence, dim) of JointAttnProcessor2_0: [image, text]."""
    head_dim = attn.to_k.out_features // attn.heads

    def project(x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (_heads(f(x), head_dim).transpose(1, 2) for f in (to_q, to_k, to_v))
        return (norm_q(q) if norm_q is not None else q), (norm_k(k) if norm_k is not None else k), v

    image = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    text = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                   attn.norm_added_q, attn.norm_added_k)
    return (torch.cat(pair, dim=2) for pair in zip(image, text))


def image_text_block(ctx: AttentionContext, sequence: int) -> tuple[slice, slice]:
    """(rows of the image tokens, columns of the text tokens) in a joint sequence of ``sequence`` tokens."""
    text = ctx.num_text_tokens
    if ctx.text_first:
        return slice(text, sequence), slice(0, text)
    return slice(0, sequence - text), slice(sequence - text, sequence)


def joint_probs(query, key, hooks, ctx, attention_mask=None, block=None) -> torch.Tensor:
    """softmax(QKᵀ/√d + mask) over the whole joint sequence in float32; hooks act on its image→text block.

    ``attention_mask`` as scaled_dot_product_attention reads it (Chroma passes one): a bool
    mask keeps the True keys, a float mask is *added* to the scores. ``block``: (rows, columns)
    of the image→text block where :func:`image_text_block` does not find it (Z-Image's pads).
    """
    scores = (query.float() @ key.float().transpose(-1, -2)) * query.shape[-1] ** -0.5
    if attention_mask is not None:
        if attention_mask.ndim == 2:  # (batch, keys), as diffusers' native backend widens it
            attention_mask = attention_mask[:, None, None, :]
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask.float())
    rows, cols = block or image_text_block(ctx, scores.shape[-1])
    for hook in hooks:
        edited = hook.edit_scores(scores[..., rows, cols], ctx)
        if edited is not None:
            scores = scores.clone()
            scores[..., rows, cols] = edited
    probs = scores.softmax(dim=-1)
    for hook in hooks:
        edited = hook.edit_probs(probs[..., rows, cols], ctx)
        if edited is not None:
            probs = probs.clone()
            probs[..., rows, cols] = edited
    for hook in hooks:
        hook.observe(probs[..., rows, cols], ctx)
        if hasattr(hook, "observe_joint"):
            hook.observe_joint(probs, ctx)
    return probs


def joint_outputs(attn, out, hidden_states, encoder_hidden_states, text_first: bool):
    """The attention output split and projected as diffusers' processors do."""
    if encoder_hidden_states is None:  # Flux single-stream: one sequence out, projected by the block
        return out
    if text_first:  # Flux double-stream
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())
    image, text = out[:, : hidden_states.shape[1]], out[:, hidden_states.shape[1]:]  # SD3
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    return attn.to_out[1](attn.to_out[0](image)), text


@contextmanager
def joint_attention_hooks(transformer, hooks: Iterable[AttentionHook], processor=None,
                          place=joint_layer_place) -> Iterator[JointAttentionController]:
    """Run ``hooks`` on every joint-attention layer of a Flux or SD3 ``transformer`` inside a ``with`` block.

    A family whose attention takes other arguments (Qwen-Image) gives its own ``processor``
    class (a :class:`JointAttentionProcessor` subclass) and ``place(transformer, layer)``.
    """
    processor = processor or JointAttentionProcessor
    hooks = list(hooks)
    current = next((p.controller for p in transformer.attn_processors.values()
                    if isinstance(p, JointAttentionProcessor)), None)
    if current is not None and current.installed:
        with join_installation(current, hooks):  # nested: join, do not stack
            yield current
        return
    originals = transformer.attn_processors
    if current is not None:  # left behind by a block entered by hand and never left: unwrap first
        originals = {n: (p.original if isinstance(p, JointAttentionProcessor) else p) for n, p in originals.items()}
    controller = JointAttentionController(transformer)
    controller.hooks = hooks
    layers = set(joint_attention_layer_names(transformer))
    ours = {name: processor(controller, name[: -len(".processor")], place(transformer, name), p)
            if name[: -len(".processor")] in layers else p for name, p in originals.items()}
    try:
        transformer.set_attn_processor(ours)
        controller.installed = True
        controller._pre_hook = transformer.register_forward_pre_hook(controller._remember_latent, with_kwargs=True)
        yield controller
    finally:
        controller.installed = False
        if controller._pre_hook is not None:
            controller._pre_hook.remove()
        transformer.set_attn_processor(dict(originals))
