"""Masked-attention swapping (paper §3.1): overwrite the attention of the region's words.

In the conditional half of classifier-free guidance, for every region and every token of
its words, the cross-attention probability becomes ``1/len(tokens)`` inside the region and
``0`` outside. Other tokens keep their probabilities, so rows no longer sum to one - that
is what the official code does; ``renormalize=True`` rescales the other tokens instead.

On joint attention (Flux.1, SD3) the same values are set in the image→text block of the
joint softmax: the region tokens' probabilities become ``mask / len(tokens)``, and every
other entry of the row (the other text tokens *and* all image tokens) keeps its value. The
row is not renormalised: the swapped entries are exactly the official values, and the image
keys, which hold most of each row's mass, are left as the model computed them.
``renormalize=True`` is refused there: rescaling only the text part would not make the
joint row sum to one, and rescaling the image keys too is a different method.
"""
from __future__ import annotations

import torch

from ..attention import AttentionContext, AttentionHook
from ..families import family, is_mmdit
from ..models.load import model_defaults
from ..sampling import Control
from ..schedule import StepRange, resolve_step_range
from ..layouts import MASK_MODES
from ..validation import InputError, check_choice
from .common import layout_for_run


class MaskedAttentionSwap(Control, AttentionHook):
    """Swap the region tokens' attention for their masks during the early steps.

    Args:
        layout: the regions and the words they control.
        while_t_above: swap while the timestep t > this (None: the model's ``while_t_above``,
            700 as in the official code).
        step_range: or swap during step indices ``(start, stop)`` instead (or a StepRange).
        renormalize: rescale the other tokens so that each row sums to one again.
        mask_mode: "nearest" (official), "area" or "bilinear" to resize masks to each layer.
    """

    name = "swap"

    def __init__(self, layout, *, while_t_above: int | StepRange | None = None,
                 step_range: tuple | StepRange | None = None, renormalize: bool = False,
                 mask_mode: str = "nearest"):
        resolve_step_range(while_t_above, step_range, what="MaskedAttentionSwap")  # type errors now
        check_choice("mask_mode", mask_mode, MASK_MODES)
        self.layout, self.while_t_above, self.step_range = layout, while_t_above, step_range
        self.renormalize, self.mask_mode = renormalize, mask_mode
        self.steps: StepRange | None = None  # the resolved range, after start
        self._run_layout = None
        self._settings: dict = {}
        self.swapped_steps: list[int] = []

    def attention_hooks(self) -> list:
        return [self]

    def start(self, sampler) -> None:
        if self.renormalize and is_mmdit(sampler.pipe):
            raise InputError(f"renormalize=True is defined for cross-attention rows; this {family(sampler.pipe)} "
                             f"pipeline's joint attention rows also hold the image tokens (see the module doc): "
                             f"use renormalize=False")
        self._run_layout = layout_for_run(self.layout, sampler, "swap", self.mask_mode)
        default = StepRange(while_t_above=int(model_defaults(sampler.pipe)["while_t_above"]))
        self.steps = resolve_step_range(self.while_t_above, self.step_range, default=default,
                                        what="MaskedAttentionSwap")
        self.steps.validate(sampler.timesteps, sampler.scheduler.config.num_train_timesteps, "swap steps")
        self._settings = {**self.steps.as_keywords(), "renormalize": self.renormalize, "mask_mode": self.mask_mode}
        self.swapped_steps = []

    @property
    def settings(self) -> dict:
        return self._settings

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "denoise" and self.steps.contains(ctx.step_index, ctx.timestep)

    def edit_probs(self, probs: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        rows = ctx.rows("cond")  # the unconditional half is left alone
        masks = self._run_layout.masks_at(ctx.height, ctx.width, mode=self.mask_mode, device=probs.device)
        masks = masks.flatten(1).to(probs.dtype)  # (regions, pixels)
        edited = probs.clone()
        cond = edited[rows]  # (b, heads, pixels, tokens)
        for region, mask in zip(self._run_layout.regions, masks):
            tokens = list(region.token_indices)
            cond[..., tokens] = (mask / len(tokens))[None, None, :, None].expand(*cond.shape[:3], len(tokens))
        if self.renormalize:
            cond = self._renormalize(cond, probs[rows])
        edited[rows] = cond
        if not self.swapped_steps or self.swapped_steps[-1] != ctx.step_index:
            self.swapped_steps.append(ctx.step_index)
        return edited

    def _renormalize(self, cond: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        swapped = torch.zeros(cond.shape[-1], dtype=torch.bool, device=cond.device)
        for region in self._run_layout.regions:
            swapped[list(region.token_indices)] = True
        fixed_mass = cond[..., swapped].sum(-1, keepdim=True)
        other_mass = original[..., ~swapped].sum(-1, keepdim=True).clamp_min(1e-12)
        scale = (1 - fixed_mass).clamp_min(0) / other_mass
        cond[..., ~swapped] = original[..., ~swapped] * scale
        return cond

    @property
    def diagnostics(self) -> dict:
        return {"swapped_steps": list(self.swapped_steps)}
