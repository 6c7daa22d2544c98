"""Cross-attention: the processor that exposes it, the hook protocol, the store."""
from .hooks import AttentionContext, AttentionHook
from .processor import (
    AttentionController,
    CrossAttentionProcessor,
    attention_resolution,
    cross_attention_hooks,
    cross_attention_grids,
    cross_attention_layer_names,
    layer_place,
    remove_cross_attention_hooks,
)
from .store import AttentionStore

__all__ = [
    "AttentionContext",
    "AttentionController",
    "AttentionHook",
    "AttentionStore",
    "CrossAttentionProcessor",
    "attention_resolution",
    "cross_attention_hooks",
    "cross_attention_grids",
    "cross_attention_layer_names",
    "layer_place",
    "remove_cross_attention_hooks",
]
