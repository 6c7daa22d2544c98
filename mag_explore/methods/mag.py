"""Masked-Attention Guidance (MAG, paper §3.2): move x_t so that words attend inside their masks.

Before each denoising step in range:

1. run the UNet on x_t with the *conditional* prompt only, keeping the graph;
2. every cross-attention layer ℓ contributes, for every region r with tokens T_r and mask M_r
   (resized to the layer, nearest by default):
       L_ℓ,r = − Σ A[inside M_r, T_r] + λ · Σ A[outside M_r, T_r]      (summed over heads, too)
3. one SGD step on the latent: x_t ← x_t − α ∇ₓ L;
4. the ordinary classifier-free-guidance step continues from the new x_t.

Official defaults: α = 0.08, λ = 0.5, guidance while t > 700, DDIM 50 steps, CFG 9,
negative prompt "low quality". Only the latent requires grad, the loss is float32, and a
non-finite loss or gradient stops the run with an error instead of a black image.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..attention import AttentionContext, AttentionHook, layer_place
from ..sampling import Control, StepState
from ..schedule import StepsLike, as_step_range
from ..layouts import MASK_MODES
from ..validation import check_choice, check_count, check_lambda, check_number
from .common import check_finite, guidance_loss_and_grad, layout_for_run

PLACES = ("down", "mid", "up")


def mag_loss_terms(
    probs: torch.Tensor, masks: torch.Tensor, token_groups: Sequence[Sequence[int]], lmbda: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MAG loss of one layer, and per-region attention inside / outside the masks.

    probs: (batch, heads, pixels, tokens) attention probabilities.
    masks: (regions, pixels) in [0, 1]; token_groups: the token indices of each region.
    Returns (loss, inside, outside) with inside/outside shaped (regions,).
    """
    inside, outside = [], []
    for mask, tokens in zip(masks, token_groups):
        attention = probs[..., list(tokens)].sum(-1)  # (batch, heads, pixels)
        inside.append((attention * mask).sum())
        outside.append((attention * (1 - mask)).sum())
    inside_t, outside_t = torch.stack(inside), torch.stack(outside)
    return (-inside_t + lmbda * outside_t).sum(), inside_t, outside_t


class MagLossHook(AttentionHook):
    """Collects the MAG loss over the cross-attention layers of one guidance forward pass."""

    def __init__(self, guidance: "MaskedAttentionGuidance"):
        self.guidance = guidance
        self.reset()

    def reset(self) -> None:
        self.loss = None
        self.inside, self.outside, self.layers = [], [], []

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "guidance" and self.guidance.uses_layer(ctx)

    def observe(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        g = self.guidance
        masks = g.run_layout.masks_at(ctx.height, ctx.width, mode=g.mask_mode, device=probs.device)
        groups = [r.token_indices for r in g.run_layout.regions]
        loss, inside, outside = g.loss_fn(probs.float(), masks.flatten(1).float(), groups, g.lmbda)
        self.loss = loss if self.loss is None else self.loss + loss
        self.inside.append(inside.detach())
        self.outside.append(outside.detach())
        self.layers.append(ctx.layer)


class MaskedAttentionGuidance(Control):
    """MAG as a sampler control.

    Args:
        layout: regions tied to words of the prompt.
        alpha: step size α of the gradient step on x_t (official 0.08).
        lmbda: weight λ of the attention outside the masks (official 0.5).
        steps: 700 (while t > 700, official), step indices (start, stop), or a StepRange.
        iterations: gradient steps per denoising step (official 1).
        resolutions: use only layers whose larger side is in this set (None: all layers).
        places: use only these UNet halves, e.g. ("mid", "up") (None: all).
        gradient_checkpointing: recompute activations in the backward pass, so SD at 512²
            fits a 16 GB GPU in fp16.
        mask_mode: "nearest" (official), "area" or "bilinear".
        loss_fn: replace the loss (same signature as ``mag_loss_terms``) to try your own.
        allow_negative_lambda: accept λ < 0 (it rewards attention *outside* the regions;
            for experiments only).

    Every setting is checked here and again in ``start`` against the run (schedule,
    layers, regions at each layer); see ``mag_explore.validation``.
    """

    def __init__(
        self,
        layout,
        alpha: float = 0.08,
        lmbda: float = 0.5,
        steps: StepsLike = 700,
        iterations: int = 1,
        resolutions: Iterable[int] | None = None,
        places: Iterable[str] | None = None,
        gradient_checkpointing: bool = False,
        mask_mode: str = "nearest",
        loss_fn=mag_loss_terms,
        allow_negative_lambda: bool = False,
    ):
        self.layout = layout
        self.alpha = check_number("alpha", alpha, minimum=0)
        self.lmbda = check_lambda(lmbda, allow_negative_lambda)
        self.steps, self.iterations = as_step_range(steps), check_count("iterations", iterations)
        self.resolutions = None if resolutions is None else {check_count("resolution", r) for r in resolutions}
        self.places = None if places is None else {check_choice("place", p, PLACES) for p in places}
        check_choice("mask_mode", mask_mode, MASK_MODES)
        self.checkpointing, self.mask_mode, self.loss_fn = gradient_checkpointing, mask_mode, loss_fn
        self.hook = MagLossHook(self)
        self.run_layout = None
        self.history: list[dict] = []

    def uses_layer(self, ctx: AttentionContext) -> bool:
        return self._uses(ctx.layer, (ctx.height, ctx.width))

    def _uses(self, layer: str, hw: tuple[int, int]) -> bool:
        return (self.resolutions is None or max(hw) in self.resolutions) and (
            self.places is None or layer_place(layer) in self.places
        )

    def knob(self) -> str:
        return f"MAG alpha={self.alpha:g}"

    def attention_hooks(self) -> list:
        return [self.hook]

    def start(self, sampler) -> None:
        self.run_layout = layout_for_run(self.layout, sampler, "MAG", self.mask_mode, self._uses)
        self.steps.validate(sampler.timesteps, sampler.scheduler.config.num_train_timesteps, "guidance steps")
        self.history = []

    def before_step(self, state: StepState) -> torch.Tensor:
        if not self.steps.contains(state.step_index, int(state.timestep)):
            return state.latents
        latents = state.latents.detach()
        for iteration in range(self.iterations):
            loss, grad = self.loss_and_grad(state, latents)
            check_finite("MAG", state, loss, grad, f"alpha={self.alpha}")
            self._record(state, iteration, loss, grad)
            latents = (latents - self.alpha * grad).detach()  # one SGD step on x_t
        return latents

    def loss_and_grad(self, state: StepState, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MAG loss at ``latents`` and its gradient (a conditional-only UNet pass)."""
        return guidance_loss_and_grad(
            state, latents, self.hook, self.checkpointing,
            f"no cross-attention layer matched resolutions={self.resolutions}, places={self.places}",
        )

    def _record(self, state: StepState, iteration: int, loss: torch.Tensor, grad: torch.Tensor) -> None:
        inside = torch.stack(self.hook.inside).sum(0)
        total = inside + torch.stack(self.hook.outside).sum(0)
        self.history.append({
            "step": state.step_index, "timestep": int(state.timestep), "iteration": iteration,
            "loss": float(loss), "grad_norm": float(grad.float().norm()),
            "inside_share": (inside / total.clamp_min(1e-12)).tolist(),  # per region, over all layers
            "layers": len(self.hook.layers),
        })

    @property
    def diagnostics(self) -> dict:
        """Per guided step: loss before the update, gradient norm, share of attention inside each mask."""
        keys = ("step", "timestep", "iteration", "loss", "grad_norm", "inside_share")
        return {k: [h[k] for h in self.history] for k in keys} if self.history else {}
