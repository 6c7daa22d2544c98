"""The guidance pass that MAG and layout guidance share: L and ∇ₓL at x_t, on one screen.

Each method then writes its own update where a reader looks for it, in its ``before_step``.

A *loss hook* is an attention hook that is active in the phase "guidance" only, adds up
a loss over the cross-attention layers it watches while the UNet runs, and has:

* ``reset()`` - forget the last pass;
* ``loss`` - the loss summed so far (None until one of its layers ran);
* ``layers_wanted`` - which layers it watches, in words (for the error when none ran).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..families import denoise, denoiser, model_input as scaled_input


def guidance_pass(state, latents: torch.Tensor, loss_hook, *,
                  checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """L at x_t and its gradient ∇ₓ L, as float32 (the caller makes the step with them).

    L is what ``loss_hook`` adds up in one denoiser pass on x_t with the conditional prompt
    only (marked as phase "guidance", so stores and edit hooks stay out of it).
    """
    # 1. only the latent requires grad; it stays float32 on an fp16 UNet (the cast is part of
    #    the graph), so the caller's update is made in float32, as in the official code
    latents = latents.detach().float().requires_grad_(True)
    loss_hook.reset()
    with guidance_phase(state, latents.shape[0], checkpointing):
        # 2. a conditional-only pass; the loss hook adds up its loss layer by layer
        conditional_pass(state, latents)
        loss = loss_hook.loss
        if loss is None:
            raise ValueError(f"no attention layer matched {loss_hook.layers_wanted}")
        # 3. autograd: the gradient of the loss with respect to x_t. With gradient checkpointing the
        # backward pass runs the forward again, hooks included (it must, to rebuild the loss's own
        # graph), so the hook would count every layer twice: keep what it held after the forward.
        forward_records = _copy_records(loss_hook) if checkpointing else None
        (grad,) = torch.autograd.grad(loss, latents)
        if forward_records is not None:
            vars(loss_hook).update(forward_records)
    return loss.detach(), grad


def _copy_records(hook) -> dict:
    """The hook's attributes, its lists copied (the backward pass's re-run appends to them)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(hook).items()}


@contextmanager
def guidance_phase(state, rows: int, checkpointing: bool = False) -> Iterator[None]:
    """The setting of every guidance pass: grad on, the denoiser's weights frozen, ``rows``
    conditional rows in the phase "guidance" (so stores and edit hooks stay out of it).
    The learner's exercises (``learner.LearnerMAG``) run in it too, so theirs is this pass."""
    unet = denoiser(state.pipe)  # the UNet, or Flux's / SD3's transformer
    with torch.enable_grad(), frozen_weights(unet), gradient_checkpointing(unet, checkpointing), \
            state.attention_controller.phase_as("guidance", ("cond",) * rows):
        yield


def conditional_pass(state, latents: torch.Tensor, cond=None) -> torch.Tensor:
    """The denoiser once on x_t = ``latents`` with ``cond`` (default: the run's conditional prompt).

    Through the family's ``denoise`` (SDXL: pooled embeddings and time ids; Flux / SD3: the
    transformer), the input cast to the denoiser's dtype inside the graph, so a float32 latent
    that requires grad gets a float32 gradient from an fp16 model. Call it in :func:`guidance_phase`.
    """
    model_input = scaled_input(state.scheduler, latents, state.timestep).to(denoiser(state.pipe).dtype)
    return denoise(state.pipe, model_input, state.timestep, state.cond if cond is None else cond)


@contextmanager
def frozen_weights(*modules: torch.nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` on every weight, and put each flag back afterwards.

    Guidance needs the gradient with respect to the latent only; weights that require
    grad would make autograd keep work for them too.
    """
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def gradient_checkpointing(unet, enabled: bool) -> Iterator[None]:
    """Recompute activations in the backward pass (less memory, more time); restored after."""
    if not enabled:  # diffusers' is_gradient_checkpointing walks every module: ~5 ms a step on a small UNet
        yield
        return
    before = getattr(unet, "is_gradient_checkpointing", False)
    if enabled and not before:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled and not before:
            unet.disable_gradient_checkpointing()
