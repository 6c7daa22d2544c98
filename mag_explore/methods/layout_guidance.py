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

As published, too:

* the threshold test looks at the loss of the *previous* gradient evaluation (it starts at
  10000, and is carried over from step to step): so the update made from a loss at or
  under 0.2 is still applied, and once a loss is under 0.2 no later step is guided.
  ``threshold_test="fresh"`` is our variant: each guided step evaluates the loss at its
  own x_t and stops before updating once it is at or under the threshold;
* each region is a box, rasterised on each layer's own grid as
  ``mask[int(y0·H):int(y1·H), int(x0·W):int(x1·W)] = 1`` (``mask_mode="box"``). The box is
  the region's bounding box, read from its image-size mask (exact for boxes drawn on the
  image's pixel grid; an ellipse becomes the box around it). ``mask_mode="nearest"``,
  ``"area"`` or ``"bilinear"`` keep the region's shape and resize its mask instead.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..attention import AttentionContext, AttentionHook, cross_attention_layer_names
from ..families import require_unet
from ..sampling import Control, StepState
from ..schedule import StepRange, resolve_step_range
from .common import check_finite, layout_for_run
from .guidance import guidance_pass
from ..layouts import MASK_MODES
from ..validation import check_choice, check_count, check_number

LAYER_CHOICES = ("official", "mid+up", "all")
THRESHOLD_TESTS = ("previous", "fresh")
LG_MASK_MODES = ("box", *MASK_MODES)


def box_masks(layout, height: int, width: int) -> torch.Tensor:
    """(regions, height, width) 0/1: each region's bounding box rasterised as the published code.

    The box (x0, y0, x1, y1) in fractions of the image is read from the region's mask
    (pixel edges), then ``mask[int(y0*H):int(y1*H), int(x0*W):int(x1*W)] = 1`` on the layer's grid.
    """
    out = torch.zeros(len(layout), height, width)
    for index, region in enumerate(layout.regions):
        rows, cols = np.nonzero(region.mask)
        img_h, img_w = region.mask.shape
        x0, x1 = cols.min() / img_w, (cols.max() + 1) / img_w
        y0, y1 = rows.min() / img_h, (rows.max() + 1) / img_h
        out[index, int(y0 * height): int(y1 * height), int(x0 * width): int(x1 * width)] = 1
    return out


def layer_masks(mask_mode: str) -> Callable:
    """``masks(layout, h, w)`` for a mask mode: published boxes, or the layout's resized masks."""
    if mask_mode == "box":
        return box_masks
    return lambda layout, h, w: layout.masks_at(h, w, mode=mask_mode)


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

    def __init__(self, layout, layer_names: set[str], mask_mode: str = "box"):
        self.layout, self.layer_names, self.mask_mode = layout, set(layer_names), mask_mode
        self.layers_wanted = sorted(self.layer_names)
        self._masks, self._cache = layer_masks(mask_mode), {}
        self.reset()

    def masks_at(self, height: int, width: int, device=None) -> torch.Tensor:
        """The masks this loss uses on a layer's grid (cached per run)."""
        key = (height, width, str(device))
        if key not in self._cache:
            self._cache[key] = self._masks(self.layout, height, width).to(device)
        return self._cache[key]

    def reset(self) -> None:
        self.total, self.shares, self.layers = None, [], []

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "guidance" and ctx.layer in self.layer_names

    def observe(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        masks = self.masks_at(ctx.height, ctx.width, device=probs.device)
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
        loss_threshold: no further gradient step once the unscaled loss is at most this (0.2).
        threshold_test: "previous" (published: test the last evaluated loss, carried over
            steps) or "fresh" (test the loss at this step's x_t before updating).
        max_iter: gradient steps per guided step at most (5).
        while_t_above: guide while t > this (None: 800, the published first 10 of ~50 steps).
        step_range: or guide during step indices ``(start, stop)`` instead (or a StepRange).
        layers: "official" (mid block + first up block with cross-attention, as published),
            "mid+up" (mid and every up layer), "all", or a list of layer names.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        mask_mode: "box" (bounding boxes cut with int(x·W) on each layer's grid, as published),
            or "nearest", "area", "bilinear" (the region's own shape, resized).
    """

    name = "lg"

    def __init__(self, layout, *, loss_scale: float = 30.0, loss_threshold: float = 0.2, max_iter: int = 5,
                 while_t_above: int | StepRange | None = None, step_range: tuple | StepRange | None = None,
                 layers: str | Iterable[str] = "official", gradient_checkpointing: bool = False,
                 mask_mode: str = "box", threshold_test: str = "previous"):
        if isinstance(layers, str):
            check_choice("layers", layers, LAYER_CHOICES)
        self.layout = layout
        self.loss_scale = check_number("loss_scale", loss_scale, minimum=0)
        self.loss_threshold = check_number("loss_threshold", loss_threshold, minimum=0)
        self.steps = resolve_step_range(while_t_above, step_range, default=StepRange(while_t_above=800),
                                        what="LayoutGuidance")
        self.max_iter, self.layers = check_count("max_iter", max_iter), layers
        self.checkpointing, self.mask_mode = gradient_checkpointing, check_choice("mask_mode", mask_mode, LG_MASK_MODES)
        self.threshold_test = check_choice("threshold_test", threshold_test, THRESHOLD_TESTS)
        self._previous_loss = float("inf")
        self.hook: LayoutLossHook | None = None
        self._settings: dict = {}
        self._alphas_cumprod = None
        self.history: list[dict] = []

    def attention_hooks(self) -> list:
        return [self.hook] if self.hook is not None else []

    def start(self, sampler) -> None:
        # its layer choice (mid and first up blocks) and schedule are defined on a UNet
        require_unet(sampler.pipe, "layout guidance")
        layer_names = set(self._choose_layers(sampler.pipe.unet))
        run_layout = layout_for_run(self.layout, sampler, "layout guidance", self.mask_mode,
                                    lambda name, hw: name in layer_names, layer_masks(self.mask_mode))
        self.steps.validate(sampler.timesteps, sampler.scheduler.config.num_train_timesteps, "layout guidance steps")
        self.hook = LayoutLossHook(run_layout, layer_names, self.mask_mode)
        self._previous_loss = float("inf")  # the published loop starts from loss = 10000
        self._alphas_cumprod = sampler.scheduler.alphas_cumprod.detach().cpu().double()
        self._settings = {"loss_scale": self.loss_scale, "loss_threshold": self.loss_threshold,
                          "max_iter": self.max_iter, **self.steps.as_keywords(),
                          "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
                          "mask_mode": self.mask_mode, "threshold_test": self.threshold_test}
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

    def knob(self) -> str:
        return f"layout guidance loss_scale={self.loss_scale:g}"

    def step_size(self, timestep: int) -> float:
        """η_t = 1 − ᾱ_t: the published σ² step of its LMS scheduler, for DDIM latents."""
        return 1.0 - float(self._alphas_cumprod[int(timestep)])

    def before_step(self, state: StepState) -> torch.Tensor:
        if not self.steps.contains(state.step_index, int(state.timestep)):
            return state.latents
        latents = state.latents.detach()
        step_size = self.step_size(int(state.timestep)) * self.loss_scale
        for iteration in range(self.max_iter):
            if self.threshold_test == "previous" and self._previous_loss <= self.loss_threshold:
                break  # published: the last loss evaluated (maybe at an earlier step) is low enough
            loss, grad = guidance_pass(state, latents, self.hook, checkpointing=self.checkpointing)
            check_finite("layout guidance", state, loss, grad, f"loss_scale={self.loss_scale}")
            self._record(state, iteration, loss, grad)
            if self.threshold_test == "fresh" and float(loss) <= self.loss_threshold:
                break  # our variant: close enough at this x_t, leave it as it is
            latents, self._previous_loss = (latents.float() - step_size * grad).detach(), float(loss)  # x ← x − η·∇L
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
