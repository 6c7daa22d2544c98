"""Cross-attention (UNet) and joint attention (Flux, SD3): the processors that expose it, the hook protocol, the store."""
from .hooks import AttentionContext, AttentionHook
from .processor import (
    AttentionController,
    CrossAttentionProcessor,
    attention_grid,
    cross_attention_hooks,
    cross_attention_grids,
    cross_attention_layer_names,
    layer_place,
    remove_cross_attention_hooks,
)
from .joint import JointAttentionProcessor, joint_attention_hooks, joint_attention_layer_names
from .store import AttentionStore

__all__ = [
    "AttentionContext",
    "AttentionController",
    "AttentionHook",
    "AttentionStore",
    "CrossAttentionProcessor",
    "JointAttentionProcessor",
    "attention_grid",
    "cross_attention_hooks",
    "cross_attention_grids",
    "cross_attention_layer_names",
    "joint_attention_hooks",
    "joint_attention_layer_names",
    "layer_place",
    "remove_cross_attention_hooks",
]
