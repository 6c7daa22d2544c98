"""Small pieces shared by the methods: layouts tied to the prompt, frozen weights, the guidance pass."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..attention import cross_attention_grids
from ..layouts import MASK_MODES
from ..validation import InputError, NonFiniteError, check_choice, check_regions_at_layers


def layout_for_run(layout, sampler, method: str, mask_mode: str,
                   uses_layer: Callable[[str, tuple[int, int]], bool] = lambda name, hw: True,
                   masks_at: Callable | None = None):
    """The layout resolved against the sampler's prompt and sized like its image, checked.

    Every region must keep at least one mask cell at every cross-attention layer the
    method uses (``uses_layer(name, (h, w))``), with the method's masks
    (``masks_at(layout, h, w)``, default ``layout.masks_at`` in ``mask_mode``): see
    ``mag_explore.validation``.
    """
    if not hasattr(layout, "for_generation"):
        raise InputError(f"{method}: layout={layout!r} is not a Layout; build one with Layout.from_json, "
                         "from_color_png, from_official, from_shapes or from_arrays")
    if masks_at is None:
        check_choice(f"{method} mask_mode", mask_mode, MASK_MODES)
    layout = layout.for_generation(sampler.height, sampler.width)  # warns if it had to resize
    layout = layout.resolve(sampler.pipe.tokenizer, sampler.prompt)
    latent_hw = (sampler.height // sampler.pipe.vae_scale_factor, sampler.width // sampler.pipe.vae_scale_factor)
    every_layer = cross_attention_grids(sampler.pipe.unet, latent_hw)
    grids = {n: hw for n, hw in every_layer.items() if uses_layer(n, hw)}
    if not grids:
        sizes = sorted({f"{h}x{w}" for h, w in every_layer.values()})
        raise InputError(f"{method}: no cross-attention layer matched its layer options (resolutions, places or "
                         f"layers); this UNet's layers are {sizes} at {sampler.height}x{sampler.width}")
    check_regions_at_layers(layout, grids, mask_mode, method, masks_at)
    return layout


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
    its loss over the layers it watches. Only the latent requires grad. The latent and
    its gradient are float32 even on an fp16 UNet (the cast to the UNet's dtype is part
    of the graph), so the update x_t - α∇ is made in float32 as in the official code.
    """
    unet = state.pipe.unet
    latents = latents.detach().float().requires_grad_(True)
    hook.reset()
    with torch.enable_grad(), frozen_weights(unet), gradient_checkpointing(unet, checkpointing), \
            state.attention.phase_as("guidance", ("cond",) * latents.shape[0]):
        model_input = state.scheduler.scale_model_input(latents, state.timestep).to(unet.dtype)
        unet(model_input, state.timestep, encoder_hidden_states=state.cond_embeddings, return_dict=False)
        if hook.loss is None:
            raise ValueError(no_layer_message)
        (grad,) = torch.autograd.grad(hook.loss, latents)
    return hook.loss.detach(), grad


class NonFiniteGuidanceError(NonFiniteError):
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
