"""Reference solutions of the course's exercises (``mag_explore.course.exercises`` checks against them).

Read one only after trying: ``exercises.show_solution("mag_loss")`` prints its source.
Each is written the plain way, one idea per line, as a learner would write it; the
package's own implementations (``methods/mag.py``, ``methods/swap.py``) do the same work
with a few more options.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


# -- 01: one layer's cross-attention probabilities ---------------------------------------
def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) over the tokens. q: (batch, heads, pixels, d); k: (batch, heads, tokens, d)."""
    d = q.shape[-1]
    scores = q @ k.transpose(-1, -2) / d ** 0.5  # (batch, heads, pixels, tokens)
    return scores.softmax(dim=-1)


# -- 08: the image→text block of a joint softmax ---------------------------------------------
def joint_image_text_probs(q: torch.Tensor, k: torch.Tensor, num_text_tokens: int) -> torch.Tensor:
    """The image→text block of softmax(Q Kᵀ / √d) over the *whole* joint sequence [text; image].

    q, k: (batch, heads, text + image tokens, d), rotary embeddings already applied.
    Returns (batch, heads, image tokens, text tokens); its rows sum to less than one.
    """
    d = q.shape[-1]
    scores = q.float() @ k.float().transpose(-1, -2) / d ** 0.5  # every token against every token
    probs = scores.softmax(dim=-1)                              # one softmax over text *and* image keys
    return probs[..., num_text_tokens:, :num_text_tokens]       # rows: image queries; columns: text keys

# -- 03: the masked-attention swap, as a hook's edit ---------------------------------------
def swap_edit(probs: torch.Tensor, masks: torch.Tensor, token_groups: Sequence[Sequence[int]],
              cond_rows: Sequence[int]) -> torch.Tensor:
    """Region tokens get 1/len(tokens) inside their mask and 0 outside, conditional rows only.

    probs: (batch, heads, pixels, tokens); masks: (regions, pixels) of 0/1.
    No renormalisation: the other tokens keep their probabilities (as the official code).
    """
    edited = probs.clone()  # never change the tensor the layer gave us
    for mask, tokens in zip(masks, token_groups):
        for row in cond_rows:
            for token in tokens:
                edited[row, :, :, token] = mask / len(tokens)
    return edited


# -- 04: the MAG loss of one layer, and one MAG step ---------------------------------------
def mag_loss(probs: torch.Tensor, masks: torch.Tensor, token_groups: Sequence[Sequence[int]],
             lmbda: float) -> torch.Tensor:
    """−Σ A[inside, tokens] + λ Σ A[outside, tokens], summed over batch, heads, pixels, regions."""
    loss = probs.new_zeros(())
    for mask, tokens in zip(masks, token_groups):
        attention = probs[..., list(tokens)].sum(-1)  # (batch, heads, pixels): the region's words together
        inside = (attention * mask).sum()
        outside = (attention * (1 - mask)).sum()
        loss = loss + (-inside + lmbda * outside)
    return loss


def mag_step(inputs, alpha: float, lmbda: float, loss_fn=mag_loss) -> torch.Tensor:
    """One MAG update of x_t: x_t − α ∇ₓ L, L read from a conditional-only pass.

    ``inputs`` (a ``GuidanceInputs``) has ``x_t``, ``cond_embeddings``,
    ``uncond_embeddings``, ``token_groups`` and ``attention_of(x, embeddings)``, which runs the
    denoiser once and returns every cross-attention layer's ``(probs, masks)``.
    """
    x = inputs.x_t.detach().requires_grad_(True)                  # 1. the latent is what we move
    layers = inputs.attention_of(x, inputs.cond_embeddings)            # 2. one pass, conditional prompt only
    loss = sum(loss_fn(probs, masks, inputs.token_groups, lmbda) for probs, masks in layers)  # 3. all layers
    (grad,) = torch.autograd.grad(loss, x)                      # 4. dL/dx_t
    return (x - alpha * grad).detach()                          # 5. one step downhill


# -- 05: scoring ---------------------------------------------------------------------------
def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∧ b| / |a ∨ b| of two bool masks; 0.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def paired_difference(scores_a: dict, scores_b: dict) -> float:
    """Mean of b − a over the keys (e.g. (layout, seed)) that both methods scored."""
    shared = [key for key in scores_a if key in scores_b]
    if not shared:
        raise ValueError("the two methods share no (layout, seed): nothing to pair")
    return float(np.mean([scores_b[key] - scores_a[key] for key in shared]))


# -- 07: a variation: layout guidance's normalised loss ------------------------------------
def share_loss(probs: torch.Tensor, masks: torch.Tensor, token_groups: Sequence[Sequence[int]],
               lmbda: float):
    """Σ_r (1 − inside_r / total_r)²; returns (loss, inside, outside) as a MAG ``loss_fn``."""
    inside, outside = [], []
    for mask, tokens in zip(masks, token_groups):
        attention = probs[..., list(tokens)].sum(-1)
        inside.append((attention * mask).sum())
        outside.append((attention * (1 - mask)).sum())
    inside, outside = torch.stack(inside), torch.stack(outside)
    share = inside / (inside + outside).clamp_min(1e-12)
    return ((1 - share) ** 2).sum(), inside, outside
