"""Plugs a learner's own functions into the engine, so the course runs *their* code.

* :func:`capture_qk` - one layer's queries, keys and the probabilities the hook recorded
  at the first step (notebook 01: compute softmax(QKᵀ/√d) yourself and compare);
  :func:`capture_joint_qk`, the same for a joint-attention layer of Flux / SD3 (notebook 08);
* :class:`SwapHook` - a swap edit ``fn(probs, masks, token_groups, cond_rows)`` as a
  sampler control (notebook 03);
* :class:`GuidanceInputs` and :class:`LearnerMAG` - what one MAG step needs, and a
  control that runs a learner's ``mag_step(inputs, alpha, lmbda)`` before each guided step
  (notebook 04). Its pass is the engine's (``methods.guidance.conditional_pass``): the
  denoiser on x_t with the conditional prompt only, phase "guidance", weights frozen. The
  learner writes the paper's step, x_t − α∇L; on a model whose MAG uses our normalized step
  (the embedded shapes model) the engine rescales that update to α noise-stds, exactly as
  ``MaskedAttentionGuidance`` does, and resizes masks as the model's MAG does.

Both act like the package's methods: ``while_t_above=T`` (active while t > T) or
``step_range=(start, stop)`` (step indices); neither: the model's ``while_t_above``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..attention import AttentionContext, AttentionHook
from ..families import noise_std
from ..methods.common import check_finite, layout_for_run
from ..methods.guidance import conditional_pass, guidance_phase
from .learner_pass import conditioning_of, require_unet
from ..methods.mag import STEP_RULES, layer_sizes_in_effect, normalized_step_size
from ..models.load import model_defaults
from ..sampling import Control, Hooks, Sampler, StepState
from ..schedule import StepRange, resolve_step_range
from ..validation import check_choice


def _resolve(what: str, sampler, while_t_above, step_range) -> StepRange:
    """The step range of a learner's control: the keywords, else the model's "guide while t > ..."."""
    default = StepRange(while_t_above=int(model_defaults(sampler.pipe)["while_t_above"]))
    steps = resolve_step_range(while_t_above, step_range, default=default, what=what)
    steps.validate(sampler.timesteps, sampler.scheduler.config.num_train_timesteps, f"{what} steps")
    return steps


# ---------------------------------------------------------------------------- 01: q and k
class _FirstStepProbs(AttentionHook):
    def __init__(self, layer: str):
        self.layer, self.probs = layer, None

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "denoise" and ctx.layer == self.layer and ctx.step_index == 0

    def observe(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        self.probs = probs.detach().clone()


def capture_qk(pipe, prompt: str, layer: str | None = None, seed: int = 0,
               num_inference_steps: int | None = None) -> dict:
    """At step 0 of a run: one cross-attention layer's q, k (batch, heads, ·, d) and its recorded probs.

    q and k are computed from the layer's inputs with its own ``to_q`` / ``to_k`` weights,
    as the attention processor does; ``probs`` is what a hook observed in that layer.
    """
    from ..attention import cross_attention_layer_names

    require_unet(pipe, "capture_qk", "use capture_joint_qk (notebook 08)")
    names = cross_attention_layer_names(pipe.unet)
    layer = names[0] if layer is None else layer
    if layer not in names:
        raise ValueError(f"layer {layer!r} is not a cross-attention layer; layers: {names}")
    module = pipe.unet.get_submodule(layer)
    inputs = {}

    def keep_inputs(mod, args, kwargs):
        if "hidden_states" not in inputs:
            inputs["hidden_states"] = args[0] if args else kwargs["hidden_states"]
            inputs["context"] = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)

    recorder = _FirstStepProbs(layer)
    handle = module.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        Sampler(pipe, prompt, seed=seed, num_inference_steps=num_inference_steps,
                controls=[Hooks(recorder)]).step()
    finally:
        handle.remove()
    with torch.no_grad():
        hidden, context = inputs["hidden_states"], inputs["context"]
        if module.norm_cross:
            context = module.norm_encoder_hidden_states(context)
        q, k = module.to_q(hidden), module.to_k(context)
        heads = module.heads
        q, k = (x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2).float() for x in (q, k))
    return {"layer": layer, "q": q, "k": k, "probs": recorder.probs}



class _FirstJointInputs(AttentionHook):
    """At step 0 in ``layer``: the attention module's inputs of that call, and the image→text block it gave."""

    def __init__(self, layer: str):
        self.layer, self.latest, self.inputs, self.probs, self.ctx, self.rows = layer, None, None, None, None, []

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "denoise" and ctx.layer == self.layer and ctx.step_index == 0 and self.probs is None

    def observe(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        rows = ctx.rows("cond")
        if rows:  # Flux with true CFG also runs an uncond pass: keep the (first) cond one
            self.inputs, self.ctx, self.rows = self.latest, ctx, rows
            self.probs = probs[rows].detach().float().clone()


def capture_joint_qk(pipe, prompt: str, layer: str | None = None, seed: int = 0,
                     num_inference_steps: int | None = None, **options) -> dict:
    """At step 0 of a Flux or SD3 run: one joint layer's q and k over the whole sequence, and its image→text block.

    Returns ``q``, ``k`` (batch, heads, text + image, d), float32, **rotary embeddings applied**
    as diffusers does (Flux; SD3 has none), in the order [text; image] (SD3's own order, image
    first, is turned round: a softmax does not care how its keys are ordered), and
    ``q_no_rotary`` / ``k_no_rotary`` (the same before the rotation); ``num_text_tokens``;
    ``probs``, what a hook recorded (batch, heads, image tokens, text tokens); ``layer``, ``place``.
    """
    from ..attention.joint import flux_qkv, joint_attention_layer_names, sd3_qkv

    names = joint_attention_layer_names(pipe.transformer)
    layer = names[0] if layer is None else layer
    if layer not in names:
        raise ValueError(f"layer {layer!r} is not a joint-attention layer; layers: {names}")
    module = pipe.transformer.get_submodule(layer)
    recorder = _FirstJointInputs(layer)

    def keep_inputs(mod, args, kwargs):
        recorder.latest = dict(kwargs, hidden_states=args[0] if args else kwargs["hidden_states"])

    handle = module.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        Sampler(pipe, prompt, seed=seed, num_inference_steps=num_inference_steps, controls=[Hooks(recorder)],
                **options).step()
    finally:
        handle.remove()
    inputs, ctx = recorder.inputs, recorder.ctx
    hidden, text = inputs["hidden_states"], inputs.get("encoder_hidden_states")
    with torch.no_grad():
        if ctx.text_first:  # Flux: [text; image] already
            q, k, _ = flux_qkv(module, hidden, text, inputs.get("image_rotary_emb"))
            q0, k0, _ = flux_qkv(module, hidden, text, None)
        else:  # SD3: [image; text] -> [text; image]; no rotary
            q, k, _ = sd3_qkv(module, hidden, text)
            n = hidden.shape[1]
            q, k = (torch.cat([x[:, :, n:], x[:, :, :n]], dim=2) for x in (q, k))
            q0, k0 = q, k
    q, k, q0, k0 = (x[recorder.rows].float() for x in (q, k, q0, k0))  # the cond rows, as probs
    return {"layer": layer, "place": ctx.place, "q": q, "k": k, "q_no_rotary": q0, "k_no_rotary": k0,
            "num_text_tokens": ctx.num_text_tokens, "probs": recorder.probs, "height": ctx.height,
            "width": ctx.width}

# ---------------------------------------------------------------------------- 03: swap
class SwapHook(Control, AttentionHook):
    """A learner's swap edit as a sampler control: ``fn(probs, masks, token_groups, cond_rows)``.

    Acts in the denoising passes of its step range, like ``MaskedAttentionSwap``; masks are
    resized to each layer (nearest).
    """

    name = "my_swap"

    def __init__(self, layout, fn: Callable, *, while_t_above: int | None = None, step_range: tuple | None = None):
        resolve_step_range(while_t_above, step_range, what="SwapHook")  # type errors now
        self.layout, self.fn = layout, fn
        self.while_t_above, self.step_range = while_t_above, step_range
        self.steps: StepRange | None = None
        self.run_layout = None

    def attention_hooks(self) -> list:
        return [self]

    def start(self, sampler) -> None:
        self.run_layout = layout_for_run(self.layout, sampler, "your swap", "nearest")
        self.steps = _resolve("SwapHook", sampler, self.while_t_above, self.step_range)

    @property
    def settings(self) -> dict:
        return self.steps.as_keywords() if self.steps is not None else {}

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "denoise" and self.steps.contains(ctx.step_index, ctx.timestep)

    def edit_probs(self, probs: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        masks = self.run_layout.masks_at(ctx.height, ctx.width, device=probs.device).flatten(1).to(probs.dtype)
        return self.fn(probs, masks, self.run_layout.token_groups, ctx.rows("cond"))


# ---------------------------------------------------------------------------- 04: MAG step
@dataclass
class GuidanceInputs:
    """What one MAG step needs. ``attention_of(x, embeddings)`` runs the denoiser once on ``x``
    and returns each cross-attention layer's ``(probs, masks)``: probs (batch, heads, pixels,
    tokens) float32, masks (regions, pixels) resized to that layer."""

    x_t: torch.Tensor
    cond_embeddings: torch.Tensor
    uncond_embeddings: torch.Tensor | None  # None where the model runs no negative prompt (Flux)
    token_groups: list[list[int]]
    attention_of: Callable[[torch.Tensor, torch.Tensor], list]
    step_index: int = 0
    timestep: int = 0


class _LayerCollector(AttentionHook):
    """Keeps every layer's probabilities (with the graph) and masks during one guidance pass."""

    def __init__(self):
        self.layout, self.mask_mode, self.layers = None, "nearest", []
        self.layer_sizes: set[int] | None = None  # None: every layer

    def uses_size(self, layer: str, hw: tuple[int, int]) -> bool:  # layout_for_run's uses_layer
        return self.layer_sizes is None or max(hw) in self.layer_sizes

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "guidance" and self.uses_size(ctx.layer, (ctx.height, ctx.width))

    def observe(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        masks = self.layout.masks_at(ctx.height, ctx.width, mode=self.mask_mode, device=probs.device).flatten(1)
        self.layers.append((probs.float(), masks.float()))


class LearnerMAG(Control):
    """MAG with a learner's step: before each guided step, ``x_t = step_fn(inputs, alpha, lmbda)``.

    ``step_fn`` gets a :class:`GuidanceInputs`; the control checks that what it returns is
    finite and shaped like x_t. The step rule and the masks' resizing are the model's MAG
    defaults (``mag_step_rule``, ``mag_mask_mode``, ``mag_layer_sizes``: which layers the step
    gets) unless given: with ``step_rule="normalized"`` the
    learner's update d = x_t' − x_t is rescaled to α·σ_t / rms(d) · d, which for d = −α∇L is
    the package's normalized step exactly.
    """

    name = "my_mag"

    def __init__(self, layout, step_fn: Callable, alpha: float, lmbda: float = 0.5, *,
                 while_t_above: int | None = None, step_range: tuple | None = None,
                 step_rule: str | None = None, mask_mode: str | None = None,
                 layer_sizes: list[int] | None = None):
        resolve_step_range(while_t_above, step_range, what="LearnerMAG")  # type errors now
        self.step_rule, self.mask_mode, self.layer_sizes = step_rule, mask_mode, layer_sizes
        self._step_rule = None  # the step rule in effect, after start (the model's where step_rule is None)
        self.layout, self.step_fn = layout, step_fn
        self.alpha, self.lmbda = float(alpha), float(lmbda)
        self.while_t_above, self.step_range = while_t_above, step_range
        self.steps: StepRange | None = None
        self.collector = _LayerCollector()
        self.guided_steps: list[int] = []

    def attention_hooks(self) -> list:
        return [self.collector]

    def start(self, sampler) -> None:
        defaults = model_defaults(sampler.pipe)
        self._step_rule = check_choice("step_rule", self.step_rule or defaults["mag_step_rule"], STEP_RULES)
        self.collector.mask_mode = self.mask_mode or defaults["mag_mask_mode"]
        self.collector.layer_sizes = layer_sizes_in_effect(self.layer_sizes, defaults)
        self.collector.layout = layout_for_run(self.layout, sampler, "your MAG", self.collector.mask_mode,
                                               self.collector.uses_size)
        self.steps = _resolve("LearnerMAG", sampler, self.while_t_above, self.step_range)
        self.guided_steps = []

    @property
    def settings(self) -> dict:
        layer_sizes = self.collector.layer_sizes
        return {"alpha": self.alpha, "lmbda": self.lmbda, "step_rule": self._step_rule, "mask_mode": self.collector.mask_mode,
                "layer_sizes": None if layer_sizes is None else sorted(layer_sizes),
                **self.steps.as_keywords()} if self.steps else {}

    def inputs(self, state: StepState) -> GuidanceInputs:
        collector = self.collector

        def attention_of(x: torch.Tensor, embeddings: torch.Tensor) -> list:
            collector.layers = []
            with guidance_phase(state, x.shape[0]):  # MaskedAttentionGuidance's own pass, on every family and dtype
                conditional_pass(state, x, conditioning_of(state, embeddings))
            return list(collector.layers)

        uncond = None if state.uncond is None else state.uncond.embeddings  # Flux: no negative prompt
        return GuidanceInputs(state.latents, state.cond.embeddings, uncond,
                              collector.layout.token_groups, attention_of, state.step_index, int(state.timestep))

    def before_step(self, state: StepState) -> torch.Tensor:
        if not self.steps.contains(state.step_index, int(state.timestep)):
            return state.latents
        new = self.step_fn(self.inputs(state), self.alpha, self.lmbda)
        if not isinstance(new, torch.Tensor) or new.shape != state.latents.shape:
            raise ValueError(f"your MAG step returned {getattr(new, 'shape', type(new).__name__)}; "
                             f"it must return the new x_t, shaped {tuple(state.latents.shape)}")
        check_finite("your MAG step", state, new.float().sum(), new, f"alpha={self.alpha}")
        new = new.detach().float()
        if self._step_rule == "normalized":  # your step's direction, α noise-stds long (MaskedAttentionGuidance's rule)
            update = new - state.latents.detach().float()
            sigma = noise_std(state.scheduler, state.timestep)
            new = state.latents.detach().float() + normalized_step_size(update, self.alpha, sigma) * update
        self.guided_steps.append(state.step_index)
        return new.to(state.latents.dtype)

    @property
    def diagnostics(self) -> dict:
        return {"guided_steps": list(self.guided_steps)}


def run_learner_mag(pipe, layout, step_fn: Callable, alpha: float, lmbda: float, step_range: tuple,
                    seed: int = 0, num_inference_steps: int | None = None, step_rule: str | None = None) -> torch.Tensor:
    """The final latent of a run with :class:`LearnerMAG` (used by ``check_full_mag``)."""
    sampler = Sampler(pipe, layout.prompt, seed=seed, num_inference_steps=num_inference_steps,
                      controls=[LearnerMAG(layout, step_fn, alpha, lmbda, step_range=step_range, step_rule=step_rule)])
    while not sampler.done:
        sampler.step()
    return sampler.latents
