"""Methods that steer cross-attention, each a control of the same sampler."""
import inspect
import warnings
from typing import Sequence

from ..attention import AttentionStore
from ..sampling import GenerationResult, generate

from .common import NonFiniteGuidanceError
from .guidance import guidance_pass
from .layout_guidance import LayoutGuidance, layout_loss_terms
from .mag import MaskedAttentionGuidance, MagLossHook, balanced_loss_terms, mag_loss_terms
from .paint_with_words import PaintWithWords, noise_level, pww_bonus
from .swap import MaskedAttentionSwap

__all__ = ["LayoutGuidance", "MaskedAttentionGuidance", "MagLossHook", "MaskedAttentionSwap",
           "NonFiniteGuidanceError", "PaintWithWords", "balanced_loss_terms", "guidance_pass", "layout_loss_terms",
           "mag_loss_terms", "noise_level", "pww_bonus"]

#: Method names of ``make_controls``: the short ``name`` of each control class.
METHODS = {"swap": MaskedAttentionSwap, "mag": MaskedAttentionGuidance, "pww": PaintWithWords, "lg": LayoutGuidance}
METHOD_NAMES = ("none", *METHODS)


def make_controls(method: str, layout=None, **options) -> list:
    """The controls of a method by name (see ``METHOD_NAMES``), with its ``options``.

    "none": plain sampling; "swap" (``MaskedAttentionSwap``), "mag"
    (``MaskedAttentionGuidance``): the paper's two methods; "pww" (``PaintWithWords``),
    "lg" (``LayoutGuidance``): the baselines. ``options`` are that class's keywords, e.g.
    ``make_controls("mag", layout, alpha=0.1, while_t_above=700)``; settings left out
    take the model's defaults (MAG, swap) or the published ones (baselines) when the run
    starts. Options a method does not have are an error naming them.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; use one of {METHOD_NAMES}")
    given = {k: v for k, v in options.items() if v is not None}
    if method == "none":
        if given:
            raise ValueError(f"method 'none' takes no options, got {sorted(given)}")
        return []
    if layout is None:
        raise ValueError(f"method {method!r} needs a layout")
    cls = METHODS[method]
    accepted = [name for name, p in inspect.signature(cls).parameters.items()
                if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} has no options {unknown}; {cls.__name__} accepts {accepted}")
    return [cls(layout, **given)]


def run_methods_on(pipe, layout, methods: Sequence[str] = ("none", "swap", "mag"), seed: int = 0,
                   num_inference_steps: int | None = None, store: bool = True, progress: bool = False,
                   method_options: dict | None = None) -> dict[str, GenerationResult]:
    """The layout's prompt once per method, same seed; attention recorded (head mean) if ``store``.

    ``method_options`` maps a method to its options, e.g. ``{"mag": {"alpha": 0.1}}``.
    """
    options = method_options or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a layout resized to the image size: expected here
        return {
            method: generate(pipe, layout.prompt, num_inference_steps=num_inference_steps, seed=seed,
                             progress=progress, controls=make_controls(method, layout, **options.get(method, {})),
                             store=AttentionStore() if store else None)
            for method in methods
        }


__all__ += ["make_controls", "run_methods_on", "METHOD_NAMES", "METHODS"]
