"""mag-explore: see and steer cross-attention in text-to-image diffusion models.

    >>> import mag_explore as mx
    >>> pipe = mx.load_pipeline()                      # the embedded "shapes" model on a CPU
    >>> layout = mx.Layout.from_json(mx.data_path("layouts", "left_right.json"))
    >>> mag = mx.MaskedAttentionGuidance(layout)       # α, λ, "while t > 700": the model's defaults
    >>> result = mx.generate(pipe, layout.prompt, controls=[mag], store=mx.AttentionStore())
    >>> result.images[0]
"""
from .attention import (
    AttentionContext,
    AttentionHook,
    AttentionStore,
    cross_attention_hooks,
    cross_attention_layer_names,
    remove_cross_attention_hooks,
)
from .layouts import Layout, Region, ellipse, polygon, rect
from .methods import (
    LayoutGuidance,
    MaskedAttentionGuidance,
    MaskedAttentionSwap,
    NonFiniteGuidanceError,
    PaintWithWords,
    guidance_pass,
    make_controls,
    mag_loss_terms,
    run_methods_on,
)
from .data import data_path
from .models import load_pipeline, model_defaults, use_cpu_threads
from .sampling import Control, GenerationResult, Hooks, Sampler, StepState, decode_latents, encode_text, generate
from .schedule import StepRange
from .text import show_tokens, token_indices, token_table, words_of

__version__ = "0.1.0"

__all__ = [
    "AttentionContext", "AttentionHook", "AttentionStore", "Control", "GenerationResult", "Hooks", "Layout",
    "LayoutGuidance", "MaskedAttentionGuidance", "MaskedAttentionSwap", "NonFiniteGuidanceError", "PaintWithWords",
    "Region", "Sampler", "StepRange", "StepState", "cross_attention_hooks", "cross_attention_layer_names",
    "data_path", "decode_latents", "ellipse", "encode_text", "generate", "guidance_pass", "load_pipeline", "mag_loss_terms",
    "make_controls", "model_defaults", "polygon", "rect", "remove_cross_attention_hooks", "run_methods_on",
    "show_tokens", "token_indices", "token_table", "use_cpu_threads", "words_of",
]

# Real-image editing (DDIM inversion + MAG), kept in its own block.
from .editing import EditResult, edit_image, layout_from_attention  # noqa: E402
from .editing import InversionResult, invert, psnr, reconstruct  # noqa: E402

__all__ += ["EditResult", "InversionResult", "edit_image", "invert", "layout_from_attention", "psnr", "reconstruct"]
