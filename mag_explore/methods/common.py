"""Small pieces shared by the methods: layouts tied to the prompt, the non-finite check."""
from __future__ import annotations

from typing import Callable

import torch

from ..families import attention_grids, span_tokenizer
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
    # the text keys' indices: CLIP tokens (SD, SDXL), T5 tokens (Flux), 77 CLIP then T5 (SD3)
    layout = layout.resolve(span_tokenizer(sampler.pipe, getattr(sampler, "max_sequence_length", None)),
                            sampler.prompt)
    latent_hw = (sampler.height // sampler.pipe.vae_scale_factor, sampler.width // sampler.pipe.vae_scale_factor)
    every_layer = attention_grids(sampler.pipe, latent_hw)
    grids = {n: hw for n, hw in every_layer.items() if uses_layer(n, hw)}
    if not grids:
        sizes = sorted({f"{h}x{w}" for h, w in every_layer.values()})
        raise InputError(f"{method}: no cross-attention layer matched its layer options (layer_sizes, places or "
                         f"layers); this UNet's layers are {sizes} at {sampler.height}x{sampler.width}")
    check_regions_at_layers(layout, grids, mask_mode, method, masks_at)
    return layout


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
