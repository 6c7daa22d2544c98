"""Attention injection (prompt-to-prompt style): reuse another run's attention maps for some words.

Editing a real image runs the sampler twice from the same inverted noise: once plainly
(the *source* run, which redraws the image) and once with the edit. Words that should
stay where they are keep their place best when, in the early steps that decide the
layout, the edited run looks at the image exactly as the source run did. So for those
steps this control replaces, in the conditional half of classifier-free guidance, the
probabilities of the kept words' tokens by the maps the source run stored (per head).
Other tokens are left alone, so rows no longer sum exactly to one, as with swapping.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..attention import AttentionContext, AttentionHook, AttentionStore
from ..sampling import Control
from ..schedule import StepRange, resolve_step_range


def injection_store(tokens: Sequence[int], steps: Sequence[int] | None = None) -> AttentionStore:
    """An ``AttentionStore`` that keeps what injection needs: every head, float32, these tokens."""
    return AttentionStore(tokens=list(tokens), heads="all", steps=steps, dtype=torch.float32)


class AttentionInjection(Control, AttentionHook):
    """Inject the stored source-run maps of ``tokens`` during the early steps.

    Args:
        source: the store of the source run, recorded with ``injection_store(tokens)``
            (every head, the injected tokens, at least the injected steps).
        tokens: token indices (BOS = 0) whose maps are replaced.
        step_range: step indices ``(start, stop)`` (default ``(0, 10)``);
        while_t_above: or inject while t > this instead (or a StepRange).
    """

    name = "inject"

    def __init__(self, source: AttentionStore, tokens: Sequence[int], *,
                 step_range: tuple | StepRange | None = None, while_t_above: int | StepRange | None = None):
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("AttentionInjection needs at least one token index")
        if source.heads != "all":
            raise ValueError(f"the source store keeps heads={source.heads!r}; record it with "
                             "injection_store(tokens) (heads='all') to inject per head")
        missing = [t for t in tokens if source.token_indices is None or t not in source.token_indices]
        if missing:
            raise ValueError(f"token indices {missing} were not stored by the source run; "
                             f"stored: {source.token_indices}")
        self.steps = resolve_step_range(while_t_above, step_range, default=StepRange(start=0, stop=10),
                                        what="AttentionInjection")
        self.source, self.tokens = source, tokens
        self.columns = [source.token_indices.index(t) for t in tokens]
        self.injected_steps: list[int] = []

    def attention_hooks(self) -> list:
        return [self]

    def start(self, sampler) -> None:
        chosen = self.steps.validate(sampler.timesteps, sampler.scheduler.config.num_train_timesteps,
                                     "injection steps")
        missing = sorted(set(chosen) - set(self.source.step_indices))
        if missing:
            raise ValueError(f"the source run stored no maps for injection steps {missing}; "
                             f"stored steps: {self.source.step_indices}")
        self.injected_steps = []

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "denoise" and self.steps.contains(ctx.step_index, ctx.timestep)

    def edit_probs(self, probs: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        stored = self.source.get(ctx.step_index, ctx.layer)[..., self.columns]  # (b, heads, h, w, tokens)
        rows = ctx.rows("cond")
        if stored.shape[0] != len(rows) or stored.shape[1] != probs.shape[1]:
            raise ValueError(f"layer {ctx.layer}: stored maps {tuple(stored.shape)} do not fit "
                             f"{len(rows)} conditional rows × {probs.shape[1]} heads")
        edited = probs.clone()
        cond = edited[rows]
        cond[..., self.tokens] = stored.flatten(2, 3).to(probs.device, probs.dtype)  # (b, heads, pixels, tokens)
        edited[rows] = cond
        if not self.injected_steps or self.injected_steps[-1] != ctx.step_index:
            self.injected_steps.append(ctx.step_index)
        return edited

    @property
    def diagnostics(self) -> dict:
        return {"injected_steps": list(self.injected_steps)}
