"""The course's checks: the reference solution passes, plausible wrong answers fail and say why.

Every check is fed the solution and at least one mistake a learner makes (a loss that
forgets λ, a swap that renormalises, a step uphill, ...). The expected values are written
out here (formulas, hand-counted IoUs), independent of ``mag_explore.course.solutions``.
"""
import numpy as np
import pytest
import torch

from mag_explore.course import exercises, solutions
from mag_explore.layouts import Layout, rect

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def layout():
    return Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)],
                              prompt=PROMPT)


def failed_with(verdict, *words):
    assert not verdict.passed and not verdict.used_solution, verdict.message
    for word in words:
        assert word in verdict.message, verdict.message
    return True


# ============================================================================ the solutions themselves
def test_solutions_match_formulas_written_out():
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 3, 4)
    scores = torch.einsum("bhpd,bhtd->bhpt", q, k) / 2.0  # √4
    expected = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
    assert torch.allclose(solutions.attention_probs(q, k), expected, atol=1e-6)

    probs = torch.tensor([[[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]]])  # 1 row, 1 head, 2 pixels, 3 tokens
    masks = torch.tensor([[1.0, 0.0]])
    # inside: pixel 0, token 1 -> 0.25; outside: pixel 1 -> 0.6; L = -0.25 + 0.5 * 0.6
    assert float(solutions.mag_loss(probs, masks, [[1]], 0.5)) == pytest.approx(-0.25 + 0.3)
    swapped = solutions.swap_edit(probs, masks, [[1, 2]], [0])
    assert torch.allclose(swapped[0, 0], torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.0, 0.0]]))
    a = np.zeros((2, 3), bool)
    a[0] = True
    b = np.zeros((2, 3), bool)
    b[:, 0] = True
    assert solutions.mask_iou(a, b) == pytest.approx(1 / 4)  # 1 shared pixel, union 4
    assert solutions.paired_difference({"x": 0.1, "y": 0.5}, {"x": 0.4, "z": 9.0}) == pytest.approx(0.3)


# ============================================================================ 01
def test_attention_probs_check(sd15_pipe):
    captured = exercises.capture_qk(sd15_pipe, PROMPT, num_inference_steps=3)
    assert captured["probs"].shape[:3] == captured["q"].shape[:3]
    assert exercises.check_attention_probs(solutions.attention_probs, captured).passed

    def no_sqrt(q, k):
        return (q @ k.transpose(-1, -2)).softmax(-1)

    def over_pixels(q, k):
        return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-2)

    def naive_exp(q, k):
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).exp()
        return scores / scores.sum(-1, keepdim=True)

    assert failed_with(exercises.check_attention_probs(no_sqrt), "at index", "the reference")
    assert failed_with(exercises.check_attention_probs(over_pixels), "sum to", "last")
    assert failed_with(exercises.check_attention_probs(naive_exp), "large logits", "not finite")

    def wrong_shape(q, k):
        return q @ k.transpose(-1, -2)[..., :3]
    assert failed_with(exercises.check_attention_probs(wrong_shape), "shape")


def test_a_check_falls_back_to_the_solution_while_unwritten(capsys):
    def attention_probs(q, k):
        raise NotImplementedError

    verdict = exercises.check_attention_probs(attention_probs)
    assert verdict.used_solution and verdict.function is solutions.attention_probs and not verdict.passed
    assert "not written yet" in capsys.readouterr().out


# ============================================================================ 03
def test_swap_check(sd15_pipe, layout):
    assert exercises.check_swap_edit(solutions.swap_edit, sd15_pipe, layout, num_inference_steps=3).passed

    def renormalising(probs, masks, groups, rows):
        edited = solutions.swap_edit(probs, masks, groups, rows)
        fixed = [t for g in groups for t in g]
        others = [t for t in range(probs.shape[-1]) if t not in fixed]
        for row in rows:  # the other tokens share what the region tokens left, so each row sums to one
            rest = 1 - edited[row][..., fixed].sum(-1, keepdim=True)
            edited[row][..., others] = probs[row][..., others] / probs[row][..., others].sum(-1, keepdim=True) * rest
        return edited

    def both_halves(probs, masks, groups, rows):
        return solutions.swap_edit(probs, masks, groups, list(range(probs.shape[0])))

    def ones_inside(probs, masks, groups, rows):  # forgets the 1/len(tokens)
        edited = probs.clone()
        for mask, tokens in zip(masks, groups):
            for t in tokens:
                edited[rows, :, :, t] = mask
        return edited

    def in_place(probs, masks, groups, rows):
        probs[:] = solutions.swap_edit(probs, masks, groups, rows)
        return probs

    assert failed_with(exercises.check_swap_edit(renormalising), "renormalise")
    assert failed_with(exercises.check_swap_edit(both_halves), "unconditional")
    assert failed_with(exercises.check_swap_edit(ones_inside), "1/len(tokens)", "inside the mask")
    assert failed_with(exercises.check_swap_edit(in_place), "in place")


# ============================================================================ 04
def test_mag_loss_check():
    assert exercises.check_mag_loss(solutions.mag_loss).passed

    def terms(probs, masks, groups, lmbda):  # the package's own form, (loss, inside, outside), is accepted too
        from mag_explore.methods import mag_loss_terms
        return mag_loss_terms(probs, masks, groups, lmbda)
    assert exercises.check_mag_loss(terms).passed

    def forgets_lambda(probs, masks, groups, lmbda):
        return solutions.mag_loss(probs, masks, groups, 1.0)

    def flipped(probs, masks, groups, lmbda):
        return -solutions.mag_loss(probs, masks, groups, lmbda)

    def detached(probs, masks, groups, lmbda):
        return solutions.mag_loss(probs, masks, groups, lmbda).detach()

    def first_token_only(probs, masks, groups, lmbda):  # multi-token phrases lose their other pieces
        return solutions.mag_loss(probs, masks, [g[:1] for g in groups], lmbda)

    assert failed_with(exercises.check_mag_loss(forgets_lambda), "λ seems ignored")
    assert failed_with(exercises.check_mag_loss(flipped), "sign is flipped")
    assert failed_with(exercises.check_mag_loss(detached), "not connected")
    assert failed_with(exercises.check_mag_loss(first_token_only), "3-token", "the reference")


def test_mag_step_check():
    assert exercises.check_mag_step(solutions.mag_step).passed

    def uphill(inputs, alpha, lmbda):
        x = inputs.x_t.detach().requires_grad_(True)
        loss = sum(solutions.mag_loss(p, m, inputs.token_groups, lmbda) for p, m in inputs.attention_of(x, inputs.cond_embeddings))
        (grad,) = torch.autograd.grad(loss, x)
        return (x + alpha * grad).detach()

    def no_requires_grad(inputs, alpha, lmbda):
        loss = sum(solutions.mag_loss(p, m, inputs.token_groups, lmbda)
                   for p, m in inputs.attention_of(inputs.x_t, inputs.cond_embeddings))
        (grad,) = torch.autograd.grad(loss, inputs.x_t)
        return inputs.x_t - alpha * grad

    def unconditional(inputs, alpha, lmbda):
        x = inputs.x_t.detach().requires_grad_(True)
        loss = sum(solutions.mag_loss(p, m, inputs.token_groups, lmbda) for p, m in inputs.attention_of(x, inputs.uncond_embeddings))
        (grad,) = torch.autograd.grad(loss, x)
        return (x - alpha * grad).detach()

    def not_detached(inputs, alpha, lmbda):
        x = inputs.x_t.detach().requires_grad_(True)
        loss = sum(solutions.mag_loss(p, m, inputs.token_groups, lmbda) for p, m in inputs.attention_of(x, inputs.cond_embeddings))
        (grad,) = torch.autograd.grad(loss, x)
        return x - alpha * grad

    assert failed_with(exercises.check_mag_step(uphill), "uphill")
    assert failed_with(exercises.check_mag_step(no_requires_grad), "require grad")
    assert failed_with(exercises.check_mag_step(unconditional), "conditional prompt only", "uncond")
    assert failed_with(exercises.check_mag_step(not_detached), "detach")


def test_full_mag_check_runs_the_learners_step_through_the_engine(sd15_pipe, layout):
    assert exercises.check_full_mag(sd15_pipe, layout, solutions.mag_step, alpha=0.5, num_inference_steps=3).passed

    def half_alpha(inputs, alpha, lmbda):
        return solutions.mag_step(inputs, alpha / 2, lmbda)

    assert failed_with(exercises.check_full_mag(sd15_pipe, layout, half_alpha, alpha=0.5, num_inference_steps=3),
                       "final latent")


def test_learner_mag_follows_the_models_step_rule_and_masks(tmp_path, sd15_folder, layout):
    """On a model whose MAG uses the normalized step, area masks, some layers only and the
    balanced loss (the embedded shapes model does), the learner's paper step through LearnerMAG
    lands where the package's MAG with the paper's loss does; the check still runs the paper's
    rule and loss, so a wrong α is caught there too."""
    import json
    import shutil

    import mag_explore as mx
    from mag_explore.course.learner import run_learner_mag

    folder = tmp_path / "model"
    shutil.copytree(sd15_folder, folder)
    (folder / "mag_explore.json").write_text(json.dumps({"mag_step_rule": "normalized", "mag_mask_mode": "area",
                                                          "mag_layer_sizes": [8, 4], "mag_loss": "balanced"}))
    pipe = mx.load_pipeline(str(folder), device="cpu")
    ours = run_learner_mag(pipe, layout, solutions.mag_step, 0.05, 0.5, step_range=(0, 2), num_inference_steps=3)

    def package_latents(**options):
        sampler = mx.Sampler(pipe, layout.prompt, seed=0, num_inference_steps=3,
                             controls=[mx.MaskedAttentionGuidance(layout, alpha=0.05, step_range=(0, 2), **options)])
        while not sampler.done:
            sampler.step()
        return sampler.latents, sampler.controls[0].settings

    package, settings = package_latents(loss_fn="official")
    assert (settings["mask_mode"], settings["layer_sizes"]) == ("area", [4, 8])
    torch.testing.assert_close(ours, package, atol=1e-4, rtol=1e-3)
    every_layer, _ = package_latents(loss_fn="official", layer_sizes=[8, 4, 2])
    assert not torch.allclose(every_layer, ours, atol=1e-3)  # the layers matter on this model
    with pytest.raises(ValueError, match="layer_sizes"):
        mx.generate(pipe, layout.prompt, num_inference_steps=3, progress=False,
                    controls=[exercises.LearnerMAG(layout, solutions.mag_step, 0.05, layer_sizes=[0])])
    official = run_learner_mag(pipe, layout, solutions.mag_step, 0.05, 0.5, step_range=(0, 2), num_inference_steps=3,
                               step_rule="official")
    assert not torch.allclose(official, ours, atol=1e-3)  # the rule matters on this model

    def half_alpha(inputs, alpha, lmbda):
        return solutions.mag_step(inputs, alpha / 2, lmbda)

    assert exercises.check_full_mag(pipe, layout, solutions.mag_step, alpha=0.5, num_inference_steps=3).passed
    assert failed_with(exercises.check_full_mag(pipe, layout, half_alpha, alpha=0.5, num_inference_steps=3),
                       "final latent")


# ============================================================================ 05
def test_iou_and_paired_difference_checks():
    assert exercises.check_mask_iou(solutions.mask_iou).passed
    assert exercises.check_paired_difference(solutions.paired_difference).passed

    def over_first(a, b):
        a, b = np.asarray(a, bool), np.asarray(b, bool)
        return (a & b).sum() / max(a.sum(), 1)

    def nan_when_empty(a, b):
        a, b = np.asarray(a, bool), np.asarray(b, bool)
        with np.errstate(invalid="ignore"):
            return np.float64((a & b).sum()) / np.float64((a | b).sum())

    def dice(a, b):
        a, b = np.asarray(a, bool), np.asarray(b, bool)
        return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)

    def unpaired(a, b):
        return np.mean(list(b.values())) - np.mean(list(a.values()))

    def a_minus_b(a, b):
        return -solutions.paired_difference(a, b)

    assert failed_with(exercises.check_mask_iou(over_first), "union")
    assert failed_with(exercises.check_mask_iou(nan_when_empty), "both empty", "0/0")
    assert failed_with(exercises.check_mask_iou(dice), "Dice")
    assert failed_with(exercises.check_paired_difference(unpaired), "pair them")
    assert failed_with(exercises.check_paired_difference(a_minus_b), "sign")


# ============================================================================ 07
def test_guidance_loss_check(sd15_pipe, layout):
    # There is no single right answer: a loss written here (the paper's, summed by hand) passes too,
    # and the verdict goes on with it, not with the reference.
    def papers_loss(probs, masks, groups, lmbda):
        inside = torch.stack([(probs[..., g].sum(-1) * m).sum() for m, g in zip(masks, groups)])
        outside = torch.stack([(probs[..., g].sum(-1) * (1 - m)).sum() for m, g in zip(masks, groups)])
        return (lmbda * outside - inside).sum(), inside, outside

    verdict = exercises.check_guidance_loss(papers_loss, sd15_pipe, layout, num_inference_steps=3)
    assert verdict.passed and verdict.function is papers_loss and not verdict.used_solution

    def pushes_out(probs, masks, groups, lmbda):
        loss, inside, outside = solutions.share_loss(probs, masks, groups, lmbda)
        return -loss, inside, outside

    def unguarded(probs, masks, groups, lmbda):
        inside = torch.stack([(probs[..., g].sum(-1) * m).sum() for m, g in zip(masks, groups)])
        outside = torch.stack([(probs[..., g].sum(-1) * (1 - m)).sum() for m, g in zip(masks, groups)])
        return ((1 - inside / (inside + outside)) ** 2).sum(), inside, outside

    def loss_only(probs, masks, groups, lmbda):
        return solutions.mag_loss(probs, masks, groups, lmbda)

    assert failed_with(exercises.check_guidance_loss(pushes_out), "lower inside")
    assert failed_with(exercises.check_guidance_loss(unguarded), "no attention at all", "clamp_min")
    assert failed_with(exercises.check_guidance_loss(loss_only), "(loss, inside, outside)")


def test_show_solution_prints_source(capsys):
    exercises.show_solution("mag_step")
    assert "autograd.grad" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mag_loss"):
        exercises.show_solution("nope")


# ============================================================================ 08
@pytest.fixture(scope="module")
def mmdit_pipes():
    from mag_explore.testing.mmdit import tiny_flux_pipeline, tiny_sd3_pipeline

    return {"flux": tiny_flux_pipeline(seed=0), "sd3": tiny_sd3_pipeline(seed=0)}


def test_joint_solution_is_the_image_text_block_of_one_softmax_over_all_keys():
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)  # 2 text + 3 image tokens
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / 2.0  # √4
    expected = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)  # over all 5 keys
    got = solutions.joint_image_text_probs(q, k, 2)
    assert got.shape == (1, 2, 3, 2) and torch.allclose(got, expected[..., 2:, :2], atol=1e-6)
    assert (got.sum(-1) < 1).all()  # the rest of each row is on the image keys


@pytest.mark.parametrize("name,layer", [("flux", "transformer_blocks.0.attn"), ("flux", "single_transformer_blocks.1.attn"),
                                        ("sd3", "transformer_blocks.1.attn")])
def test_joint_probs_check_on_a_captured_layer(mmdit_pipes, name, layer):
    captured = exercises.capture_joint_qk(mmdit_pipes[name], PROMPT, layer=layer, num_inference_steps=2, height=32, width=32,
                                          max_sequence_length=8)
    text = captured["num_text_tokens"]
    assert text == (8 if name == "flux" else 77 + 8) and captured["q"].shape[2] == text + 16  # 4×4 image tokens
    assert captured["probs"].shape == (1, 2, 16, text)  # the cond row only (SD3's batch is [uncond, cond])
    assert exercises.check_joint_probs(solutions.joint_image_text_probs, captured).passed
    without = solutions.joint_image_text_probs(captured["q_no_rotary"], captured["k_no_rotary"], text)
    if name == "flux":  # the rotary embedding changes the scores; SD3 has none
        assert not torch.allclose(without, captured["probs"], atol=1e-4)
    else:
        assert torch.allclose(without, captured["probs"], atol=1e-5)


def test_joint_probs_check_names_the_usual_mistakes(capsys):
    def scores(q, k):
        return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5

    def text_keys_only(q, k, n):
        return scores(q, k)[..., n:, :n].softmax(-1)

    def text_to_image(q, k, n):
        return scores(q, k).softmax(-1)[..., :n, n:].transpose(-1, -2)

    def no_sqrt(q, k, n):
        return (q @ k.transpose(-1, -2)).softmax(-1)[..., n:, :n]

    def over_queries(q, k, n):
        return scores(q, k).softmax(-2)[..., n:, :n]

    def whole_matrix(q, k, n):
        return scores(q, k).softmax(-1)

    assert failed_with(exercises.check_joint_probs(text_keys_only), "text keys only", "all keys")
    assert failed_with(exercises.check_joint_probs(text_to_image), "text→image block")
    assert failed_with(exercises.check_joint_probs(no_sqrt), "√d")
    assert failed_with(exercises.check_joint_probs(over_queries), "dim -2")
    assert failed_with(exercises.check_joint_probs(whole_matrix), "shape")

    def unwritten(q, k, n):
        raise NotImplementedError

    verdict = exercises.check_joint_probs(unwritten)
    assert verdict.used_solution and verdict.function is solutions.joint_image_text_probs
