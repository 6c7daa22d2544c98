"""Checks for the course's exercises: your function against the reference, on fixed inputs.

Each ``check_…`` runs your function on a few fixed cases (edge cases included: repeated
words, multi-token phrases, non-square layers, an empty region), prints ``✓ passed`` or
what differs (shape, the value at which index, which rule was broken) and returns a
:class:`Verdict`. ``Verdict.function`` is the function the notebook goes on with: yours,
or - while yours still raises ``NotImplementedError`` - the reference solution, so that
the notebook runs top to bottom before you have written anything (that is how CI runs
them). The references live in ``mag_explore.course.solutions``; ``show_solution(name)`` prints one.

=====================  =====  =============================================================
check                  nb     your function
=====================  =====  =============================================================
check_attention_probs  01     ``attention_probs(q, k)`` -> softmax(QKᵀ/√d)
check_swap_edit        03     ``swap_edit(probs, masks, token_groups, cond_rows)`` -> probs
check_mag_loss         04     ``mag_loss(probs, masks, token_groups, lmbda)`` -> loss
check_mag_step         04     ``mag_step(inputs, alpha, lmbda)`` -> new x_t
check_full_mag         04     the same step through the engine vs ``MaskedAttentionGuidance``
check_mask_iou         05     ``mask_iou(a, b)`` -> float
check_paired_difference 05    ``paired_difference(scores_a, scores_b)`` -> mean of b − a
check_guidance_loss    07     your own ``loss_fn`` for ``MaskedAttentionGuidance``
check_joint_probs      08     ``joint_probs(q, k, num_text_tokens)`` -> the image→text block
=====================  =====  =============================================================
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import solutions
from .checking import (Verdict, call_yours, require_swap_rules, compare, diagnose_joint, diagnose_loss, Failed,
                       final_latents, joint_cases, loss_cases, scalar, swap_cases, ToyDenoiser, make_verdict,
                       show_solution)
from .learner import (GuidanceInputs, LearnerMAG, SwapHook, capture_joint_qk, capture_qk,  # noqa: F401 (re-exported)
                      run_learner_mag)
from ..methods import MaskedAttentionGuidance

__all__ = ["Verdict", "check_attention_probs", "check_full_mag", "check_guidance_loss", "check_joint_probs",
           "check_mag_loss", "check_mag_step", "check_mask_iou", "check_paired_difference", "check_swap_edit",
           "show_solution", "GuidanceInputs", "LearnerMAG", "SwapHook", "capture_joint_qk", "capture_qk"]


# ============================================================================ 01
def check_attention_probs(fn: Callable, captured: dict | None = None) -> Verdict:
    """``fn(q, k)`` with q (batch, heads, pixels, d), k (batch, heads, tokens, d) -> probs.

    Fixed cases (non-square pixel counts, d ≠ tokens, large logits), then - given the
    output of ``capture_qk`` - the probabilities the hook recorded in a real layer.
    """
    generator = torch.Generator().manual_seed(0)
    cases = {
        "batch 2, 3 heads, 4×6 pixels, 7 tokens, d 8": (torch.randn(2, 3, 24, 8, generator=generator),
                                                        torch.randn(2, 3, 7, 8, generator=generator)),
        "one head, 5×3 pixels, 77 tokens, d 16": (torch.randn(1, 1, 15, 16, generator=generator),
                                                  torch.randn(1, 1, 77, 16, generator=generator)),
        "large logits (a plain exp overflows)": (40 * torch.randn(1, 2, 6, 8, generator=generator),
                                                 40 * torch.randn(1, 2, 5, 8, generator=generator)),
    }

    def run(f):
        for case, (q, k) in cases.items():
            got = call_yours(f, case, q.clone(), k.clone())
            if isinstance(got, torch.Tensor) and got.shape == (*q.shape[:3], k.shape[2]):
                sums = got.detach().float().sum(-1)
                if torch.isfinite(sums).all() and not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                    raise Failed(f"on case '{case}' a pixel's probabilities over the tokens sum to "
                                  f"{float(sums.flatten()[0]):.4f}, not 1: softmax over the *last* dim (tokens)")
            compare(got, solutions.attention_probs(q, k), case, dims="(batch, head, pixel, token)")
        if captured is not None:
            case = f"the real layer {captured['layer']} at step 0"
            compare(call_yours(f, case, captured["q"], captured["k"]), captured["probs"], case, atol=1e-4,
                     dims="(batch, head, pixel, token)")
        return len(cases) + (captured is not None)

    return make_verdict("check_attention_probs", fn, solutions.attention_probs, run)


# ============================================================================ 03
def check_swap_edit(fn: Callable, pipe=None, layout=None, num_inference_steps: int = 4) -> Verdict:
    """``fn(probs, masks, token_groups, cond_rows)`` -> the swapped probs (a new tensor).

    With ``pipe`` and ``layout``: also a short run through the engine (``SwapHook``),
    which must give the same image as ``MaskedAttentionSwap``.
    """
    def run(f):
        cases = swap_cases()
        for case, (probs, masks, groups, rows) in cases.items():
            given = probs.clone()
            got = call_yours(f, case, given, masks, groups, rows)
            if not torch.equal(given, probs):
                raise Failed(f"on case '{case}' your function changed its input in place: clone it first "
                              "(other hooks and the store see the same tensor)")
            if not isinstance(got, torch.Tensor) or got.shape != probs.shape:
                compare(got, probs, case, dims="(row, head, pixel, token)")  # says what the type/shape is
            require_swap_rules(got, probs, masks, groups, rows, case)
        if pipe is not None and layout is not None:
            from ..methods import MaskedAttentionSwap

            case = f"{num_inference_steps} steps through the engine, swap in steps 0-1"
            ours = final_latents(pipe, layout, [SwapHook(layout, f, step_range=(0, 2))], num_inference_steps)
            ref = final_latents(pipe, layout, [MaskedAttentionSwap(layout, step_range=(0, 2))], num_inference_steps)
            compare(ours, ref, case, atol=1e-4, dims="(image, channel, y, x) of the final latent")
            return len(cases) + 1
        return len(cases)

    return make_verdict("check_swap_edit", fn, solutions.swap_edit, run)


# ============================================================================ 04: the loss
def check_mag_loss(fn: Callable) -> Verdict:
    """``fn(probs, masks, token_groups, lmbda)`` -> MAG's loss of one layer (a tensor, or (loss, …))."""
    def run(f):
        cases = loss_cases()
        for case, (probs, masks, groups, lmbda) in cases.items():
            given = probs.clone().requires_grad_(True)
            loss = scalar(call_yours(f, case, given, masks, groups, lmbda), case)
            if not loss.requires_grad:
                raise Failed(f"on case '{case}' the loss is not connected to probs (.item(), numpy or a "
                              "detach?): MAG needs its gradient")
            want = float(solutions.mag_loss(probs, masks, groups, lmbda))
            got = float(loss.detach())
            if not np.isclose(got, want, rtol=1e-4, atol=1e-4):
                raise Failed(f"on case '{case}' yours is {got:.6g}, the reference {want:.6g}"
                              f"{diagnose_loss(got, probs, masks, groups, lmbda)}")
        return len(cases)

    return make_verdict("check_mag_loss", fn, solutions.mag_loss, run)


# ============================================================================ 04: the step
def check_mag_step(fn: Callable, loss_fn: Callable | None = None) -> Verdict:
    """``fn(inputs, alpha, lmbda)`` -> the new x_t, on a toy denoiser (see ``GuidanceInputs``).

    Rules: x_t requires grad, one pass with the *conditional* embeddings only, the gradient
    by autograd, x_t − α∇L, a detached result. ``loss_fn``: the loss your step uses (default
    the reference), so that a wrong loss is not blamed on the step.
    """
    loss_fn = loss_fn or solutions.mag_loss

    def reference(inputs, alpha, lmbda):
        return solutions.mag_step(inputs, alpha, lmbda, loss_fn=loss_fn)

    def run(f):
        cases = {"α 0.3, λ 0.5, regions 'red circle', a 3-token word and an empty one": ([[1, 2], [4, 5, 6], [7]], 0.3, 0.5),
                 "α 1.0, λ 2, a repeated word (tokens 2 and 6)": ([[2], [6], [3]], 1.0, 2.0)}
        for case, (groups, alpha, lmbda) in cases.items():
            toy = ToyDenoiser(groups)
            try:
                got = fn_result = f(toy.inputs(), alpha, lmbda)
            except NotImplementedError:
                raise
            except RuntimeError as error:
                if "does not require grad" in str(error):
                    raise Failed(f"on case '{case}': autograd found no path to x_t: make it require grad before "
                                  "the pass (x = inputs.x_t.detach().requires_grad_(True))") from None
                raise Failed(f"on case '{case}' your step raised RuntimeError: {error}") from None
            except Exception as error:
                raise Failed(f"on case '{case}' your step raised {type(error).__name__}: {error}") from None
            if not toy.calls:
                raise Failed(f"on case '{case}' your step never ran the denoiser (inputs.attention_of)")
            if toy.calls != ["cond"]:
                raise Failed(f"on case '{case}' the denoiser ran as {toy.calls}: MAG needs exactly one pass with "
                              "inputs.cond_embeddings (the conditional prompt only)")
            if isinstance(fn_result, torch.Tensor) and fn_result.requires_grad:
                raise Failed(f"on case '{case}' the new x_t still carries the graph: return it .detach()ed")
            ref_toy = ToyDenoiser(groups)
            want = reference(ref_toy.inputs(), alpha, lmbda)
            if isinstance(got, torch.Tensor) and got.shape == want.shape and not torch.allclose(got, want, atol=1e-5):
                x_t = ref_toy.x_t
                moved = want - x_t  # = −α∇L
                for hint, wrong in (("the step went uphill: x_t − α∇L, not +", x_t - moved),
                                    ("the step forgot α (x_t − ∇L)", x_t + moved / alpha),
                                    ("x_t did not move", x_t)):
                    if torch.allclose(got, wrong, atol=1e-5):
                        raise Failed(f"on case '{case}' {hint}")
            compare(got, want, case, atol=1e-5, dims="(image, channel, y, x)")
        return len(cases)

    return make_verdict("check_mag_step", fn, solutions.mag_step, run)


def check_full_mag(pipe, layout, step_fn: Callable, alpha: float | None = None, lmbda: float | None = None,
                   num_inference_steps: int = 4) -> Verdict:
    """Your step through the engine (``LearnerMAG``) vs ``MaskedAttentionGuidance``: the same final latent.

    Guides the first two of ``num_inference_steps`` steps, same seed, on ``pipe``, with the
    paper's step rule on both sides (your x_t − α∇L as you wrote it: a normalized rule would
    rescale away a wrong α) and the model's masks.
    """
    from ..models.load import model_defaults

    defaults = model_defaults(pipe)
    alpha = defaults["mag_alpha"] if alpha is None else alpha
    lmbda = defaults["mag_lmbda"] if lmbda is None else lmbda

    def run(f):
        case = f"{num_inference_steps} steps, MAG in steps 0-1, α {alpha}, λ {lmbda}"
        try:
            ours = run_learner_mag(pipe, layout, f, alpha, lmbda, step_range=(0, 2),
                                   num_inference_steps=num_inference_steps, step_rule="official")
        except NotImplementedError:
            raise
        except Exception as error:
            raise Failed(f"on case '{case}' the run stopped: {type(error).__name__}: {error}") from None
        reference = MaskedAttentionGuidance(layout, alpha=alpha, lmbda=lmbda, step_range=(0, 2), step_rule="official",
                                            loss_fn="official")  # your loss is the paper's
        want = final_latents(pipe, layout, [reference], num_inference_steps)
        compare(ours, want, case, atol=1e-4, rtol=1e-3, dims="(image, channel, y, x) of the final latent")
        return 1

    return make_verdict("check_full_mag", step_fn, solutions.mag_step, run)


# ============================================================================ 05
def check_mask_iou(fn: Callable) -> Verdict:
    """``fn(a, b)`` -> |a ∧ b| / |a ∨ b| for two masks (bool, or 0/1 numbers); 0.0 when both are empty."""
    a = np.zeros((5, 7), dtype=bool)
    a[1:4, 1:5] = True
    b = np.zeros((5, 7), dtype=bool)
    b[2:5, 2:7] = True
    cases = {
        "identical": (a, a.copy()), "disjoint": (a, ~a),
        "partial overlap on a 5×7 grid": (a, b), "the same, swapped": (b, a),
        "0/1 integers instead of bools": (a.astype(np.uint8), b.astype(np.uint8)),
        "one mask empty": (a, np.zeros_like(a)), "both empty": (np.zeros_like(a), np.zeros_like(a)),
    }

    def run(f):
        for case, (x, y) in cases.items():
            got = call_yours(f, case, x.copy(), y.copy())
            want = solutions.mask_iou(x, y)
            try:
                value = float(got)
            except (TypeError, ValueError):
                raise Failed(f"on case '{case}' expected a number, got {type(got).__name__}") from None
            if not np.isfinite(value):
                raise Failed(f"on case '{case}' yours is {value}: with an empty union return 0.0, not 0/0")
            if not np.isclose(value, want, atol=1e-9):
                hint = ""
                if np.isclose(value, np.logical_and(x, y).sum() / max(np.asarray(x, bool).sum(), 1)):
                    hint = ": you divided by the first mask's area; IoU divides by the union"
                elif np.isclose(value, 2 * np.logical_and(x, y).sum() / max(np.asarray(x, bool).sum() + np.asarray(y, bool).sum(), 1)):
                    hint = ": that is the Dice score (2|a∧b| / (|a|+|b|)), not IoU"
                raise Failed(f"on case '{case}' yours is {value:.4g}, the reference {want:.4g}{hint}")
        return len(cases)

    return make_verdict("check_mask_iou", fn, solutions.mask_iou, run)


def check_paired_difference(fn: Callable) -> Verdict:
    """``fn(scores_a, scores_b)`` -> mean of b − a over the (layout, seed) keys both have."""
    a = {("left-right", 0): 0.10, ("left-right", 1): 0.30, ("top-bottom", 0): 0.05, ("three", 0): 0.20}
    b = {("left-right", 0): 0.50, ("left-right", 1): 0.40, ("top-bottom", 0): 0.45, ("corner", 0): 0.90}
    cases = {"the same images for both": ({k: a[k] for k in list(a)[:3]}, {k: b[k] for k in list(b)[:3]}),
             "each method has an image the other lacks": (a, b),
             "keys in another order": (dict(reversed(list(a.items()))), b)}

    def run(f):
        for case, (x, y) in cases.items():
            got = float(call_yours(f, case, dict(x), dict(y)))
            want = solutions.paired_difference(x, y)
            if not np.isclose(got, want, atol=1e-9):
                hint = ""
                if np.isclose(got, -want):
                    hint = ": the sign is flipped; report b − a (how much b gains over a)"
                elif np.isclose(got, np.mean(list(y.values())) - np.mean(list(x.values()))):
                    hint = (": that is the difference of the means over different images; pair them first "
                            "(only the (layout, seed) both methods have)")
                raise Failed(f"on case '{case}' yours is {got:.4g}, the reference {want:.4g}{hint}")
        return len(cases)

    return make_verdict("check_paired_difference", fn, solutions.paired_difference, run)


# ============================================================================ 07
def check_guidance_loss(fn: Callable, pipe=None, layout=None, alpha: float = 0.3, num_inference_steps: int = 4) -> Verdict:
    """Your own ``loss_fn(probs, masks, token_groups, lmbda)`` -> (loss, inside, outside), for MAG.

    Rules (there is no single right answer here): a finite 0-d loss with a gradient, even
    for a region whose words get no attention at all; ``inside``/``outside`` one value per
    region; lower when the words attend inside their masks than outside. With ``pipe`` and
    ``layout``: a short run through the engine, ``MaskedAttentionGuidance(loss_fn=fn)``.
    """
    h, w = 4, 6
    left = torch.zeros(h, w)
    left[:, :3] = 1
    masks = torch.stack([left, 1 - left]).flatten(1)
    groups = [[1, 2], [4]]

    def concentrated(inside: bool) -> torch.Tensor:
        """Probs whose region tokens attend only inside (or only outside) their masks."""
        probs = torch.full((1, 2, h * w, 6), 0.1)
        for mask, tokens in zip(masks, groups):
            where = mask if inside else 1 - mask
            probs[..., tokens] = 0.3 * where[None, None, :, None]
        return probs

    silent = torch.randn(1, 2, h * w, 6, generator=torch.Generator().manual_seed(4)).softmax(-1)
    silent[..., 4] = 0  # the second region's word gets no attention anywhere (e.g. after a swap)

    def run(f):
        values = {}
        for case, probs in {"words inside their masks": concentrated(True),
                            "words outside their masks": concentrated(False),
                            "a word with no attention at all": silent}.items():
            given = probs.clone().requires_grad_(True)
            out = call_yours(f, case, given, masks, groups, 0.5)
            if not isinstance(out, (tuple, list)) or len(out) != 3:
                raise Failed(f"on case '{case}' return (loss, inside, outside), as mag_loss_terms does")
            loss = scalar(out, case)
            if not torch.isfinite(loss):
                raise Failed(f"on case '{case}' the loss is {float(loss.detach())}: guard divisions (e.g. clamp_min(1e-12))")
            if not loss.requires_grad:
                raise Failed(f"on case '{case}' the loss has no gradient with respect to probs")
            for name, part in zip(("inside", "outside"), out[1:]):
                if not isinstance(part, torch.Tensor) or part.numel() != len(groups):
                    raise Failed(f"on case '{case}' {name} must hold one value per region ({len(groups)})")
            values[case] = float(loss.detach())
        if not values["words inside their masks"] < values["words outside their masks"]:
            raise Failed(f"the loss is {values['words inside their masks']:.4g} with the words inside their masks "
                          f"and {values['words outside their masks']:.4g} outside: it must be lower inside, or "
                          "the gradient step pushes the words out")
        if pipe is not None and layout is not None:
            mag = MaskedAttentionGuidance(layout, alpha=alpha, step_range=(0, 2), loss_fn=f)
            try:
                final_latents(pipe, layout, [mag], num_inference_steps)
            except Exception as error:
                raise Failed(f"through the engine: {type(error).__name__}: {error}") from None
            return len(values) + 1
        return len(values)

    return make_verdict("check_guidance_loss", fn, solutions.share_loss, run)


# ============================================================================ 08
def check_joint_probs(fn: Callable, captured: dict | None = None) -> Verdict:
    """``fn(q, k, num_text_tokens)`` with q, k (batch, heads, text + image, d) -> the image→text block.

    Fixed cases (more text than image tokens, blocks of equal shape, large logits), then -
    given the output of ``capture_joint_qk`` - the block the hook recorded in a real layer.
    """
    def run(f):
        cases = dict(joint_cases())
        if captured is not None:
            cases[f"the real layer {captured['layer']} ({captured['place']}) at step 0"] = (
                captured["q"], captured["k"], captured["num_text_tokens"])
        for case, (q, k, text) in cases.items():
            real = captured is not None and q is captured["q"]
            want = captured["probs"] if real else solutions.joint_image_text_probs(q, k, text)
            got = call_yours(f, case, q.clone(), k.clone(), text)
            try:
                compare(got, want, case, atol=1e-4 if real else 1e-5, dims="(batch, head, image token, text token)")
            except Failed as failure:  # say which known mistake it is, if it is one
                hint = diagnose_joint(got, q.float(), k.float(), text) if isinstance(got, torch.Tensor) else ""
                raise Failed(f"{failure}{hint}") from None
        return len(cases)

    return make_verdict("check_joint_probs", fn, solutions.joint_image_text_probs, run)
