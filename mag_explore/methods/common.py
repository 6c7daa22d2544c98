"""Small pieces shared by the methods: layouts tied to the prompt, frozen weights, the guidance pass."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..families import denoise


def layout_for_run(layout, sampler):
    """The layout resolved against the sampler's prompt and sized like its image."""
    layout = layout.for_generation(sampler.height, sampler.width)  # warns if it had to resize
    return layout.resolve(sampler.pipe.tokenizer, sampler.prompt)


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
    """Recompute activations in the backward pass (less memory, ~30 % more time); restored after."""
    before = getattr(unet, "is_gradient_checkpointing", False)
    if enabled and not before:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled and not before:
            unet.disable_gradient_checkpointing()


def guidance_loss_and_grad(state, latents: torch.Tensor, hook, checkpointing: bool,
                           no_layer_message: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss read from the cross-attention of x_t, and its gradient with respect to x_t.

    One UNet pass with the *conditional* prompt only, marked as phase "guidance" so that
    stores and edit hooks stay out of it; ``hook`` (with ``reset()`` and ``.loss``) adds up
    its loss over the layers it watches. Only the latent requires grad.
    """
    unet = state.pipe.unet
    latents = latents.detach().requires_grad_(True)
    hook.reset()
    with torch.enable_grad(), frozen_weights(unet), gradient_checkpointing(unet, checkpointing), \
            state.attention.phase_as("guidance", ("cond",) * latents.shape[0]):
        model_input = state.scheduler.scale_model_input(latents, state.timestep)
        denoise(state.pipe, model_input, state.timestep, state.cond)
        loss = hook.loss
        if loss is None:
            raise ValueError(no_layer_message)
        # With gradient checkpointing the backward pass runs the forward again, hooks included
        # (it must, to rebuild the loss's own graph), and the hook would count every layer
        # twice: keep what it held after the one forward pass.
        forward_records = {name: list(value) if isinstance(value, list) else value
                           for name, value in vars(hook).items()}
        (grad,) = torch.autograd.grad(loss, latents)
        vars(hook).update(forward_records)
    return loss.detach(), grad


class NonFiniteGuidanceError(FloatingPointError):
    """The guidance loss or its gradient became inf/NaN."""


def check_finite(method: str, state, loss: torch.Tensor, grad: torch.Tensor, setting: str) -> None:
    """Stop with a clear message instead of letting NaN spread into the image.

    ``setting`` names the knob to turn down, e.g. ``"alpha=0.08"``.
    """
    if not torch.isfinite(loss) or not torch.isfinite(grad).all():
        what = "loss" if not torch.isfinite(loss) else "gradient"
        raise NonFiniteGuidanceError(
            f"{method} at step {state.step_index} (t={int(state.timestep)}): the guidance {what} is not "
            f"finite (loss={float(loss):.4g}, {setting}). Try a smaller {setting.split('=')[0]}, or fp32."
        )
