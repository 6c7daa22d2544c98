"""The guidance step that MAG and layout guidance share, on one screen.

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


def guidance_step(state, latents: torch.Tensor, loss_hook, step_size: float, *,
                  checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t ← x_t − step_size · ∇ₓ L; returns (the new x_t, L at the old x_t, ∇ₓ L).

    L is what ``loss_hook`` adds up in one UNet pass on x_t with the conditional prompt
    only (marked as phase "guidance", so stores and edit hooks stay out of it).
    """
    unet = state.pipe.unet
    latents = latents.detach().requires_grad_(True)  # 1. only the latent requires grad
    loss_hook.reset()
    with torch.enable_grad(), frozen_weights(unet), gradient_checkpointing(unet, checkpointing), \
            state.attention.phase_as("guidance", ("cond",) * latents.shape[0]):
        # 2. a conditional-only UNet pass; the loss hook adds up its loss layer by layer
        model_input = state.scheduler.scale_model_input(latents, state.timestep)
        unet(model_input, state.timestep, encoder_hidden_states=state.cond_embeddings, return_dict=False)
        if loss_hook.loss is None:
            raise ValueError(f"no cross-attention layer matched {loss_hook.layers_wanted}")
        # 3. autograd: the gradient of the loss with respect to x_t
        (grad,) = torch.autograd.grad(loss_hook.loss, latents)
    # 4. one gradient step on the latent
    return (latents - step_size * grad).detach(), loss_hook.loss.detach(), grad


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
    before = getattr(unet, "is_gradient_checkpointing", False)
    if enabled and not before:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled and not before:
            unet.disable_gradient_checkpointing()
