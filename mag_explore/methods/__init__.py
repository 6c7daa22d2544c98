"""Methods that steer cross-attention, each a control of the same sampler."""
from .mag import MaskedAttentionGuidance, MagLossHook, NonFiniteGuidanceError, mag_loss_terms
from .swap import MaskedAttentionSwap

__all__ = ["MaskedAttentionGuidance", "MagLossHook", "MaskedAttentionSwap", "NonFiniteGuidanceError", "mag_loss_terms"]
