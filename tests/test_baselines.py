"""The baselines: paint-with-words and backward layout guidance, on hand-made tensors and tiny pipelines."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from mag_explore.attention import AttentionHook, AttentionStore, cross_attention_layer_names
from mag_explore.layouts import Layout, rect
from mag_explore.methods import (LayoutGuidance, PaintWithWords, guidance_pass, layout_loss_terms, make_controls,
                                 noise_level, pww_bonus)
from mag_explore.methods.layout_guidance import official_layers
from mag_explore.sampling import Control, Sampler, StepState, generate

PROMPT = "a red circle and a blue square"
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def layout():
    return Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])


# ---------------------------------------------------------------- paint-with-words: formula
def test_noise_level_is_the_k_diffusion_sigma():
    # Euler's scheduler keeps σ_t = sqrt((1 - ᾱ_t)/ᾱ_t) for each of its timesteps: an independent table.
    euler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading")  # integer timesteps
    euler.set_timesteps(50)
    alphas = DDIMScheduler(**SD_BETAS).alphas_cumprod
    for t, sigma in zip(euler.timesteps[:: 7], euler.sigmas[:: 7]):
        assert t == int(t)
        assert noise_level(alphas, int(t)) == pytest.approx(float(sigma), rel=1e-4)


def test_pww_bonus_matches_the_formula_on_a_hand_made_tensor():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 6, 8, generator=g) * 3  # (batch, heads, pixels, tokens)
    masks = torch.tensor([[1, 1, 0, 0, 0, 0.5], [0, 1, 1, 0, 0, 0]], dtype=torch.float32)  # overlap at pixel 1
    groups, weights, sigma = [[1, 2], [2, 5]], [0.4, 1.5], 3.7
    s = scores.numpy().astype(np.float64)
    expected = np.zeros_like(s)
    for b in range(2):
        peak = s[b].max()  # over heads, pixels and tokens of this image
        for region, tokens in enumerate(groups):
            for p in range(6):
                for k in tokens:
                    expected[b, :, p, k] += weights[region] * math.log(1 + sigma) * peak * masks[region, p].item()
    got = pww_bonus(scores, masks, groups, weights, sigma)
    assert np.allclose(got.numpy(), expected, atol=1e-5)
    # a single weight is used for every region
    same = pww_bonus(scores, masks, groups, 0.4, sigma)
    assert torch.allclose(same, pww_bonus(scores, masks, groups, [0.4, 0.4], sigma))
    with pytest.raises(ValueError, match="3 weights for 2 regions"):
        pww_bonus(scores, masks, groups, [1, 2, 3], sigma)


class RecordScores(Control, AttentionHook):
    """Keeps the logits each layer computed, before any later hook edits them."""

    def __init__(self):
        self.scores = {}

    def attention_hooks(self):
        return [self]

    def edit_scores(self, scores, ctx):
        self.scores[(ctx.step_index, ctx.layer)] = (scores.clone(), ctx)


@pytest.mark.parametrize("model", ["sd15_pipe", "sdxl_pipe"])
def test_pww_probabilities_are_the_softmax_of_the_edited_logits(model, layout, request):
    sd15_pipe = request.getfixturevalue(model)  # SDXL: the same bonus at its 11 layers, two text encoders
    record = RecordScores()
    store = AttentionStore(tokens="all", heads="all", roles=("uncond", "cond"), dtype=torch.float32)
    pww = PaintWithWords(layout, weight=0.4, mask_mode="nearest")
    result = generate(sd15_pipe, PROMPT, num_inference_steps=3, seed=0, controls=[record, pww], store=store,
                      progress=False)
    alphas = DDIMScheduler.from_config(sd15_pipe.scheduler.config).alphas_cumprod
    for (step, layer), (scores, ctx) in record.scores.items():
        sigma = math.sqrt((1 - float(alphas[ctx.timestep])) / float(alphas[ctx.timestep]))
        masks = layout.masks_at(ctx.height, ctx.width).flatten(1)
        cond = scores[1:]  # [uncond, cond]
        bonus = torch.zeros_like(cond)
        for mask, tokens in zip(masks, ([2, 3], [6, 7])):  # red circle, blue square
            bonus[..., tokens] += 0.4 * math.log(1 + sigma) * cond.max() * mask[:, None]
        probs = store.get(step, layer).flatten(2, 3)  # (batch, heads, pixels, tokens)
        assert torch.allclose(probs[1:], (cond + bonus).softmax(-1), atol=1e-5)
        assert torch.allclose(probs[:1], scores[:1].softmax(-1), atol=1e-6)  # unconditional half untouched
    assert result.diagnostics["pww"]["step"] == [0, 1, 2]


def bilinear_align_corners(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize with align_corners=True written out: output cell i sits at input i·(H−1)/(h−1)."""
    H, W = mask.shape
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            y = i * (H - 1) / (h - 1) if h > 1 else 0.0
            x = j * (W - 1) / (w - 1) if w > 1 else 0.0
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = ((1 - fy) * (1 - fx) * mask[y0, x0] + (1 - fy) * fx * mask[y0, x1]
                         + fy * (1 - fx) * mask[y1, x0] + fy * fx * mask[y1, x1])
    return out


def test_pww_masks_are_bilinear_with_aligned_corners_on_a_hand_worked_example():
    # 4x4, the top-left 2x2 quarter set. At 3x3 the cells sit at input rows/columns 0, 1.5, 3:
    # corners copy the corner pixels, (0, 1.5) averages m[0,1] = 1 and m[0,2] = 0, and the
    # centre (1.5, 1.5) averages the four middle pixels, of which one is set.
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    square = Layout.from_arrays([mask], ["red circle"])
    expected = np.array([[1, 0.5, 0], [0.5, 0.25, 0], [0, 0, 0]])
    assert np.allclose(square.masks_at(3, 3, mode="bilinear")[0].numpy(), expected)
    assert np.allclose(bilinear_align_corners(mask.astype(float), 3, 3), expected)
    # 2x2: the four corner pixels exactly
    assert np.allclose(square.masks_at(2, 2, mode="bilinear")[0].numpy(), [[1, 0], [0, 0]])
    assert PaintWithWords(square).mask_mode == "bilinear"  # the published default


def test_pww_by_default_is_the_published_bonus_bilinear_masks_and_every_occurrence(sd15_pipe):
    # "red circle" appears twice: tokens 2, 3 and 10, 11 (BOS = 0). The published token search
    # boosts both; the masks come from the written-out bilinear resize above, not from our code.
    prompt = "a red circle and a blue square and a red circle"
    layout = Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])
    record = RecordScores()
    store = AttentionStore(tokens="all", heads="all", roles=("uncond", "cond"), dtype=torch.float32)
    generate(sd15_pipe, prompt, num_inference_steps=2, seed=0, controls=[record, PaintWithWords(layout, weight=0.4)],
             store=store, progress=False)
    alphas = DDIMScheduler.from_config(sd15_pipe.scheduler.config).alphas_cumprod
    for (step, layer), (scores, ctx) in record.scores.items():
        sigma = math.sqrt((1 - float(alphas[ctx.timestep])) / float(alphas[ctx.timestep]))
        cond = scores[1:]
        bonus = torch.zeros_like(cond)
        for region, tokens in zip(layout.regions, ([2, 3, 10, 11], [6, 7])):
            mask = torch.tensor(bilinear_align_corners(region.mask.astype(float), ctx.height, ctx.width),
                                dtype=torch.float32).flatten()
            bonus[..., tokens] += 0.4 * math.log(1 + sigma) * cond.max() * mask[:, None]
        probs = store.get(step, layer).flatten(2, 3)
        assert torch.allclose(probs[1:], (cond + bonus).softmax(-1), atol=1e-5), layer
    # the named variant keeps one occurrence: tokens 10, 11 get nothing
    one = PaintWithWords(layout, weight=0.4, every_occurrence=False)
    Sampler(sd15_pipe, prompt, num_inference_steps=2, seed=0, controls=[one])
    assert one._token_groups == [[2, 3], [6, 7]]


def test_pww_changes_the_image_restores_processors_and_zero_weight_is_plain(sd15_pipe, layout):
    before = sd15_pipe.unet.attn_processors
    plain = generate(sd15_pipe, PROMPT, num_inference_steps=3, seed=0, progress=False)
    painted = generate(sd15_pipe, PROMPT, num_inference_steps=3, seed=0, progress=False,
                       controls=make_controls("pww", layout, weight=2.0))
    zero = generate(sd15_pipe, PROMPT, num_inference_steps=3, seed=0, progress=False,
                    controls=[PaintWithWords(layout, weight=0.0)])
    assert np.abs(plain.pixels - painted.pixels).max() > 1e-3
    assert np.abs(plain.pixels - zero.pixels).max() <= 1e-5
    after = sd15_pipe.unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_pww_refuses_a_bad_weight(layout):
    with pytest.raises(ValueError, match="weight=nan"):
        PaintWithWords(layout, weight=float("nan"))


# ---------------------------------------------------------------- layout guidance: formula
def test_layout_loss_matches_the_formula_on_a_hand_made_tensor():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 3, 12, 9, generator=g).softmax(-1)
    masks = (torch.rand(2, 12, generator=g) > 0.5).float()
    groups = [[1, 2], [4]]
    p, m = probs.numpy().astype(np.float64), masks.numpy()
    for region, tokens in enumerate(groups):
        per_token = []
        for k in tokens:
            terms = []
            for b in range(2):
                for h in range(3):
                    inside = sum(p[b, h, q, k] for q in range(12) if m[region, q])
                    terms.append((1 - inside / p[b, h, :, k].sum()) ** 2)
            per_token.append(np.mean(terms))
        expected = np.mean(per_token)
        loss, share = layout_loss_terms(probs, masks, groups)
        assert loss[region].item() == pytest.approx(expected, rel=1e-5)
    assert loss.shape == share.shape == (2,)
    # all attention inside the mask: no loss
    inside_only = torch.zeros(1, 1, 4, 3)
    inside_only[..., :2, 1] = 0.5
    loss, share = layout_loss_terms(inside_only + 1e-9, torch.tensor([[1.0, 1, 0, 0]]), [[1]])
    assert loss.item() == pytest.approx(0, abs=1e-6) and share.item() == pytest.approx(1, abs=1e-6)


def test_official_layers_are_mid_and_the_first_up_block(sd15_pipe):
    names = cross_attention_layer_names(sd15_pipe.unet)
    chosen = official_layers(sd15_pipe.unet)
    assert chosen == [n for n in names if n.startswith(("mid_block.", "up_blocks.1."))]
    assert len(chosen) == 3  # tiny SD1.5: 1 mid + 2 in up_blocks.1 (SD1.5 itself: 1 + 3)


@pytest.mark.parametrize("model", ["sd15_pipe", "sdxl_pipe"])
def test_layout_guidance_gradient_matches_a_finite_difference(model, layout, request):
    # The gradient guidance steps along is the loss's: a central difference along a random
    # direction d, (L(x + h·d) − L(x − h·d)) / 2h, equals <∇L, d> to O(h²).
    sd15_pipe = request.getfixturevalue(model)
    lg = LayoutGuidance(layout, step_range=(0, 1))
    sampler = Sampler(sd15_pipe, PROMPT, num_inference_steps=5, seed=0, controls=[lg])
    from mag_explore.attention import cross_attention_hooks

    t = sampler.scheduler.timesteps[0]
    direction = torch.randn(sampler.latents.shape, generator=torch.Generator().manual_seed(3))
    h = 1e-2
    with cross_attention_hooks(sd15_pipe.unet, sampler.hooks) as controller:
        controller.set_step(0, t)
        state = StepState(sd15_pipe, sampler.scheduler, 0, t, sampler.latents, sampler.cond,
                          sampler.uncond, controller, sampler.timesteps)
        _, grad = guidance_pass(state, sampler.latents, lg.hook)
        plus, _ = guidance_pass(state, sampler.latents + h * direction, lg.hook)
        minus, _ = guidance_pass(state, sampler.latents - h * direction, lg.hook)
    # the mid block and the first up block with cross-attention: SD's 1 + 2 layers, the tiny SDXL's 2 + 4
    assert len(lg.hook.layers) == {"sd15_pipe": 3, "sdxl_pipe": 6}[model]
    directional = float((grad * direction).sum())
    assert abs(directional) > 1e-4  # the check means something
    assert (float(plus) - float(minus)) / (2 * h) == pytest.approx(directional, rel=0.05)
    assert lg.step_size(int(t)) == pytest.approx(1 - float(sampler.scheduler.alphas_cumprod[int(t)]))
    assert all(p.grad is None and p.requires_grad for p in sd15_pipe.unet.parameters())


def test_the_ddim_step_size_moves_the_unet_input_as_the_published_lms_step():
    # Published: x_lms <- x_lms - σ² ∇_{x_lms} L(scale_model_input(x_lms)), on LMS latents.
    # Ours: x_t <- x_t - (1 - ᾱ_t) ∇_{x_t} L(x_t), on DDIM latents. Both must give the UNet the same input.
    # Euler's scheduler stands in for LMS (which needs scipy): same σ, latents and scale_model_input.
    lms = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading")
    lms.set_timesteps(50)
    index = 5
    t, sigma = lms.timesteps[index], float(lms.sigmas[index])
    lms._step_index = index  # scale_model_input reads the current step's σ
    g = torch.Generator().manual_seed(0)
    target, x_t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)

    def loss(unet_input):
        return ((unet_input - target) ** 2).sum()

    x_lms = (x_t / lms.scale_model_input(torch.ones(()), t)).requires_grad_(True)  # x_t · sqrt(σ² + 1)
    assert torch.allclose(lms.scale_model_input(x_lms, t), x_t, atol=1e-5)
    (grad_lms,) = torch.autograd.grad(loss(lms.scale_model_input(x_lms, t)), x_lms)
    published = lms.scale_model_input(x_lms.detach() - sigma**2 * grad_lms, t)

    guidance = LayoutGuidance(Layout.from_shapes(8, 8, [rect("red circle", 0, 0, 0.5, 1)]))
    guidance._alphas_cumprod = DDIMScheduler(**SD_BETAS).alphas_cumprod.double()
    x = x_t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x), x)
    ours = x_t - guidance.step_size(int(t)) * grad
    assert torch.allclose(ours, published, atol=1e-4)


def count_unet_calls(pipe, controls):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: calls.append(a[0].shape[0] if a else k["sample"].shape[0]), with_kwargs=True)
    try:
        result = generate(pipe, PROMPT, num_inference_steps=5, seed=0, progress=False, controls=controls)
    finally:
        handle.remove()
    return calls, result


def test_layout_guidance_iterates_until_the_threshold(sd15_pipe, layout):
    before = sd15_pipe.unet.attn_processors
    plain = generate(sd15_pipe, PROMPT, num_inference_steps=5, seed=0, progress=False)
    # Default steps: t > 800 of 5 steps (801, 601, ...) is the first step only; 3 gradient passes.
    lg = LayoutGuidance(layout, max_iter=3, loss_threshold=0.0, loss_scale=300)
    calls, guided = count_unet_calls(sd15_pipe, [lg])
    assert calls == [1, 1, 1, 2, 2, 2, 2, 2]
    assert np.abs(plain.pixels - guided.pixels).max() > 1e-3
    d = guided.diagnostics["lg"]
    assert d["iteration"] == [0, 1, 2] and d["loss"][2] < d["loss"][0]
    # A threshold the loss is always under ((1 - ratio)² <= 1). Published rule: the first
    # loss is compared with the previous one (10000), so it is evaluated *and applied*.
    calls, published = count_unet_calls(sd15_pipe, [LayoutGuidance(layout, loss_threshold=1.0)])
    assert calls == [1, 2, 2, 2, 2, 2]
    assert np.abs(plain.pixels - published.pixels).max() > 1e-3
    # Our variant tests the fresh loss first: one look, no move, plain pixels.
    calls, fresh = count_unet_calls(sd15_pipe, [LayoutGuidance(layout, loss_threshold=1.0, threshold_test="fresh")])
    assert calls == [1, 2, 2, 2, 2, 2]
    assert np.abs(plain.pixels - fresh.pixels).max() <= 1e-5
    after = sd15_pipe.unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def published_lg_loop(x, target, timesteps, eta, loss_scale, threshold, max_iter, max_index_step):
    """silent-chen/layout-guidance's inference loop, as published, on a toy loss of the latent.

    Returns the latent after each step and the number of loss evaluations per step.
    """
    loss = torch.tensor(10000.0)
    latents, evaluations = [], []
    for index, t in enumerate(timesteps):
        iteration = 0
        while loss.item() / loss_scale > threshold and iteration < max_iter and index < max_index_step:
            x = x.detach().requires_grad_(True)
            loss = ((x - target) ** 2).mean() * loss_scale
            grad_cond = torch.autograd.grad(loss, [x])[0]
            x = x - grad_cond * eta
            iteration += 1
        latents.append(x.detach().clone())
        evaluations.append(iteration)
    return latents, evaluations


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.9])
def test_layout_guidance_loop_is_the_published_one_on_a_toy_loss(layout, threshold, monkeypatch):
    # Same toy loss through our control (its guidance step replaced): same latents, same
    # number of evaluations per step, including the update made from a loss already under
    # the threshold and the steps skipped after it.
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    x0, target = torch.randn(1, 4, 4, 4, generator=g) * 1.5, torch.zeros(1, 4, 4, 4)
    timesteps, eta, scale = [981, 961, 941, 921, 901], 0.02, 30.0
    expected, evaluations = published_lg_loop(x0, target, timesteps, eta, scale, threshold, 5, 3)
    lg = LayoutGuidance(layout, loss_scale=scale, loss_threshold=threshold, max_iter=5, step_range=(0, 3))
    lg._alphas_cumprod = torch.full((1000,), 1 - eta, dtype=torch.float64)  # so η_t = 1 − ᾱ_t = eta
    counted = []

    def toy_guidance_pass(state, latents, hook, checkpointing=False):
        latents = latents.detach().requires_grad_(True)
        loss = ((latents - target) ** 2).mean()
        counted[-1] += 1
        return loss.detach(), torch.autograd.grad(loss, latents)[0]

    import mag_explore.methods.layout_guidance as lg_module

    monkeypatch.setattr(lg_module, "guidance_pass", toy_guidance_pass)
    lg._record = lambda *args: None
    x = x0
    for index, t in enumerate(timesteps):
        counted.append(0)
        x = lg.before_step(SimpleNamespace(step_index=index, timestep=torch.tensor(t), latents=x))
        assert torch.allclose(x, expected[index], atol=1e-6), index
    assert counted == evaluations
    assert sum(evaluations) > 1 and 0 in evaluations  # the case exercises both the loop and the skip


def test_layout_guidance_boxes_are_rasterised_on_each_layer_grid_as_published(sd15_pipe):
    # Published: mask[int(y0·H):int(y1·H), int(x0·W):int(x1·W)] = 1 on each layer's H×W grid.
    box = (0.3, 0.1, 0.7, 0.8)
    shapes = Layout.from_shapes(64, 64, [rect("red circle", *box), rect("blue square", 0.0, 0.0, 0.3, 0.3)],
                                prompt=PROMPT)
    lg = LayoutGuidance(shapes, step_range=(0, 1))
    Sampler(sd15_pipe, PROMPT, num_inference_steps=5, seed=0, controls=[lg])  # start() resolves the layout
    for size in (4, 2):  # the tiny UNet's grids (SD at 512²: 16 and 8)
        expected = torch.zeros(size, size)
        x0, y0, x1, y1 = box
        expected[int(y0 * size):int(y1 * size), int(x0 * size):int(x1 * size)] = 1
        assert torch.equal(lg.hook.masks_at(size, size)[0], expected), size
    # At 16x16 the nearest resize of the 64x64 mask is one cell off the published box on the left:
    # column i samples pixel 4i, inside from pixel 19 (centre 19.5 >= 0.3·64), so from i = 5, not int(4.8) = 4.
    published = torch.zeros(16, 16)
    published[int(0.1 * 16):int(0.8 * 16), int(0.3 * 16):int(0.7 * 16)] = 1
    from mag_explore.methods.layout_guidance import box_masks
    assert torch.equal(box_masks(lg.hook.layout, 16, 16)[0], published)
    nearest = lg.hook.layout.masks_at(16, 16, mode="nearest")[0]
    assert not torch.equal(nearest, published) and nearest[:, 4].sum() == 0 and published[:, 4].sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers="coarse"), "layers='coarse': use one of 'official', 'mid\\+up', 'all'"),
    (dict(max_iter=0), "max_iter=0: must be >= 1"),
])
def test_layout_guidance_refuses_bad_settings(layout, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayoutGuidance(layout, **kwargs)


def test_layout_guidance_names_unknown_layers(sd15_pipe, layout):
    lg = LayoutGuidance(layout, layers=["up_blocks.9.attn2"])
    with pytest.raises(ValueError, match=r"unknown cross-attention layers \['up_blocks.9.attn2'\]"):
        generate(sd15_pipe, PROMPT, num_inference_steps=5, seed=0, controls=[lg], progress=False)


def test_make_controls_knows_every_method(layout):
    assert [type(c).__name__ for m in ("pww", "lg") for c in make_controls(m, layout)] == [
        "PaintWithWords", "LayoutGuidance"]
    with pytest.raises(ValueError, match=r"unknown method 'boxdiff'; use one of \('none', 'swap', 'mag', 'pww', 'lg'\)"):
        make_controls("boxdiff", layout)


def test_layout_guidance_stops_on_a_non_finite_loss_and_restores(sd15_pipe, layout):
    # A real trigger: a huge (finite) loss scale throws x_t to ~1e36 after the first update,
    # and the UNet's next pass there gives a NaN loss.
    from mag_explore.methods import NonFiniteGuidanceError

    before = sd15_pipe.unet.attn_processors
    lg = LayoutGuidance(layout, step_range=(0, 1), loss_scale=1e38, loss_threshold=0.0)
    with pytest.raises(NonFiniteGuidanceError, match=r"layout guidance at step 0 .*loss_scale=1e\+38.*smaller loss_scale"):
        generate(sd15_pipe, PROMPT, num_inference_steps=3, seed=0, controls=[lg], progress=False)
    after = sd15_pipe.unet.attn_processors
    assert all(after[n] is before[n] for n in before)
    assert all(p.requires_grad for p in sd15_pipe.unet.parameters())
