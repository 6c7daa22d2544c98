"""What a hook sees: the attention probabilities of one cross-attention layer, plus a context.

A *hook* is a small object with up to three methods, each optional:

* ``edit_scores(scores, ctx)`` - change the logits QKᵀ/√d before the softmax
  (paint-with-words adds a bonus there); return the new scores or ``None``.
* ``edit_probs(probs, ctx)``  - change the probabilities after the softmax
  (masked-attention swapping overwrites them); return the new probs or ``None``.
* ``observe(probs, ctx)``     - read the probabilities that the layer really used
  (the attention store records them; MAG turns them into a loss).

All tensors are shaped ``(batch, heads, pixels, tokens)`` and are float32, even when
the model runs in float16, so that sums and losses are accurate.

On joint attention (Flux.1, SD3: :mod:`mag_explore.attention.joint`) text and image tokens
share one softmax; the three methods see its *image→text block* (the rows of the image
tokens, the columns of the text tokens), the same shape as a cross-attention map. A hook
may also have ``observe_joint(probs, ctx)``: it then gets the whole joint matrix
``(batch, heads, tokens, tokens)`` (text first on Flux, image first on SD3:
``ctx.text_first``), e.g. to look at text→image or image→image attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionContext:
    """Where and when an attention map was computed."""

    layer: str  # e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    place: str  # "down", "mid" or "up": which half of the UNet; "double"/"single" (Flux), "joint" (SD3)
    height: int  # attention resolution, from the latent's shape (works for non-square images)
    width: int
    heads: int
    step_index: int | None  # 0 = first denoising step; None if the sampler did not say
    timestep: int | None  # the scheduler's timestep t (999 ... 0)
    batch_roles: tuple[str, ...]  # one of "uncond" / "cond" per batch item
    phase: str = "denoise"  # "denoise" (the CFG step) or "guidance" (a loss forward pass, as in MAG)
    num_prompt_tokens: int | None = None  # BOS + prompt tokens + EOS, if known (T5: no BOS; SD3: 77 + T5's)
    num_text_tokens: int | None = None  # joint attention: the text keys in its sequence (None: cross-attention)
    text_first: bool | None = None  # joint attention: text tokens before the image tokens (Flux) or after (SD3)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.height, self.width)

    def rows(self, role: str) -> list[int]:
        """Batch rows that belong to one CFG half, e.g. ``ctx.rows("cond")``."""
        return [i for i, r in enumerate(self.batch_roles) if r == role]


class AttentionHook:
    """Base class with do-nothing methods; subclasses override what they need.

    ``active(ctx)`` lets a hook switch itself off for some steps, layers or phases
    without the processor computing anything for it.
    """

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "denoise"

    def edit_scores(self, scores: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        return None

    def edit_probs(self, probs: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        return None

    def observe(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        return None
