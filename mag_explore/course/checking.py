"""The machinery of the course's checks: a verdict, a case runner, messages that say what differs,
and the fixed inputs (edge cases included) the checks feed your functions.

``mag_explore.course.exercises`` builds its ``check_…`` functions on these.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import solutions
from .learner import GuidanceInputs
from ..sampling import Sampler


@dataclass
class Verdict:
    """The outcome of one check: ``passed``, the ``message`` printed, the ``function`` to go on with."""

    name: str
    passed: bool
    message: str
    function: Callable | None = None
    used_solution: bool = False

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"Verdict({self.name}: {'passed' if self.passed else 'failed'})"


class Failed(Exception):
    """One rule broken on one case; the message says which and how."""


def show_solution(name: str) -> None:
    """Print the reference solution ``name`` (e.g. "mag_loss", "mag_step", "swap_edit")."""
    found = getattr(solutions, name, None)
    if not callable(found):
        names = [n for n, f in vars(solutions).items() if inspect.isfunction(f) and f.__module__ == solutions.__name__]
        raise ValueError(f"no solution {name!r}; solutions: {names}")
    print(inspect.getsource(found))


def make_verdict(name: str, fn: Callable, reference: Callable, cases: Callable[[Callable], int]) -> Verdict:
    """Run ``cases(fn)``; turn its outcome into a printed, returned Verdict."""
    try:
        count = cases(fn)
    except NotImplementedError:
        message = (f"… {name}: not written yet (it raises NotImplementedError); the notebook goes on with "
                   f"the reference solution. Write yours and run the cell again.")
        print(message)
        return Verdict(name, False, message, reference, used_solution=True)
    except Failed as failure:
        message = f"✗ {name}: {failure}"
    else:
        message = f"✓ {name}: passed ({count} cases)"
        print(message)
        return Verdict(name, True, message, fn)
    print(message)
    return Verdict(name, False, message, fn)


def call_yours(fn: Callable, case: str, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as error:  # report it as a broken case, with the case's name
        raise Failed(f"on case '{case}' your function raised {type(error).__name__}: {error}") from None


def compare(got, want: torch.Tensor, case: str, atol: float = 1e-5, rtol: float = 1e-4, dims: str = "") -> None:
    """Shape, finiteness, then the largest difference and where it is."""
    if not isinstance(got, torch.Tensor):
        raise Failed(f"on case '{case}' expected a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise Failed(f"on case '{case}' the shape is {tuple(got.shape)}, expected {tuple(want.shape)} {dims}")
    got = got.detach().float()
    if not torch.isfinite(got).all():
        index = tuple(int(i) for i in (~torch.isfinite(got)).nonzero()[0])
        raise Failed(f"on case '{case}' the result is not finite at index {index} (overflow? 0/0?)")
    diff = (got - want.float()).abs()
    bad = diff > atol + rtol * want.float().abs()
    if bad.any():
        index = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise Failed(f"on case '{case}' at index {index} {dims} yours is {float(got[index]):.6g}, the reference "
                      f"{float(want[index]):.6g} ({int(bad.sum())} of {bad.numel()} values differ)")


def scalar(value, case: str) -> torch.Tensor:
    value = value[0] if isinstance(value, (tuple, list)) else value
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise Failed(f"on case '{case}' the loss must be one number (a 0-d tensor), got "
                      f"{getattr(value, 'shape', type(value).__name__)}")
    return value.reshape(())


# ============================================================================ fixed inputs
def swap_cases() -> dict:
    generator = torch.Generator().manual_seed(1)

    def probs(batch, heads, pixels, tokens):
        return torch.randn(batch, heads, pixels, tokens, generator=generator).softmax(-1)

    h, w = 3, 5  # a non-square layer
    left = torch.zeros(h, w)
    left[:, :2] = 1
    right = 1 - left
    empty = torch.zeros(h, w)
    return {
        "2 rows (uncond, cond), 3×5 layer, 'red circle' (2 tokens) and a 3-token word":
            (probs(2, 2, h * w, 10), torch.stack([left, right]).flatten(1), [[2, 3], [5, 6, 7]], [1]),
        "a repeated word: 'red' at token 2 and at token 6, two images (rows 2, 3 are cond)":
            (probs(4, 1, h * w, 9), torch.stack([left, right]).flatten(1), [[2], [6]], [2, 3]),
        "an empty region (its tokens go to 0 everywhere)":
            (probs(2, 2, h * w, 8), torch.stack([left, empty]).flatten(1), [[1], [4, 5]], [1]),
    }


def loss_cases() -> dict:
    generator = torch.Generator().manual_seed(2)

    def probs(batch, heads, h, w, tokens):
        return torch.randn(batch, heads, h * w, tokens, generator=generator).softmax(-1)

    def masks(h, w, *boxes):
        out = torch.zeros(len(boxes), h, w)
        for i, (y0, y1, x0, x1) in enumerate(boxes):
            out[i, y0:y1, x0:x1] = 1
        return out.flatten(1)

    return {
        "2 rows, 2 heads, 4×6 layer, 'red circle' (2 tokens) and a 3-token word, λ 0.5":
            (probs(2, 2, 4, 6, 12), masks(4, 6, (0, 4, 0, 3), (0, 4, 3, 6)), [[2, 3], [5, 6, 7]], 0.5),
        "a repeated word ('red' at 2 and at 6), 1 row, 8×8, λ 2":
            (probs(1, 3, 8, 8, 9), masks(8, 8, (0, 4, 0, 8), (4, 8, 0, 8)), [[2], [6]], 2.0),
        "an empty region, 3×5 layer, λ 0.5":
            (probs(1, 2, 3, 5, 8), masks(3, 5, (0, 3, 0, 2), (0, 0, 0, 0)), [[1, 2], [4]], 0.5),
    }


def joint_cases() -> dict:
    """q, k over a joint sequence [text; image] and the number of text tokens (rotary already applied)."""
    g = torch.Generator().manual_seed(5)

    def qk(batch, heads, text, image, d, scale=1.0):
        return (scale * torch.randn(batch, heads, text + image, d, generator=g),
                scale * torch.randn(batch, heads, text + image, d, generator=g), text)

    return {
        "batch 2, 3 heads, 7 text + 4×6 image tokens, d 8": qk(2, 3, 7, 24, 8),
        "more text than image tokens: 16 text + 2×3 image, one head, d 16": qk(1, 1, 16, 6, 16),
        "as many text as image tokens (9 + 3×3): the two blocks have the same shape": qk(1, 2, 9, 9, 4),
        "large logits (a plain exp overflows)": qk(1, 2, 5, 6, 8, scale=6.0),
    }


def diagnose_joint(got: torch.Tensor, q: torch.Tensor, k: torch.Tensor, text: int) -> str:
    """A hint when the image→text block equals a known wrong variant."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    variants = {
        "you normalised over the text keys only (as cross-attention does): in joint attention one softmax "
        "runs over all keys, text and image, and only then is the image→text block cut out":
            scores[..., text:, :text].softmax(-1),
        "that is the text→image block (rows text, columns image), transposed: rows are the image queries "
        "[text:], columns the text keys [:text]": scores.softmax(-1)[..., :text, text:].transpose(-1, -2),
        "the scale is missing: divide the scores by √d": (q @ k.transpose(-1, -2)).softmax(-1)[..., text:, :text],
        "the softmax ran over the queries (dim -2): each *row* (one query) must sum to one over all keys":
            scores.softmax(-2)[..., text:, :text],
    }
    for hint, wrong in variants.items():
        if got.shape == wrong.shape and torch.allclose(got.detach().float(), wrong, atol=1e-5):
            return "; " + hint
    return ""


class ToyDenoiser:
    """A tiny differentiable stand-in for the UNet: two layers (6×4 and 3×2) of softmax attention."""

    def __init__(self, token_groups, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.wq = [torch.randn(4, 2 * 5, generator=g) for _ in range(2)]  # channels -> heads·d (2 heads, d 5)
        self.wk = torch.randn(16, 2 * 5, generator=g)
        self.cond = torch.randn(1, 9, 16, generator=g)
        self.uncond = torch.randn(1, 9, 16, generator=g)
        self.x_t = torch.randn(1, 4, 6, 4, generator=g)  # a non-square latent
        left = torch.zeros(6, 4)
        left[:, :2] = 1
        self.masks_full = torch.stack([left, 1 - left, torch.zeros(6, 4)])  # the last region is empty
        self.token_groups = token_groups
        self.calls: list[str] = []

    def attention(self, x: torch.Tensor, embeddings: torch.Tensor) -> list:
        if embeddings.shape[0] != x.shape[0]:
            self.calls.append("both halves")
        elif torch.equal(embeddings, self.cond):
            self.calls.append("cond")
        elif torch.equal(embeddings, self.uncond):
            self.calls.append("uncond")
        else:
            self.calls.append("other")
        layers = []
        for wq, size in zip(self.wq, [(6, 4), (3, 2)]):
            feats = F.adaptive_avg_pool2d(x, size).flatten(2).transpose(1, 2)  # (b, pixels, 4)
            q = (feats @ wq).view(x.shape[0], -1, 2, 5).transpose(1, 2)
            k = (embeddings @ self.wk).view(embeddings.shape[0], -1, 2, 5).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) / 5 ** 0.5).softmax(-1)
            masks = F.interpolate(self.masks_full[None], size=size, mode="nearest")[0].flatten(1)
            layers.append((probs, masks))
        return layers

    def inputs(self) -> GuidanceInputs:
        return GuidanceInputs(self.x_t.clone(), self.cond, self.uncond, self.token_groups, self.attention)


# ============================================================================ rules and hints of the checks
def require_swap_rules(got: torch.Tensor, given: torch.Tensor, masks, groups, cond_rows, case: str) -> None:
    swapped = sorted({t for g in groups for t in g})
    others = [t for t in range(given.shape[-1]) if t not in swapped]
    uncond = [r for r in range(given.shape[0]) if r not in cond_rows]
    got = got.detach()
    for row in uncond:
        if not torch.equal(got[row], given[row]):
            raise Failed(f"on case '{case}' row {row} (the unconditional half) changed: swap edits the cond rows only")
    for mask, tokens in zip(masks, groups):
        want = (mask / len(tokens))[None, :, None].expand(given.shape[1], -1, len(tokens))
        for row in cond_rows:
            if not torch.allclose(got[row][..., tokens], want, atol=1e-6):
                wrong = (got[row][..., tokens] - want).abs().argmax()
                head, pixel, t = np.unravel_index(int(wrong), want.shape)
                where = "inside" if mask[pixel] > 0 else "outside"
                raise Failed(f"on case '{case}' row {row}, head {head}, pixel {pixel} ({where} the mask), token "
                              f"{tokens[t]}: yours {float(got[row][head, pixel, tokens[t]]):.4g}, expected "
                              f"{float(want[head, pixel, t]):.4g} (1/len(tokens) = 1/{len(tokens)} inside, 0 outside)")
    if not torch.equal(got[..., others], given[..., others]):
        raise Failed(f"on case '{case}' the other tokens' probabilities changed: the official swap does not "
                      "renormalise (rows no longer sum to one, and that is intended)")


def diagnose_loss(value: float, probs, masks, groups, lmbda: float) -> str:
    """A hint when a loss equals a known wrong variant."""
    ref = solutions.mag_loss
    variants = {
        "λ seems ignored (your value is the loss with λ = 1): multiply the outside sum by lmbda": ref(probs, masks, groups, 1.0),
        "only the inside term is there: add λ · Σ A[outside]": ref(probs, masks, groups, 0.0),
        "the sign is flipped: attention inside must *lower* the loss (−Σ inside + λ Σ outside)": -ref(probs, masks, groups, lmbda),
        "you averaged: MAG sums over batch, heads and pixels": ref(probs, masks, groups, lmbda) / probs[..., 0].numel(),
    }
    for hint, wrong in variants.items():
        if abs(value - float(wrong)) <= 1e-4 * max(1.0, abs(float(wrong))) and not np.isclose(value, float(ref(probs, masks, groups, lmbda))):
            return "; " + hint
    return ""


def final_latents(pipe, layout, controls, steps: int) -> torch.Tensor:
    sampler = Sampler(pipe, layout.prompt, seed=0, num_inference_steps=steps, controls=controls)
    while not sampler.done:
        sampler.step()
    return sampler.latents
