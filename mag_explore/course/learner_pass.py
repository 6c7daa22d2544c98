"""What the learner's exercises need to run the denoiser as the engine does (``learner.LearnerMAG``).

The pass itself is the engine's (``methods.guidance.guidance_phase`` and ``conditional_pass``);
this module maps what a learner hands it (the embeddings tensor of ``GuidanceInputs``) to the
family's whole conditioning, and says in one line where an exercise does not apply to a family.
"""
from __future__ import annotations

import dataclasses

import torch

from ..families import family, is_mmdit


def conditioning_of(state, embeddings: torch.Tensor):
    """The run's ``Conditioning`` whose embeddings these are (cond or uncond).

    SDXL's UNet also needs the pooled embeddings and time ids, Flux and SD3 the pooled vector:
    those come with the embeddings the learner picked. Embeddings of the learner's own make
    get the conditional prompt's other parts.
    """
    for cond in (state.cond, state.uncond):
        if cond is not None and embeddings is cond.embeddings:
            return cond
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"attention(x, embeddings): embeddings must be a tensor (step.cond_embeddings), "
                        f"not {type(embeddings).__name__}")
    return dataclasses.replace(state.cond, embeddings=embeddings)


def require_unet(pipe, what: str, instead: str) -> None:
    """One line, where an exercise reads a UNet's cross-attention and ``pipe`` has joint attention."""
    if is_mmdit(pipe) or not hasattr(pipe, "unet"):
        raise ValueError(f"{what} reads a UNet's cross-attention; {type(pipe).__name__} (family "
                         f"{family(pipe)!r}) has none: {instead}")
