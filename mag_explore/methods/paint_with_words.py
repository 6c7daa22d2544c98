"""Paint-with-words (eDiff-I, Balaji et al. 2022): a bonus on the logits of a region's words.

Before the softmax of every cross-attention layer, in the conditional half of
classifier-free guidance, for every region r with tokens T_r and mask M_r:

    scores[p, T_r] += w · log(1 + σ_t) · max(QKᵀ/√d)      for the pixels p inside M_r

σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) is the noise level of the step (large early, so the layout
is imposed while the composition forms, and near 0 at the end). max(QKᵀ/√d) puts the
bonus on the scale of the layer's own logits.

Defaults follow the paint-with-words-sd project (cloneofsimo/paint-with-words-sd, the
reference implementation for Stable Diffusion; eDiff-I's own code is not public):

* w = 0.1: the default ``weight_function`` of its ``paint_with_words()`` is
  ``0.1 · w_region · log(1 + σ) · qk.max()`` with region strengths of 1.0 for objects
  (its README and ``runner.py`` examples pass 0.4 instead; ``weight=0.4`` gives that).
* every step, every cross-attention layer, all heads; the unconditional pass gets no bonus.
* one max per image over the whole layer (heads, pixels and tokens): ``qk.max()`` of its
  batch-1 conditional pass. It adds the bonus to raw QKᵀ before the 1/√d scale; adding
  the scaled bonus to the scaled scores, as here, is the same number.
* masks resized to each layer bilinearly with ``align_corners=True``, as its
  ``_img_importance_flatten`` does (``mask_mode="area"``, the covered fraction, and
  ``"nearest"`` are options); overlapping regions add up;
* every occurrence of a region's phrase in the prompt gets the bonus, as its token
  search does (``every_occurrence=False`` keeps only the region's own occurrence).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from ..attention import AttentionContext, AttentionHook
from ..families import require_unet
from ..sampling import Control
from ..schedule import StepRange, resolve_step_range
from ..layouts import MASK_MODES
from ..text.tokens import phrase_occurrences
from ..validation import check_choice, check_number
from .common import layout_for_run


def noise_level(alphas_cumprod: torch.Tensor, timestep: int) -> float:
    """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t): the noise-to-signal ratio of step t (k-diffusion's sigma)."""
    alpha_bar = float(alphas_cumprod[int(timestep)])
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def pww_bonus(scores: torch.Tensor, masks: torch.Tensor, token_groups: Sequence[Sequence[int]],
              weight: float | Sequence[float], sigma: float) -> torch.Tensor:
    """The term paint-with-words adds to the logits, shaped like ``scores``.

    scores: (batch, heads, pixels, tokens) logits of one layer (conditional rows only).
    masks: (regions, pixels) in [0, 1]; token_groups: the token indices of each region.
    weight: w, one for all regions or one per region.
    """
    weights = [float(weight)] * len(token_groups) if isinstance(weight, (int, float)) else list(weight)
    if len(weights) != len(token_groups):
        raise ValueError(f"got {len(weights)} weights for {len(token_groups)} regions; give one, or one per region")
    spatial = torch.zeros(scores.shape[-2:], dtype=scores.dtype, device=scores.device)  # (pixels, tokens)
    for mask, tokens, w in zip(masks, token_groups, weights):
        spatial[:, list(tokens)] += w * mask.to(scores.dtype)[:, None]
    peak = scores.amax(dim=(1, 2, 3), keepdim=True)  # one max per image, as qk.max() of a batch-1 pass
    return math.log1p(sigma) * peak * spatial


class PaintWithWords(Control, AttentionHook):
    """Paint-with-words as a sampler control (an attention hook that edits the logits).

    Args:
        layout: the regions and the words they control.
        weight: w, the strength (default 0.1, paint-with-words-sd's default); a float or
            one per region.
        while_t_above: act while t > this; step_range: or during step indices
            ``(start, stop)``; both None: every step, as paint-with-words-sd.
        mask_mode: "bilinear" (align_corners=True, as published), "area" or "nearest".
        every_occurrence: boost every occurrence of a region's phrase (as published), or
            only the one the region names (False).
    """

    name = "pww"

    def __init__(self, layout, *, weight: float | Sequence[float] = 0.1,
                 while_t_above: int | StepRange | None = None, step_range: tuple | StepRange | None = None,
                 mask_mode: str = "bilinear", every_occurrence: bool = True):
        values = [weight] if isinstance(weight, numbers.Real) else list(weight)
        for value in values:
            check_number("paint-with-words weight", value, hint=", or one per region")
        check_choice("mask_mode", mask_mode, MASK_MODES)
        self.steps = resolve_step_range(while_t_above, step_range, what="PaintWithWords")  # default: every step
        self.layout, self.weight, self.mask_mode = layout, weight, mask_mode
        self.every_occurrence = bool(every_occurrence)
        self._token_groups: list[list[int]] = []
        self._run_layout = None
        self._alphas_cumprod = None
        self.sigmas: dict[int, float] = {}  # step index -> σ used, for plots and tests

    def attention_hooks(self) -> list:
        return [self]

    def start(self, sampler) -> None:
        # its weight schedule log(1 + σ) and bonus are defined on DDIM's σ and on cross-attention rows
        require_unet(sampler.pipe, "paint-with-words")
        self._run_layout = layout_for_run(self.layout, sampler, "paint-with-words", self.mask_mode)
        self._token_groups = [self._tokens_of(r, sampler) for r in self._run_layout.regions]
        self.steps.validate(sampler.timesteps, sampler.scheduler.config.num_train_timesteps, "paint-with-words steps")
        self._alphas_cumprod = sampler.scheduler.alphas_cumprod.detach().cpu().double()
        self.sigmas = {}

    @property
    def settings(self) -> dict:
        weight = self.weight if isinstance(self.weight, (int, float)) else list(self.weight)
        return {"weight": weight, **self.steps.as_keywords(), "mask_mode": self.mask_mode,
                "every_occurrence": self.every_occurrence}

    def _tokens_of(self, region, sampler) -> list[int]:
        if not (self.every_occurrence and region.phrase):
            return list(region.token_indices)
        matches = phrase_occurrences(sampler.pipe.tokenizer, sampler.prompt, region.phrase)
        return [i for match in matches for i in match]

    def knob(self) -> str:
        return f"paint-with-words weight={self.weight}"

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "denoise" and self.steps.contains(ctx.step_index, ctx.timestep)

    def edit_scores(self, scores: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if ctx.timestep is None:
            raise ValueError("paint-with-words needs the step's timestep; run it through generate() or Sampler")
        rows = ctx.rows("cond")  # the unconditional half keeps its logits
        sigma = noise_level(self._alphas_cumprod, ctx.timestep)
        masks = self._run_layout.masks_at(ctx.height, ctx.width, mode=self.mask_mode, device=scores.device)
        edited = scores.clone()
        edited[rows] = scores[rows] + pww_bonus(scores[rows], masks.flatten(1), self._token_groups, self.weight, sigma)
        self.sigmas[ctx.step_index] = sigma
        return edited

    @property
    def diagnostics(self) -> dict:
        """The noise level σ of each step that got the bonus."""
        return {"step": list(self.sigmas), "sigma": list(self.sigmas.values())} if self.sigmas else {}
