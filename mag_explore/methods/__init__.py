"""Methods that steer cross-attention, each a control of the same sampler."""
from .layout_guidance import LayoutGuidance, layout_loss_terms
from .common import NonFiniteGuidanceError
from .mag import MaskedAttentionGuidance, MagLossHook, mag_loss_terms
from .paint_with_words import PaintWithWords, noise_level, pww_bonus
from .swap import MaskedAttentionSwap

__all__ = ["LayoutGuidance", "MaskedAttentionGuidance", "MagLossHook", "MaskedAttentionSwap",
           "NonFiniteGuidanceError", "PaintWithWords", "layout_loss_terms", "mag_loss_terms",
           "noise_level", "pww_bonus"]


def make_controls(method: str, layout=None, *, alpha: float = 0.08, lmbda: float = 0.5,
                  guide_steps=700, swap_steps=700, **options) -> list:
    """The controls of a method by name (see ``METHOD_NAMES``), plus extra ``options``.

    "none": plain sampling; "swap", "mag": the paper's two methods; "pww": paint-with-words
    (options: weight, steps, mask_mode); "lg": backward layout guidance (options:
    loss_scale, loss_threshold, max_iter, steps, layers). The baselines use their published
    defaults; ``alpha``, ``lmbda``, ``guide_steps`` and ``swap_steps`` are for MAG and swap only.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; use one of {METHOD_NAMES}")
    if method == "none":
        return []
    if layout is None:
        raise ValueError(f"method {method!r} needs a layout")
    if method == "swap":
        return [MaskedAttentionSwap(layout, steps=swap_steps, **options)]
    if method == "mag":
        return [MaskedAttentionGuidance(layout, alpha=alpha, lmbda=lmbda, steps=guide_steps, **options)]
    if method == "pww":
        return [PaintWithWords(layout, **options)]
    return [LayoutGuidance(layout, **options)]


METHOD_NAMES = ("none", "swap", "mag", "pww", "lg")
__all__ += ["make_controls", "METHOD_NAMES"]
