"""Layout guidance, backward variant (Chen, Laina & Vedaldi 2023, "Training-free layout
control with cross-attention guidance"): gradient steps on x_t that pull each region's
words into the region.

For a layer ℓ and a region r with tokens T_r and mask M_r, per token k and head h:

    ratio = Σ_{p in M_r} A[h, p, k] / Σ_p A[h, p, k]     (the share of k's attention inside)
    L_ℓ,r = mean over tokens k of  mean over heads h of (1 − ratio)²

and L = Σ_ℓ Σ_r L_ℓ,r / (regions × layers). Before each early denoising step, up to
``max_iter`` times while L > ``loss_threshold``: x_t ← x_t − η_t ∇ₓ (loss_scale · L).

Defaults are those of the published code (silent-chen/layout-guidance,
conf/base_config.yaml and utils.compute_ca_loss):

* loss_scale 30, loss_threshold 0.2 (on the unscaled loss), max_iter 5;
* guidance during the first 10 of its 51 LMS steps (max_index_step 10). Those are the
  steps with t > 800 (999 … 819), and "while t > 800" picks the first 10 of a 50-step
  DDIM schedule too (981 … 801), so that is our default;
* layers: the mid block and the first up block that has cross-attention (its
  ``attn_maps_up[0]``: 16×16 on SD at 512²), not the finer up blocks; heads kept apart;
* its step x ← x − σ² ∇ (σ of its LMS scheduler, whose latents are x_t / sqrt(ᾱ_t)).
  Written for our DDIM latents x_t = sqrt(ᾱ_t)·x_LMS the same move is
  x_t ← x_t − (1 − ᾱ_t) ∇_{x_t}: so η_t = 1 − ᾱ_t here.

One difference: the published loop checks the loss of the *previous* iteration (even of
the previous step) against the threshold; here each step starts with a fresh loss and
stops as soon as it is below the threshold, without a further update.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..attention import AttentionContext, AttentionHook, cross_attention_layer_names
from ..sampling import Control, StepState
from ..schedule import StepRange, reject_old_keywords, resolve_step_range
from .common import check_finite, layout_for_run
from .guidance import guidance_step

LAYER_CHOICES = ("official", "mid+up", "all")


def layout_loss_terms(probs: torch.Tensor, masks: torch.Tensor,
                      token_groups: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-region loss of one layer, and each region's share of attention inside its mask.

    probs: (batch, heads, pixels, tokens); masks: (regions, pixels) in [0, 1].
    Returns (loss, inside_share), both shaped (regions,): loss is the mean over the region's
    tokens of the mean over batch and heads of (1 − ratio)²; inside_share is the mean ratio.
    """
    losses, shares = [], []
    for mask, tokens in zip(masks, token_groups):
        attention = probs[..., list(tokens)]  # (batch, heads, pixels, tokens of r)
        inside = (attention * mask[:, None]).sum(-2)
        ratio = inside / attention.sum(-2).clamp_min(1e-12)  # (batch, heads, tokens of r)
        losses.append(((1 - ratio) ** 2).mean(dim=(0, 1)).mean())
        shares.append(ratio.mean().detach())
    return torch.stack(losses), torch.stack(shares)


def official_layers(unet) -> list[str]:
    """The mid-block layers and those of the first up block with cross-attention."""
    names = cross_attention_layer_names(unet)
    up_blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith("up_blocks.")})
    first_up = f"up_blocks.{up_blocks[0]}." if up_blocks else None
    return [n for n in names if n.startswith("mid_block.") or (first_up and n.startswith(first_up))]


class LayoutLossHook(AttentionHook):
    """Sums the layout loss over the chosen layers of one guidance pass (``layout`` resolved)."""

    def __init__(self, layout, layer_names: set[str], mask_mode: str = "nearest"):
        self.layout, self.layer_names, self.mask_mode = layout, set(layer_names), mask_mode
        self.layers_wanted = sorted(self.layer_names)
        self.reset()

    def reset(self) -> None:
        self.total, self.shares, self.layers = None, [], []

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "guidance" and ctx.layer in self.layer_names

    def observe(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        masks = self.layout.masks_at(ctx.height, ctx.width, mode=self.mask_mode, device=probs.device)
        losses, shares = layout_loss_terms(probs.float(), masks.flatten(1).float(), self.layout.token_groups)
        self.total = losses.sum() if self.total is None else self.total + losses.sum()
        self.shares.append(shares)
        self.layers.append(ctx.layer)

    @property
    def loss(self) -> torch.Tensor | None:
        """Σ over layers and regions / (regions × layers), as the published code averages."""
        if self.total is None:
            return None
        return self.total / (len(self.layout.regions) * len(self.layers))


class LayoutGuidance(Control):
    """Backward layout guidance as a sampler control.

    Args:
        layout: regions tied to words of the prompt.
        loss_scale: the loss is multiplied by this before the gradient (published 30).
        loss_threshold: stop the inner iterations once the unscaled loss is at most this (0.2).
        max_iter: gradient steps per guided step at most (5).
        while_t_above: guide while t > this (None: 800, the published first 10 of ~50 steps).
        step_range: or guide during step indices ``(start, stop)`` instead (or a StepRange).
        layers: "official" (mid block + first up block with cross-attention, as published),
            "mid+up" (mid and every up layer), "all", or a list of layer names.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        mask_mode: "nearest" (boxes cut on the layer's grid, as published) or "area".
    """

    name = "lg"

    def __init__(self, layout, *, loss_scale: float = 30.0, loss_threshold: float = 0.2, max_iter: int = 5,
                 while_t_above: int | StepRange | None = None, step_range: tuple | StepRange | None = None,
                 layers: str | Iterable[str] = "official", gradient_checkpointing: bool = False,
                 mask_mode: str = "nearest", **removed):
        reject_old_keywords("LayoutGuidance", removed)
        if max_iter < 1:
            raise ValueError(f"max_iter={max_iter}; need at least 1 gradient step per guided step")
        if isinstance(layers, str) and layers not in LAYER_CHOICES:
            raise ValueError(f"layers={layers!r}; use one of {LAYER_CHOICES} or a list of layer names")
        self.layout, self.loss_scale, self.loss_threshold = layout, float(loss_scale), float(loss_threshold)
        self.steps = resolve_step_range(while_t_above, step_range, default=StepRange(while_t_above=800),
                                        what="LayoutGuidance")
        self.max_iter, self.layers = int(max_iter), layers
        self.checkpointing, self.mask_mode = gradient_checkpointing, mask_mode
        self.hook: LayoutLossHook | None = None
        self._settings: dict = {}
        self._alphas_cumprod = None
        self.history: list[dict] = []

    def attention_hooks(self) -> list:
        return [self.hook] if self.hook is not None else []

    def start(self, sampler) -> None:
        run_layout = layout_for_run(self.layout, sampler)
        self.steps.validate(sampler.timesteps, sampler.scheduler.config.num_train_timesteps, "layout guidance steps")
        self.hook = LayoutLossHook(run_layout, set(self._choose_layers(sampler.pipe.unet)), self.mask_mode)
        self._alphas_cumprod = sampler.scheduler.alphas_cumprod.detach().cpu().double()
        self._settings = {"loss_scale": self.loss_scale, "loss_threshold": self.loss_threshold,
                          "max_iter": self.max_iter, **self.steps.as_keywords(),
                          "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
                          "mask_mode": self.mask_mode}
        self.history = []

    @property
    def settings(self) -> dict:
        return self._settings

    def _choose_layers(self, unet) -> list[str]:
        names = cross_attention_layer_names(unet)
        if self.layers == "official":
            return official_layers(unet)
        if self.layers == "mid+up":
            return [n for n in names if n.startswith(("mid_block.", "up_blocks."))]
        if self.layers == "all":
            return names
        chosen = list(self.layers)
        unknown = [n for n in chosen if n not in names]
        if unknown or not chosen:
            raise ValueError(f"unknown cross-attention layers {unknown or chosen}; this UNet has {names}")
        return chosen

    def step_size(self, timestep: int) -> float:
        """η_t = 1 − ᾱ_t: the published σ² step of its LMS scheduler, for DDIM latents."""
        return 1.0 - float(self._alphas_cumprod[int(timestep)])

    def before_step(self, state: StepState) -> torch.Tensor:
        if not self.steps.contains(state.step_index, int(state.timestep)):
            return state.latents
        latents = state.latents.detach()
        step_size = self.step_size(int(state.timestep)) * self.loss_scale
        for iteration in range(self.max_iter):
            moved, loss, grad = guidance_step(state, latents, self.hook, step_size, checkpointing=self.checkpointing)
            check_finite("layout guidance", state, loss, grad, f"loss_scale={self.loss_scale}")
            self._record(state, iteration, loss, grad)
            if float(loss) <= self.loss_threshold:
                break  # close enough: leave x_t as it is
            latents = moved
        return latents

    def _record(self, state: StepState, iteration: int, loss: torch.Tensor, grad: torch.Tensor) -> None:
        self.history.append({
            "step": state.step_index, "timestep": int(state.timestep), "iteration": iteration,
            "loss": float(loss), "grad_norm": float(grad.float().norm()),
            "inside_share": torch.stack(self.hook.shares).mean(0).tolist(),  # per region, over layers
        })

    @property
    def diagnostics(self) -> dict:
        """Per gradient evaluation: loss (unscaled), gradient norm, share of attention inside each mask."""
        keys = ("step", "timestep", "iteration", "loss", "grad_norm", "inside_share")
        return {k: [h[k] for h in self.history] for k in keys} if self.history else {}
