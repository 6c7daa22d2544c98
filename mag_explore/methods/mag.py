"""Masked-Attention Guidance (MAG, paper §3.2): move x_t so that words attend inside their masks.

Before each denoising step in range:

1. run the UNet on x_t with the *conditional* prompt only, keeping the graph;
2. every cross-attention layer ℓ contributes, for every region r with tokens T_r and mask M_r
   (resized to the layer, nearest by default):
       L_ℓ,r = − Σ A[inside M_r, T_r] + λ · Σ A[outside M_r, T_r]      (summed over heads, too)
3. one SGD step on the latent: x_t ← x_t − α ∇ₓ L;
4. the ordinary classifier-free-guidance step continues from the new x_t.

``loss_fn="balanced"`` is a second variant of ours: the outside term of each region is
weighted by its area over the outside area, λ·|M_r|/|1 − M_r|. The paper's loss rewards turning a
word down *everywhere* as soon as its attention outside is more than 1/λ times its attention
inside, which a small region's word always has at first (its attention is spread over the image):
on the embedded shapes model, MAG then erases objects of small regions instead of moving them. With
the balanced weight a word attending evenly gains nothing by being turned down (at λ = 1 the two
terms cancel), so only *moving* its attention lowers the loss.

``step_rule="normalized"`` is a variant of ours, not the paper's: x_t ← x_t − α σ_t ∇L / rms(∇L),
σ_t = √(1 − ᾱ_t) the noise level of x_t, so every guided step moves x_t by α noise-stds
whatever the gradient's size. On the embedded shapes model the official step follows the
gradient, which is 10× larger at t = 981 than at t = 701 while the signal scale √ᾱ_t is 4×
smaller: its first steps move the x_0 that x_t implies by several latent stds, objects come
out with latents up to 2× their color's (the VAE decodes a red one yellow), and the prompt's
colors go (``bench/mag_drift.py``; README, "MAG on the embedded model").

α, λ and the threshold default to the model's (``model_defaults(pipe)``: ``mag_alpha``,
``mag_lmbda``, ``while_t_above``; on Stable Diffusion the official α = 0.08, λ = 0.5, guidance
while t > 700), resolved when the run starts. Only the latent requires grad, the loss is
float32, and a non-finite loss or gradient stops the run with an error instead of a black
image. The update itself is in :meth:`MaskedAttentionGuidance.before_step`; the pass that gives
L and ∇L is :func:`~mag_explore.methods.guidance.guidance_pass`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..attention import AttentionContext, AttentionHook
from ..families import attention_places, noise_std
from ..layouts import MASK_MODES
from ..models.load import model_defaults
from ..sampling import Control, StepState
from ..schedule import StepRange, resolve_step_range
from .common import check_finite, layout_for_run
from .guidance import guidance_pass
from ..validation import check_choice, check_count, check_lambda, check_number

#: UNet halves; Flux's double- and single-stream blocks; SD3's joint blocks
PLACES = ("down", "mid", "up", "double", "single", "joint")

STEP_RULES = ("official", "normalized")


def normalized_step_size(grad: torch.Tensor, alpha: float, noise_std: float) -> torch.Tensor:
    """Ours: α·σ_t / rms(∇L) per image, so that the step α·σ_t·∇L/rms(∇L) is α noise-stds long."""
    rms = grad.float().pow(2).mean(dim=tuple(range(1, grad.ndim)), keepdim=True).sqrt()
    return alpha * noise_std / rms.clamp_min(1e-12)


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


def balanced_loss_terms(
    probs: torch.Tensor, masks: torch.Tensor, token_groups: Sequence[Sequence[int]], lmbda: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ours: −Σ A[inside] + λ·(|M|/|1 − M|)·Σ A[outside] per region (|M|: the mask's area at this
    layer), so a word's attention spread evenly costs nothing to keep; same signature and
    returns as :func:`mag_loss_terms`."""
    inside, outside, weighted = [], [], []
    for mask, tokens in zip(masks, token_groups):
        attention = probs[..., list(tokens)].sum(-1)  # (batch, heads, pixels)
        inside.append((attention * mask).sum())
        outside.append((attention * (1 - mask)).sum())
        weighted.append(mask.sum() / (1 - mask).sum().clamp_min(1e-12) * outside[-1])
    inside_t, outside_t = torch.stack(inside), torch.stack(outside)
    return (-inside_t + lmbda * torch.stack(weighted)).sum(), inside_t, outside_t


#: MAG's losses by name: the paper's, and ours with the area-balanced outside term
LOSSES = {"official": mag_loss_terms, "balanced": balanced_loss_terms}


def layer_sizes_in_effect(given, defaults: dict) -> set[int] | None:
    """The layer sizes MAG's loss reads: ``given``, else the model's ``mag_layer_sizes``
    (None: every layer); each a whole number >= 1, named in the error otherwise."""
    if given is not None:
        return {check_count("layer_sizes", r) for r in given}
    sizes = defaults["mag_layer_sizes"]
    return None if sizes is None else {check_count("mag_layer_sizes", r) for r in sizes}


class MagLossHook(AttentionHook):
    """Adds up the MAG loss over the cross-attention layers of one guidance pass.

    ``layout`` is resolved (token indices known); ``layer_sizes`` / ``places`` restrict
    the layers (None: all).
    """

    def __init__(self, layout, lmbda: float, *, mask_mode: str = "nearest", loss_fn=mag_loss_terms,
                 layer_sizes: set[int] | None = None, places: set[str] | None = None):
        self.layout, self.lmbda, self.mask_mode, self.loss_fn = layout, lmbda, mask_mode, loss_fn
        self.layer_sizes, self.places = layer_sizes, places
        self.layers_wanted = f"layer_sizes={layer_sizes}, places={places}"
        self.reset()

    def reset(self) -> None:
        self.loss = None
        self.inside, self.outside, self.layers = [], [], []

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "guidance" and (
            self.layer_sizes is None or max(ctx.height, ctx.width) in self.layer_sizes) and (
            self.places is None or ctx.place in self.places)

    def observe(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        masks = self.layout.masks_at(ctx.height, ctx.width, mode=self.mask_mode, device=probs.device)
        loss, inside, outside = self.loss_fn(probs.float(), masks.flatten(1).float(), self.layout.token_groups,
                                             self.lmbda)
        self.loss = loss if self.loss is None else self.loss + loss
        self.inside.append(inside.detach())
        self.outside.append(outside.detach())
        self.layers.append(ctx.layer)


class MaskedAttentionGuidance(Control):
    """MAG as a sampler control.

    Args:
        layout: regions tied to words of the prompt.
        alpha: step size α of the gradient step on x_t (None: the model's ``mag_alpha``;
            official 0.08). With ``step_rule="normalized"``: the step's length in noise-stds.
        step_rule: "official" (x_t − α∇L, the paper) or "normalized" (ours, see above); None:
            the model's ``mag_step_rule``.
        lmbda: weight λ of the attention outside the masks (None: ``mag_lmbda``; 0.5).
        while_t_above: guide while the timestep t > this (None: the model's ``while_t_above``;
            official 700).
        step_range: or guide during step indices ``(start, stop)`` instead; a ``StepRange``
            is accepted by either keyword.
        iterations: gradient steps per denoising step (official 1).
        layer_sizes: use only layers whose larger side is in this set (None: the model's
            ``mag_layer_sizes``; all layers on Stable Diffusion).
        places: use only these UNet halves, e.g. ("mid", "up"), or MMDiT blocks: "double",
            "single" (Flux), "joint" (SD3) (None: all). On Flux and SD3 the loss reads the
            image→text block of each joint softmax (``mag_explore.attention.joint``).
        gradient_checkpointing: recompute activations in the backward pass: less memory,
            more time. Measured for SD1.5 at 512² in fp32 on a CPU (bench/mag_memory.py),
            one guided step adds 1.98 GB to the 4.7 GB of the loaded pipeline, 1.39 GB with
            checkpointing; in fp16 about half of each, so a 16 GB GPU holds either.
        loss_fn: the loss by name, "official" (the paper's, :func:`mag_loss_terms`) or
            "balanced" (ours, :func:`balanced_loss_terms`), or your own function with
            ``mag_loss_terms``' signature; None: the model's ``mag_loss`` ("official" on
            Stable Diffusion).
        mask_mode: how a region's mask is resized to each layer's grid: "nearest" (official),
            "area" (the share of each cell the region covers) or "bilinear"; None: the
            model's ``mag_mask_mode`` ("nearest" on Stable Diffusion).
        allow_negative_lambda: accept λ < 0 (it rewards attention *outside* the regions;
            for experiments only).

    Every setting is checked (``mag_explore.validation``): given values here, the model's
    defaults and the run (schedule, layers, each region at each layer) in ``start``.
    After ``start``, ``settings`` holds the values used (``result.settings["mag"]``).
    """

    name = "mag"

    def __init__(
        self,
        layout,
        *,
        alpha: float | None = None,
        lmbda: float | None = None,
        step_rule: str | None = None,
        while_t_above: int | StepRange | None = None,
        step_range: tuple | StepRange | None = None,
        iterations: int = 1,
        layer_sizes: Iterable[int] | None = None,
        places: Iterable[str] | None = None,
        gradient_checkpointing: bool = False,
        mask_mode: str | None = None,
        loss_fn=None,
        allow_negative_lambda: bool = False,
    ):
        resolve_step_range(while_t_above, step_range, what="MaskedAttentionGuidance")  # type errors now
        self.allow_negative_lambda = bool(allow_negative_lambda)
        self.layout = layout
        self.alpha = None if alpha is None else check_number("alpha", alpha, minimum=0)
        self.lmbda = None if lmbda is None else check_lambda(lmbda, self.allow_negative_lambda)
        self.while_t_above, self.step_range = while_t_above, step_range
        self.iterations = check_count("iterations", iterations)
        if isinstance(layer_sizes, int) and not isinstance(layer_sizes, bool):
            layer_sizes = (layer_sizes,)  # one size, as a sweep passes it: layer_sizes=16
        if isinstance(places, str):
            places = (places,)  # "up" is one place, not the letters "u" and "p"
        self.layer_sizes = None if layer_sizes is None else {check_count("layer_sizes", r) for r in layer_sizes}
        self._layer_sizes = self.layer_sizes  # in effect: the model's mag_layer_sizes fill a None in start
        self.places = None if places is None else {check_choice("place", p, PLACES) for p in places}
        check_choice("mask_mode", mask_mode, MASK_MODES) if mask_mode is not None else None
        if loss_fn is not None and not callable(loss_fn):
            check_choice("loss_fn", loss_fn, LOSSES)
        self.step_rule = None if step_rule is None else check_choice("step_rule", step_rule, STEP_RULES)
        self.checkpointing, self.mask_mode, self.loss_fn = gradient_checkpointing, mask_mode, loss_fn
        self.hook: MagLossHook | None = None
        self._layer_places: dict[str, str] = {}
        self.steps: StepRange | None = None  # the resolved range, after start
        self._settings: dict = {}
        self.history: list[dict] = []

    def attention_hooks(self) -> list:
        return [self.hook] if self.hook is not None else []

    def uses_layer(self, layer: str, hw: tuple[int, int]) -> bool:
        """Whether the loss reads this cross-attention layer (``layer_sizes`` / ``places``)."""
        return (self._layer_sizes is None or max(hw) in self._layer_sizes) and (
            self.places is None or self._layer_places.get(layer) in self.places)

    def knob(self) -> str:
        alpha = self._settings.get("alpha", self.alpha)
        return f"MAG alpha={alpha:g}" if alpha is not None else "MAG alpha"

    def start(self, sampler) -> None:
        # words first: a phrase not in the prompt, or a region lost at every layer, fails here
        self._layer_places = attention_places(sampler.pipe)
        defaults = model_defaults(sampler.pipe)
        mask_mode = check_choice("mag_mask_mode", defaults["mag_mask_mode"] if self.mask_mode is None
                                 else self.mask_mode, MASK_MODES)
        loss_fn = check_choice("mag_loss", defaults["mag_loss"], LOSSES) if self.loss_fn is None else self.loss_fn
        self._layer_sizes = layer_sizes_in_effect(self.layer_sizes, defaults)
        loss_name = loss_fn if isinstance(loss_fn, str) else getattr(loss_fn, "__name__", repr(loss_fn))
        loss_fn = LOSSES[loss_fn] if isinstance(loss_fn, str) else loss_fn
        run_layout = layout_for_run(self.layout, sampler, "MAG", mask_mode, self.uses_layer)
        alpha = check_number("alpha", defaults["mag_alpha"] if self.alpha is None else self.alpha, minimum=0)
        lmbda = check_lambda(defaults["mag_lmbda"] if self.lmbda is None else self.lmbda, self.allow_negative_lambda)
        step_rule = check_choice("mag_step_rule", defaults["mag_step_rule"] if self.step_rule is None else self.step_rule,
                                 STEP_RULES)
        self.steps = resolve_step_range(self.while_t_above, self.step_range, what="MaskedAttentionGuidance",
                                        default=StepRange(while_t_above=int(defaults["while_t_above"])))
        self.steps.validate(sampler.timesteps, sampler.scheduler.config.num_train_timesteps, "guidance steps")
        self.hook = MagLossHook(run_layout, lmbda, mask_mode=mask_mode,
                                loss_fn=loss_fn, layer_sizes=self._layer_sizes, places=self.places)
        self._settings = {"alpha": alpha, "lmbda": lmbda, "step_rule": step_rule, **self.steps.as_keywords(),
                          "iterations": self.iterations, "mask_mode": mask_mode,
                          "loss_fn": loss_name,
                          "layer_sizes": None if self._layer_sizes is None else sorted(self._layer_sizes)}
        self.history = []

    @property
    def settings(self) -> dict:
        return self._settings

    def before_step(self, state: StepState) -> torch.Tensor:
        """Masked-attention guidance "indirectly controls attention to each word and pixel
        according to the semantic regions by manipulating noise images fed to diffusion models"
        (the paper's abstract): before the denoising step, x_t takes gradient steps on L."""
        if not self.steps.contains(state.step_index, int(state.timestep)):
            return state.latents
        alpha, x_t = self._settings["alpha"], state.latents.detach().float()  # float32, as the official code
        for iteration in range(self.iterations):
            loss, grad = guidance_pass(state, x_t, self.hook, checkpointing=self.checkpointing)  # L(x_t), ∇ₓL
            check_finite("MAG", state, loss, grad, f"alpha={alpha}")
            self._record(state, iteration, loss, grad)
            if self._settings["step_rule"] == "official":
                x_t = x_t - alpha * grad  # paper §3.2: x_t ← x_t − α·∇ₓL
            else:  # ours: the same direction, α noise-stds long (σ_t = √(1 − ᾱ_t); flow matching: σ)
                x_t = x_t - normalized_step_size(grad, alpha, noise_std(state.scheduler, state.timestep)) * grad
        return x_t.detach()

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
