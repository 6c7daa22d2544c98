"""Methods that steer cross-attention, each a control of the same sampler."""
from .mag import MaskedAttentionGuidance, MagLossHook, NonFiniteGuidanceError, mag_loss_terms
from .swap import MaskedAttentionSwap

__all__ = ["MaskedAttentionGuidance", "MagLossHook", "MaskedAttentionSwap", "NonFiniteGuidanceError", "mag_loss_terms"]


def make_controls(method: str, layout=None, *, alpha: float = 0.08, lmbda: float = 0.5,
                  guide_steps=700, swap_steps=700, **options) -> list:
    """The controls of a method by name: "none", "swap" or "mag" (plus extra ``options``)."""
    if method == "none":
        return []
    if layout is None:
        raise ValueError(f"method {method!r} needs a layout")
    if method == "swap":
        return [MaskedAttentionSwap(layout, steps=swap_steps, **options)]
    if method == "mag":
        return [MaskedAttentionGuidance(layout, alpha=alpha, lmbda=lmbda, steps=guide_steps, **options)]
    raise ValueError(f"unknown method {method!r}; use one of {METHOD_NAMES}")


METHOD_NAMES = ("none", "swap", "mag")
__all__ += ["make_controls", "METHOD_NAMES"]
