"""Install hooks on the cross-attention layers of a UNet, and take them off again.

It touches diffusers' attention through the public attention-processor API only
(``unet.attn_processors`` / ``unet.set_attn_processor``); its siblings do the same for joint
attention (``attention.joint``), and each family file (``families/``) holds what else of a
pipeline it must know:

* only the *cross*-attention layers (``attn2``, 77 text keys) get our processor, which
  computes the probabilities explicitly so hooks can see and change them;
* self-attention layers keep whatever processor they had (normally PyTorch's fused
  scaled-dot-product attention, which never materialises its probabilities);
* on exit - normal, exception or KeyboardInterrupt - every layer gets back exactly
  the processor object it had before, user-set custom processors included;
* entering again while hooks are installed (nested ``with`` blocks, or a notebook cell
  re-run after an interrupted one) never stacks processors: the inner block adds its
  hooks to the processors already there and removes them when it ends.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from .hooks import AttentionContext, AttentionHook


def cross_attention_layer_names(unet) -> list[str]:
    """Names of the UNet's cross-attention layers, in the order they run (down, mid, up)."""
    names = [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]
    order = {"down": 0, "mid": 1, "up": 2}
    return sorted(names, key=lambda name: order.get(layer_place(name), 3))  # stable: keeps order within a half


def layer_place(layer: str) -> str:
    """The UNet half a layer belongs to: "down", "mid" or "up"; "block" in a transformer; else "other"."""
    halves = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up", "transformer_blocks": "block"}
    return halves.get(layer.split(".")[0], "other")  # "block": a cross-attention transformer (PixArt-Σ, Sana)


def attention_grid(latent_hw: tuple[int, int], pixels: int) -> tuple[int, int]:
    """The h×w grid of a layer with ``pixels`` queries, from the latent's own h×w.

    Each UNet level halves the size with a stride-2 convolution (rounding up), so we
    walk down from the latent instead of taking a square root: 64×96 latents give
    layers of 64×96, 32×48, 16×24 and 8×12, and odd sizes round the way the UNet does.
    """
    h, w = latent_hw
    while h * w > pixels:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != pixels:
        raise ValueError(f"cannot place {pixels} attention queries on a grid derived from latents {latent_hw}")
    return h, w


def cross_attention_grids(unet, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Each cross-attention layer's h×w grid for latents of ``latent_hw``, without running the UNet.

    Level k (down block k, the mid block at the deepest level, up block j at level
    n − 1 − j) is the latent halved k times, rounding up as the UNet's convolutions do.
    """
    levels = len(unet.config.block_out_channels)
    grids = {}
    for name in cross_attention_layer_names(unet):
        block, index = name.split(".")[:2]
        if block == "mid_block":
            level = levels - 1
        else:
            level = int(index) if block == "down_blocks" else levels - 1 - int(index)
        h, w = latent_hw
        for _ in range(level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        grids[name] = (h, w)
    return grids


class AttentionController:
    """Shared state of one installation: the hooks, and where the sampler is."""

    def __init__(self, unet):
        self.unet = unet
        self.hooks: list[AttentionHook] = []
        self.step_index: int | None = None
        self.timestep: int | None = None
        self.batch_roles: tuple[str, ...] | None = None  # None: infer (diffusers puts uncond first)
        self.phase = "denoise"
        self.num_prompt_tokens: int | None = None
        self.latent_hw: tuple[int, int] | None = None
        self.installed = False
        self._grids: dict[tuple, tuple[int, int]] = {}
        self._pre_hook = None

    # -- what the sampler tells us -------------------------------------------------
    def set_step(self, step_index: int | None, timestep) -> None:
        self.step_index = step_index
        self.timestep = None if timestep is None else int(timestep)

    @contextmanager
    def phase_as(self, phase: str, batch_roles: tuple[str, ...] | None = None) -> Iterator[None]:
        """Temporarily mark forward passes, e.g. ``with ctl.phase_as("guidance", ("cond",))``."""
        saved = (self.phase, self.batch_roles)
        self.phase, self.batch_roles = phase, batch_roles
        try:
            yield
        finally:
            self.phase, self.batch_roles = saved

    def _remember_latent(self, module, args, kwargs) -> None:
        # A forward pre-hook on the UNet: read the latent's h×w (and t, if no sampler sets it).
        # a UNet's latent is `sample`; a transformer's (PixArt, Sana: (b, c, h, w) as well) `hidden_states`
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.latent_hw = tuple(sample.shape[-2:])
        if self.step_index is None:
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            if t is not None:
                self.timestep = int(torch.as_tensor(t).flatten()[0])

    # -- what the processor asks ---------------------------------------------------
    def context(self, layer: str, pixels: int, batch: int, heads: int) -> AttentionContext:
        key = (self.latent_hw, pixels)
        if key not in self._grids:
            self._grids[key] = attention_grid(self.latent_hw, pixels)
        h, w = self._grids[key]
        roles = self.batch_roles
        if roles is None or len(roles) != batch:  # plain pipeline call: [uncond…, cond…] when even
            roles = ("uncond",) * (batch // 2) + ("cond",) * (batch - batch // 2) if batch % 2 == 0 else ("cond",) * batch
        return AttentionContext(
            layer=layer, place=layer_place(layer), height=h, width=w, heads=heads,
            step_index=self.step_index, timestep=self.timestep, batch_roles=tuple(roles),
            phase=self.phase, num_prompt_tokens=self.num_prompt_tokens,
        )


class CrossAttentionProcessor:
    """Cross-attention with explicit probabilities that hooks can read and edit.

    Where a hook is active, mirrors diffusers' ``AttnProcessor2_0`` step by step, except
    that the product softmax(QKᵀ/√d)·V is written out, in float32, so hooks can act in
    between. Where none is, the processor it replaced runs unchanged (the fused kernel).
    """

    def __init__(self, controller: AttentionController, layer: str, original):
        self.controller = controller
        self.layer = layer
        self.original = original  # the processor we replaced; put back on exit

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:  # used as self-attention: nothing for our hooks
            return self._original(attn, hidden_states, None, attention_mask, temb, args, kwargs)
        # Which hooks act here and now; none (swap after its steps, MAG outside its guidance
        # pass, a store between captured steps): the processor we replaced runs, as if we were
        # not installed - PyTorch's fused kernel, which never materialises the probabilities.
        batch = hidden_states.shape[0]
        pixels = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        ctx = self.controller.context(self.layer, pixels, batch, attn.heads)
        hooks = [hook for hook in self.controller.hooks if hook.active(ctx)]
        if not hooks:
            return self._original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, pixels, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # q/k norms across all heads (Sana's "rms_norm_across_heads") act before the split, per-head ones after
        query, key = (_norm(n, x, True, heads) for n, x in ((attn.norm_q, query), (attn.norm_k, key)))
        # (batch, sequence, heads·dim) -> (batch, heads, sequence, dim)
        query, key, value = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))
        query, key = (_norm(n, x, False, heads) for n, x in ((attn.norm_q, query), (attn.norm_k, key)))

        probs = self.attention_probs(attn, query, key, attention_mask, batch, hooks, ctx)
        hidden_states = probs.to(value.dtype) @ value
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _original(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs):
        """The replaced processor, called with the arguments it was given (Sana's takes no ``temb``)."""
        extra = (temb, *args) if temb is not None or args else ()
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *extra, **kwargs)

    @staticmethod
    def attention_probs(attn, query, key, attention_mask, batch, hooks, ctx) -> torch.Tensor:
        """softmax(QKᵀ·scale + mask) in float32, passed through the hooks."""
        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
        for hook in hooks:
            edited = hook.edit_scores(scores, ctx)
            scores = scores if edited is None else edited
        probs = scores.softmax(dim=-1)
        for hook in hooks:
            edited = hook.edit_probs(probs, ctx)
            probs = probs if edited is None else edited
        for hook in hooks:
            hook.observe(probs, ctx)
        return probs


def _norm(norm, x: torch.Tensor, across_heads: bool, heads: int) -> torch.Tensor:
    """``norm(x)`` at the stage it belongs to: before the head split if its width is all heads' (Sana's
    "rms_norm_across_heads"), after it otherwise (per head, as ``AttnProcessor2_0``)."""
    if norm is None:
        return x
    size = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
    width = int(size[-1]) if size is not None and len(size) else None
    whole = heads > 1 and width is not None and width == (x.shape[-1] if across_heads else x.shape[-1] * heads)
    return norm(x) if whole == across_heads else x


def _installed_controller(unet) -> AttentionController | None:
    for processor in unet.attn_processors.values():
        if isinstance(processor, CrossAttentionProcessor):
            return processor.controller
    return None


def remove_cross_attention_hooks(unet) -> int:
    """Put back every processor that one of ours replaced; returns how many.

    ``with cross_attention_hooks(...)`` always cleans up by itself, also after an error or
    an interrupted cell. This is for a block entered by hand (``__enter__``) and never left.
    """
    processors = unet.attn_processors
    ours = {name for name, p in processors.items() if isinstance(p, CrossAttentionProcessor)}
    for name in ours:
        processors[name].controller.installed = False
    restored = {name: (p.original if name in ours else p) for name, p in processors.items()}
    unet.set_attn_processor(restored)
    return len(ours)


@contextmanager
def join_installation(controller, hooks: list) -> Iterator:
    """Add ``hooks`` to processors a surrounding ``with`` block installed, and take them out after.

    Re-running a cell inside another hook block must not wrap the processors twice.
    """
    controller.hooks.extend(hooks)
    try:
        yield controller
    finally:
        for hook in hooks:
            controller.hooks.remove(hook)


@contextmanager
def cross_attention_hooks(unet, hooks: Iterable[AttentionHook]) -> Iterator[AttentionController]:
    """Run ``hooks`` on every cross-attention layer of ``unet`` inside a ``with`` block.

    >>> store = AttentionStore()
    >>> with cross_attention_hooks(pipe.unet, [store]):
    ...     pipe("a red circle")
    """
    hooks = list(hooks)
    controller = _installed_controller(unet)
    if controller is not None and controller.installed:
        with join_installation(controller, hooks):  # nested: join, do not stack
            yield controller
        return
    if controller is not None:  # left behind by a block that never exited: clean up first
        remove_cross_attention_hooks(unet)

    controller = AttentionController(unet)
    controller.hooks = hooks
    originals = unet.attn_processors
    ours = {
        name: CrossAttentionProcessor(controller, name[: -len(".processor")], p) if name.endswith("attn2.processor") else p
        for name, p in originals.items()
    }
    unet.set_attn_processor(ours)
    controller.installed = True
    controller._pre_hook = unet.register_forward_pre_hook(controller._remember_latent, with_kwargs=True)
    try:
        yield controller
    finally:
        controller.installed = False
        controller._pre_hook.remove()
        unet.set_attn_processor(dict(originals))
