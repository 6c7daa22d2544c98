"""Masked-attention swapping and masked-attention guidance on the tiny pipelines."""
import numpy as np
import pytest
import torch

from mag_explore.attention import AttentionHook, AttentionStore, cross_attention_layer_names
from mag_explore.layouts import Layout, rect
from mag_explore.methods import (LayoutGuidance, MaskedAttentionGuidance, MaskedAttentionSwap, NonFiniteGuidanceError,
                                 PaintWithWords, guidance_pass, mag_loss_terms, make_controls)
from mag_explore.sampling import Sampler, StepState, generate

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def layout():
    return Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])


@pytest.fixture(scope="module")
def shapes_pipe():
    from mag_explore.models import load_pipeline

    return load_pipeline("shapes", device="cpu")


@pytest.fixture(scope="module")
def layout_64():
    from mag_explore.data import data_path

    return Layout.from_json(data_path("layouts", "left_right.json")).resized(64, 64)


def full_store():
    return AttentionStore(tokens="all", heads="all", roles=("uncond", "cond"), dtype=torch.float32)


# ---------------------------------------------------------------- swapping
def test_swap_sets_exact_values_only_where_asked(sd15_pipe, layout):
    swapped, plain = full_store(), full_store()
    swap = MaskedAttentionSwap(layout, step_range=(0, 2))
    generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, controls=[swap], store=swapped, progress=False)
    generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, store=plain, progress=False)
    first = cross_attention_layer_names(sd15_pipe.unet)[0]  # same input in both runs at step 0
    for step in (0, 1):
        for layer in swapped.layers:
            cond = swapped.get(step, layer)[1]  # (heads, h, w, 77)
            h, w = swapped.grid(layer)
            masks = layout.masks_at(h, w)
            for region, mask in zip(((2, 3), (6, 7)), masks):  # red circle, blue square
                for token in region:
                    expected = (mask / len(region)).expand(cond.shape[0], h, w)
                    assert torch.equal(cond[..., token], expected)
        # other tokens and the unconditional half are untouched (compared where inputs are identical)
        if step == 0:
            ref = plain.get(0, first)
            ours = swapped.get(0, first)
            others = [i for i in range(77) if i not in (2, 3, 6, 7)]
            assert torch.allclose(ours[1][..., others], ref[1][..., others], atol=1e-6)
            assert torch.allclose(ours[0], ref[0], atol=1e-6)
    # steps outside the range: no swapped pattern
    cond = swapped.get(2, first)[1][..., 2]
    assert not torch.equal(cond, (layout.masks_at(*swapped.grid(first))[0] / 2).expand_as(cond))
    assert swap.diagnostics["swapped_steps"] == [0, 1]


def test_swap_renormalized_rows_sum_to_one(sd15_pipe, layout):
    store, plain = full_store(), full_store()
    swap = MaskedAttentionSwap(layout, step_range=(0, 1), renormalize=True)
    generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, controls=[swap], store=store, progress=False)
    generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, store=plain, progress=False)
    for layer in store.layers:
        assert torch.allclose(store.get(0, layer)[1].sum(-1), torch.ones(()), atol=1e-5)
    # The first cross-attention layer sees the same input with or without the swap (none runs before
    # it), so its swapped map is knowable from the plain one: each region's tokens 1/len inside its
    # mask and 0 outside, every other token rescaled so that the row sums to one.
    first = next(name for name in store.layers if name.startswith("down_blocks.0.attentions.0."))
    resolved = layout.resolve(sd15_pipe.tokenizer, PROMPT)
    h, w = store.grid(first)
    before = plain.get(0, first)[1].reshape(-1, h * w, 77)  # cond half: (heads, pixels, keys)
    swapped = store.get(0, first)[1].reshape(-1, h * w, 77)
    want = before.clone()
    for mask, tokens in zip(resolved.masks_at(h, w).flatten(1), resolved.token_groups):
        want[..., tokens] = (mask / len(tokens))[None, :, None]
    region = sorted({i for tokens in resolved.token_groups for i in tokens})
    other = [i for i in range(77) if i not in region]
    want[..., other] = before[..., other] * ((1 - want[..., region].sum(-1)) / before[..., other].sum(-1))[..., None]
    torch.testing.assert_close(swapped, want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the MAG loss
def test_mag_loss_matches_the_formula_on_a_hand_made_tensor():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 16, 10, generator=g).softmax(-1)  # (batch, heads, pixels, tokens)
    masks = (torch.rand(2, 16, generator=g) > 0.5).float()
    groups, lmbda = [[1, 2], [4]], 0.5
    expected = 0.0
    p, m = probs.numpy().astype(np.float64), masks.numpy()
    for region, tokens in enumerate(groups):
        for b in range(2):
            for head in range(3):
                for pixel in range(16):
                    for token in tokens:
                        a = p[b, head, pixel, token]
                        expected += -a if m[region, pixel] else lmbda * a
    loss, inside, outside = mag_loss_terms(probs, masks, groups, lmbda)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert inside.shape == outside.shape == (2,)
    assert (inside + outside).sum().item() == pytest.approx(p[..., [1, 2, 4]].sum(), rel=1e-5)


# ---------------------------------------------------------------- MAG in the sampler
def first_state(pipe, layout, mag, **kw):
    sampler = Sampler(pipe, PROMPT, num_inference_steps=5, seed=0, controls=[mag], **kw)
    from mag_explore.attention import cross_attention_hooks

    return sampler, cross_attention_hooks(pipe.unet, sampler.hooks)


@pytest.mark.parametrize("pipe_name", ["sd15_pipe", "sd21_pipe"])
def test_mag_collects_every_attn2_layer_and_its_gradient_is_the_loss_gradient(request, pipe_name, layout):
    pipe = request.getfixturevalue(pipe_name)
    mag = MaskedAttentionGuidance(layout, alpha=1.0, step_range=(0, 1))
    sampler, hooks = first_state(pipe, layout, mag)
    direction = torch.randn(sampler.latents.shape, generator=torch.Generator().manual_seed(1))
    h = 1e-2
    with hooks as controller:
        controller.set_step(0, sampler.scheduler.timesteps[0])
        state = StepState(pipe, sampler.scheduler, 0, sampler.scheduler.timesteps[0], sampler.latents,
                          sampler.cond, sampler.uncond, controller, sampler.timesteps)
        _, grad = guidance_pass(state, sampler.latents, mag.hook)
        layers = list(mag.hook.layers)
        plus, _ = guidance_pass(state, sampler.latents + h * direction, mag.hook)
        minus, _ = guidance_pass(state, sampler.latents - h * direction, mag.hook)
        moved = mag.before_step(state)  # the control's own update (the model's rule: "official")
    # the paper's step is x_t - alpha * grad, written out here
    torch.testing.assert_close(moved, (sampler.latents - 1.0 * grad).detach())
    # every cross-attention module of the UNet, down, mid and up, as the official loss sums them
    attn2 = [name for name, _ in pipe.unet.named_modules() if name.endswith(".attn2")]
    assert sorted(layers) == sorted(attn2) and any(n.startswith("mid_block.") for n in layers)
    # central difference along a random direction = <grad, direction> (to O(h²))
    directional = float((grad * direction).sum())
    assert abs(directional) > 1e-3
    assert (float(plus) - float(minus)) / (2 * h) == pytest.approx(directional, rel=0.05)
    # only the latent required grad: weights untouched, no gradients left on them
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert all(p.requires_grad for p in pipe.unet.parameters())  # the flags are restored


def test_mag_on_an_fp16_model_updates_x_t_in_fp32(sd15_folder, layout):
    # The official code keeps x_t and the α·∇ update in fp32. An fp16 latent near 1 has a
    # spacing of 2⁻¹⁰ ≈ 1e-3, so updates below ~5e-4 would round away; here they must not.
    from mag_explore.attention import cross_attention_hooks
    from mag_explore.models import load_pipeline

    pipe = load_pipeline(sd15_folder, device="cpu", dtype=torch.float16)
    mag = MaskedAttentionGuidance(layout, alpha=1e-3, step_range=(0, 1))
    sampler = Sampler(pipe, PROMPT, num_inference_steps=5, seed=0, controls=[mag])
    assert sampler.latents.dtype == torch.float32
    t = sampler.scheduler.timesteps[0]
    with cross_attention_hooks(pipe.unet, sampler.hooks) as controller:
        controller.set_step(0, t)
        state = StepState(pipe, sampler.scheduler, 0, t, sampler.latents, sampler.cond,
                          sampler.uncond, controller, sampler.timesteps)
        _, grad = guidance_pass(state, sampler.latents, mag.hook)
        moved = mag.before_step(state)
    assert grad.dtype == moved.dtype == torch.float32 and torch.isfinite(grad).all()
    update = 1e-3 * grad
    assert torch.equal(moved, sampler.latents - update)
    lost_in_fp16 = (sampler.latents.half() - update.half()) == sampler.latents.half()
    assert 0 < int((lost_in_fp16 & (update != 0)).sum())  # cells fp16 latents would have kept unchanged...
    assert bool((moved != sampler.latents)[lost_in_fp16 & (update != 0)].all())  # ...move here
    result = generate(pipe, PROMPT, num_inference_steps=5, seed=0, controls=[MaskedAttentionGuidance(
        layout, alpha=1.0, step_range=(0, 2))], progress=False)
    assert result.latents.dtype == torch.float32 and np.isfinite(result.pixels).all()
    assert all(p.requires_grad for p in pipe.unet.parameters())


def test_normalized_step_is_alpha_noise_stds_long_in_the_gradient_direction(sd15_pipe, layout):
    # Ours, not the paper's: x_t - alpha * sigma_t * grad / rms(grad), sigma_t = sqrt(1 - abar_t).
    # The official step of the same state gives the gradient: (x_t - moved) / alpha.
    alpha = 0.05
    moves = {}
    for rule in ("official", "normalized"):
        mag = MaskedAttentionGuidance(layout, alpha=alpha, step_rule=rule, step_range=(0, 1))
        sampler, hooks = first_state(sd15_pipe, layout, mag)
        t = sampler.scheduler.timesteps[0]
        with hooks as controller:
            controller.set_step(0, t)
            state = StepState(sd15_pipe, sampler.scheduler, 0, t, sampler.latents, sampler.cond,
                              sampler.uncond, controller, sampler.timesteps)
            moves[rule] = sampler.latents - mag.before_step(state)
        assert mag.settings["step_rule"] == rule
    grad = moves["official"] / alpha
    sigma = float(1 - sd15_pipe.scheduler.alphas_cumprod[int(t)]) ** 0.5
    rms = float(grad.pow(2).mean().sqrt())
    torch.testing.assert_close(moves["normalized"], alpha * sigma * grad / rms, rtol=1e-4, atol=1e-6)
    assert float(moves["normalized"].pow(2).mean().sqrt()) == pytest.approx(alpha * sigma, rel=1e-4)
    with pytest.raises(ValueError, match=r"step_rule='adam': use one of 'official', 'normalized'"):
        MaskedAttentionGuidance(layout, step_rule="adam")


def test_alpha_zero_is_plain_sampling(sd15_pipe, layout):
    plain = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, progress=False)
    mag = MaskedAttentionGuidance(layout, alpha=0.0, step_range=(0, 2))
    guided = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, controls=[mag], progress=False)
    assert np.abs(plain.pixels - guided.pixels).max() <= 1e-4
    assert mag.diagnostics["step"] == [0, 1]


class GuidancePassRecorder(AttentionHook):
    """Keeps the probabilities of every guidance-phase pass, layer by layer."""

    def __init__(self):
        self.passes = []

    def active(self, ctx):
        return ctx.phase == "guidance"

    def observe(self, probs, ctx):
        if not self.passes or ctx.layer in self.passes[-1]:
            self.passes.append({})
        self.passes[-1][ctx.layer] = (probs.detach().float().clone(), ctx.height, ctx.width)


def test_guidance_changes_the_image_and_records_diagnostics(sd15_pipe, layout):
    from mag_explore.sampling import Hooks

    plain = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, progress=False)
    mag = MaskedAttentionGuidance(layout, alpha=5.0, step_range=(0, 2), iterations=2)
    recorder = GuidancePassRecorder()
    guided = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, controls=[mag, Hooks(recorder)],
                      progress=False)
    assert np.abs(plain.pixels - guided.pixels).max() > 1e-3
    d = guided.diagnostics["mag"]
    assert d["step"] == [0, 0, 1, 1] and d["iteration"] == [0, 1, 0, 1]
    assert d["loss"][1] < d["loss"][0]  # the second iteration starts from a better x_t
    # each pass's share of the region words' attention inside their masks, summed over layers
    assert len(recorder.passes) == 4
    for recorded, shares in zip(recorder.passes, d["inside_share"]):
        for region, tokens in enumerate(([2, 3], [6, 7])):
            inside = total = 0.0
            for probs, h, w in recorded.values():
                mask = layout.masks_at(h, w)[region].flatten()
                attention = probs[..., tokens].sum(-1)  # (batch, heads, pixels)
                inside += float((attention * mask).sum())
                total += float(attention.sum())
            assert shares[region] == pytest.approx(inside / total, rel=1e-5)


def count_unet_calls(pipe, **kw):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[0] if a else k["sample"].shape[0]),
                                                 with_kwargs=True)
    try:
        generate(pipe, PROMPT, num_inference_steps=5, seed=0, progress=False, **kw)
    finally:
        handle.remove()
    return calls


def test_steps_outside_the_range_run_no_guidance_pass(sd15_pipe, layout):
    mag = MaskedAttentionGuidance(layout, alpha=0.1, while_t_above=600, iterations=2)  # t = 801, 601 > 600 of 5 steps
    calls = count_unet_calls(sd15_pipe, controls=[mag])
    # guided steps: 2 conditional-only passes (batch 1) before the CFG pass (batch 2)
    assert calls == [1, 1, 2, 1, 1, 2, 2, 2, 2]


def test_gradient_checkpointing_gives_the_same_update(sd15_pipe, layout):
    results = []
    for checkpointing in (False, True):
        mag = MaskedAttentionGuidance(layout, alpha=2.0, step_range=(0, 1), gradient_checkpointing=checkpointing)
        results.append(generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, controls=[mag], progress=False))
        assert not sd15_pipe.unet.is_gradient_checkpointing
    assert np.abs(results[0].pixels - results[1].pixels).max() <= 1e-4
    plain = generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, progress=False)
    assert np.abs(results[0].pixels - plain.pixels).max() > 1e-3  # and the update did something


def test_non_finite_loss_stops_with_a_clear_error(sd15_pipe, layout):
    before = sd15_pipe.unet.attn_processors

    def broken_loss(probs, masks, groups, lmbda):
        loss, inside, outside = mag_loss_terms(probs, masks, groups, lmbda)
        return loss * float("nan"), inside, outside

    mag = MaskedAttentionGuidance(layout, step_range=(1, 2), loss_fn=broken_loss)
    with pytest.raises(NonFiniteGuidanceError, match=r"step 1 \(t=601\).*smaller alpha"):
        generate(sd15_pipe, PROMPT, num_inference_steps=5, seed=0, controls=[mag], progress=False)
    after = sd15_pipe.unet.attn_processors
    assert all(after[n] is before[n] for n in before)
    assert all(p.requires_grad for p in sd15_pipe.unet.parameters())


@pytest.mark.parametrize("make, message", [
    (lambda lay: MaskedAttentionGuidance(lay, step_range=(0, 9)), "stop step 9"),
    (lambda lay: MaskedAttentionSwap(lay, while_t_above=990), "selects no step"),
    (lambda lay: MaskedAttentionGuidance(lay, layer_sizes=[1024]), "no cross-attention layer matched"),
    (lambda lay: MaskedAttentionGuidance(Layout.from_shapes(64, 64, [rect("dog", 0, 0, 1, 1)])), "'dog' is not in the prompt"),
])
def test_bad_settings_raise_and_restore(sd15_pipe, layout, make, message):
    before = sd15_pipe.unet.attn_processors
    with pytest.raises(ValueError, match=message):
        generate(sd15_pipe, PROMPT, num_inference_steps=5, seed=0, controls=[make(layout)], progress=False)
    after = sd15_pipe.unet.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_layout_of_another_size_is_resized_with_a_warning(sd15_pipe):
    big = Layout.from_shapes(128, 128, [rect("red circle", 0, 0, 0.5, 1)])
    with pytest.warns(UserWarning, match="128x128"):
        generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, progress=False,
                 controls=[MaskedAttentionGuidance(big, step_range=(0, 1))])


# ---------------------------------------------------------------- one meaning per name
RANGE_CLASSES = [MaskedAttentionGuidance, MaskedAttentionSwap, PaintWithWords, LayoutGuidance]


@pytest.mark.parametrize("cls", RANGE_CLASSES)
def test_a_bare_int_raises_with_the_fix(cls, layout):
    with pytest.raises(TypeError, match="steps"):  # no keyword `steps` (it meant a threshold here, a count there)
        cls(layout, steps=10)
    with pytest.raises(TypeError, match=r"step_range=10 is not a \(start, stop\) pair.*while_t_above=10"):
        cls(layout, step_range=10)
    with pytest.raises(TypeError, match=r"while_t_above=\(0, 10\) must be an int timestep.*step_range"):
        cls(layout, while_t_above=(0, 10))
    with pytest.raises(TypeError, match="not both"):
        cls(layout, while_t_above=700, step_range=(0, 10))
    with pytest.raises(TypeError):  # positional settings are not accepted either: no guessing
        cls(layout, 10)


def test_make_controls_passes_the_same_keywords_and_refuses_others(layout):
    (swap,) = make_controls("swap", layout, step_range=(0, 3))
    assert isinstance(swap, MaskedAttentionSwap) and swap.step_range == (0, 3)
    with pytest.raises(ValueError, match=r"no options \['steps'\]"):
        make_controls("mag", layout, steps=700)
    with pytest.raises(ValueError, match=r"'swap' has no options \['alpha'\]"):
        make_controls("swap", layout, alpha=0.1)


def test_settings_and_diagnostics_are_keyed_by_short_name(sd15_pipe, layout):
    result = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, progress=False,
                      controls=[MaskedAttentionSwap(layout, step_range=(0, 1)), MaskedAttentionGuidance(layout)])
    assert set(result.diagnostics) == {"swap", "mag"}
    # the tiny pipelines have no mag_explore.json: the official values, written out here
    assert result.settings["mag"]["alpha"] == 0.08 and result.settings["mag"]["lmbda"] == 0.5
    assert result.settings["mag"]["while_t_above"] == 700
    assert result.settings["swap"]["step_range"] == (0, 1)
    assert result.diagnostics["mag"]["timestep"] == [t for t in result.timesteps if t > 700]


def test_mag_without_alpha_uses_the_models_alpha(shapes_pipe, layout_64):
    """On the embedded model (its mag_explore.json sets mag_alpha), leaving alpha out is the model's alpha."""
    import json

    from mag_explore.models import shapes_model_dir

    alpha = json.loads((shapes_model_dir() / "mag_explore.json").read_text())["mag_alpha"]
    assert alpha != 0.08  # else this test could not tell the model's alpha from the official one
    run = dict(num_inference_steps=4, seed=0, progress=False)
    default = generate(shapes_pipe, layout_64.prompt, controls=[MaskedAttentionGuidance(layout_64)], **run)
    explicit = generate(shapes_pipe, layout_64.prompt, controls=[MaskedAttentionGuidance(layout_64, alpha=alpha)],
                        **run)
    official = generate(shapes_pipe, layout_64.prompt, controls=[MaskedAttentionGuidance(layout_64, alpha=0.08)],
                        **run)
    np.testing.assert_array_equal(default.pixels, explicit.pixels)
    assert not np.array_equal(default.pixels, official.pixels)
    assert default.settings["mag"]["alpha"] == alpha


def test_mag_mask_mode_comes_from_the_model_defaults(tmp_path, sd15_folder):
    """``mask_mode=None`` is the model's ``mag_mask_mode``: "nearest" (official) unless its
    mag_explore.json says otherwise; a value it cannot use is refused, naming the choices."""
    import json
    import shutil

    from mag_explore.layouts import ellipse
    from mag_explore.models import load_pipeline

    # an ellipse's edge cuts the layers' cells: nearest and area masks differ there
    layout = Layout.from_shapes(64, 64, [ellipse("red circle", 0.3, 0.4, 0.22, 0.3), rect("blue square", 0.55, 0.1, 0.95, 0.7)])

    run = dict(num_inference_steps=4, seed=0, progress=False)
    plain = generate(load_pipeline(str(sd15_folder), device="cpu"), PROMPT, controls=[MaskedAttentionGuidance(layout)],
                     **run)
    assert plain.settings["mag"]["mask_mode"] == "nearest"
    folder = tmp_path / "model"
    shutil.copytree(sd15_folder, folder)
    (folder / "mag_explore.json").write_text(json.dumps({"mag_mask_mode": "area"}))
    pipe = load_pipeline(str(folder), device="cpu")
    default = generate(pipe, PROMPT, controls=[MaskedAttentionGuidance(layout)], **run)
    area = generate(pipe, PROMPT, controls=[MaskedAttentionGuidance(layout, mask_mode="area")], **run)
    nearest = generate(pipe, PROMPT, controls=[MaskedAttentionGuidance(layout, mask_mode="nearest")], **run)
    assert default.settings["mag"]["mask_mode"] == "area"
    np.testing.assert_array_equal(default.pixels, area.pixels)
    assert not np.array_equal(default.pixels, nearest.pixels)
    (folder / "mag_explore.json").write_text(json.dumps({"mag_mask_mode": "cubic"}))
    with pytest.raises(ValueError, match="mag_mask_mode='cubic': use one of 'nearest', 'area'"):
        generate(load_pipeline(str(folder), device="cpu"), PROMPT, controls=[MaskedAttentionGuidance(layout)], **run)


def test_generate_shows_its_options():
    import inspect

    shown = inspect.signature(generate).parameters
    sampler = inspect.signature(Sampler).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in shown.values())  # no **kwargs hiding them
    assert set(sampler) <= set(shown) and "progress" in shown
    for name in sampler:
        assert shown[name].default == sampler[name].default, name
    with pytest.raises(TypeError, match="steps"):  # an option it does not list is refused, not ignored
        generate(None, "a red circle", steps=10)


def test_a_single_place_or_resolution_is_one_value_not_its_letters(sd15_pipe, layout):
    # What `--sweep mag.places=up` and `--sweep mag.layer_sizes=16` pass: one value, not a list.
    assert MaskedAttentionGuidance(layout, layer_sizes=8).layer_sizes == {8}
    mag = MaskedAttentionGuidance(layout, places="up", step_range=(0, 1))
    assert mag.places == {"up"}
    sampler, hooks = first_state(sd15_pipe, layout, mag)
    with hooks as controller:
        controller.set_step(0, sampler.scheduler.timesteps[0])
        state = StepState(sd15_pipe, sampler.scheduler, 0, sampler.scheduler.timesteps[0], sampler.latents,
                          sampler.cond, sampler.uncond, controller, sampler.timesteps)
        guidance_pass(state, sampler.latents, mag.hook)
    up = [n for n, _ in sd15_pipe.unet.named_modules() if n.endswith(".attn2") and n.startswith("up_blocks.")]
    assert sorted(mag.hook.layers) == sorted(up) and up
    with pytest.raises(ValueError, match="upp"):
        MaskedAttentionGuidance(layout, places="upp")


def test_balanced_loss_matches_the_formula_by_hand():
    """Ours: −Σ A[in] + λ·(|M|/|1 − M|)·Σ A[out]; the outside term of a word attending evenly
    equals its inside term, so at λ = 1 turning such a word down changes nothing."""
    from mag_explore.methods import balanced_loss_terms, mag_loss_terms

    probs = torch.rand(2, 3, 16, 5, generator=torch.Generator().manual_seed(0)).softmax(-1)
    masks = torch.zeros(2, 16)
    masks[0, :4] = 1.0          # a quarter of the pixels
    masks[1, 6:14] = 0.5        # soft ("area") mask values count by their weight
    groups = [[1, 2], [4]]
    loss, inside, outside = balanced_loss_terms(probs, masks, groups, lmbda=0.7)
    want = 0.0
    for mask, tokens in zip(masks, groups):
        a = probs[..., tokens].sum(-1)
        i, o = float((a * mask).sum()), float((a * (1 - mask)).sum())
        want += -i + 0.7 * float(mask.sum()) / float((1 - mask).sum()) * o
    assert float(loss) == pytest.approx(want, rel=1e-5)
    _, official_inside, official_outside = mag_loss_terms(probs, masks, groups, lmbda=0.7)
    torch.testing.assert_close(inside, official_inside)
    torch.testing.assert_close(outside, official_outside)
    even = torch.full((1, 1, 16, 2), 0.5)
    for scale in (1.0, 0.1):
        assert float(balanced_loss_terms(even * scale, masks[:1], [[0]], lmbda=1.0)[0]) == pytest.approx(0.0, abs=1e-6)
        assert float(mag_loss_terms(even * scale, masks[:1], [[0]], lmbda=1.0)[0]) == pytest.approx(
            scale * 0.5 * (12 - 4))  # the paper's loss falls as the word is turned down


def test_mag_resolutions_come_from_the_model_defaults(tmp_path, sd15_folder):
    """``layer_sizes=None`` is the model's ``mag_layer_sizes``: every layer unless its
    mag_explore.json names layer sizes; a bad entry is refused, naming the key."""
    import json
    import shutil

    from mag_explore.attention import AttentionStore
    from mag_explore.models import load_pipeline

    layout = Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])
    run = dict(num_inference_steps=4, seed=0, progress=False)
    store = AttentionStore()
    generate(load_pipeline(str(sd15_folder), device="cpu"), PROMPT, store=store, **run)
    sizes = sorted(max(hw) for hw in store.grids_seen)
    plain = generate(load_pipeline(str(sd15_folder), device="cpu"), PROMPT, controls=[MaskedAttentionGuidance(layout)],
                     **run)
    assert plain.settings["mag"]["layer_sizes"] is None
    assert len(sizes) >= 2, sizes  # the tiny model has layers of several sizes: leaving some out must show
    folder = tmp_path / "model"
    shutil.copytree(sd15_folder, folder)
    (folder / "mag_explore.json").write_text(json.dumps({"mag_layer_sizes": [sizes[-1]]}))
    pipe = load_pipeline(str(folder), device="cpu")
    default = generate(pipe, PROMPT, controls=[MaskedAttentionGuidance(layout)], **run)
    named = generate(pipe, PROMPT, controls=[MaskedAttentionGuidance(layout, layer_sizes=sizes[-1])], **run)
    every = generate(pipe, PROMPT, controls=[MaskedAttentionGuidance(layout, layer_sizes=sizes)], **run)
    assert default.settings["mag"]["layer_sizes"] == [sizes[-1]]
    np.testing.assert_array_equal(default.pixels, named.pixels)
    np.testing.assert_array_equal(plain.pixels, every.pixels)
    assert not np.array_equal(default.pixels, every.pixels)
    (folder / "mag_explore.json").write_text(json.dumps({"mag_layer_sizes": [0]}))
    with pytest.raises(ValueError, match="mag_layer_sizes"):
        generate(load_pipeline(str(folder), device="cpu"), PROMPT, controls=[MaskedAttentionGuidance(layout)], **run)
    (folder / "mag_explore.json").write_text(json.dumps({"mag_layer_sizes": 16}))
    with pytest.raises(ValueError, match="mag_layer_sizes=16 must be list or null"):
        generate(load_pipeline(str(folder), device="cpu"), PROMPT, controls=[MaskedAttentionGuidance(layout)], **run)


def test_mag_loss_by_name_from_the_model_defaults(tmp_path, sd15_folder):
    import json
    import shutil

    from mag_explore.models import load_pipeline

    # regions of a quarter and three eighths of the image (the two losses agree on halves)
    layout = Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.25, 1), rect("blue square", 0.5, 0, 0.875, 1)])

    run = dict(num_inference_steps=4, seed=0, progress=False)
    folder = tmp_path / "model"
    shutil.copytree(sd15_folder, folder)
    (folder / "mag_explore.json").write_text(json.dumps({"mag_loss": "balanced"}))
    pipe = load_pipeline(str(folder), device="cpu")
    default = generate(pipe, PROMPT, controls=[MaskedAttentionGuidance(layout)], **run)
    named = generate(pipe, PROMPT, controls=[MaskedAttentionGuidance(layout, loss_fn="balanced")], **run)
    official = generate(pipe, PROMPT, controls=[MaskedAttentionGuidance(layout, loss_fn="official")], **run)
    assert default.settings["mag"]["loss_fn"] == "balanced" and official.settings["mag"]["loss_fn"] == "official"
    np.testing.assert_array_equal(default.pixels, named.pixels)
    assert not np.array_equal(default.pixels, official.pixels)
    with pytest.raises(ValueError, match="loss_fn='fair': use one of 'official', 'balanced'"):
        MaskedAttentionGuidance(layout, loss_fn="fair")
