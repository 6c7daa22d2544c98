"""Widget logic without a browser: set a control's value, check the state it leads to.

The UNet is watched with a forward pre-hook: display-only controls must never call it,
the Run button must.
"""
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from mag_explore.attention import AttentionStore, CrossAttentionProcessor
from mag_explore.layouts import Layout, ellipse, rect
from mag_explore.methods import MaskedAttentionGuidance, MaskedAttentionSwap
from mag_explore.sampling import generate
from mag_explore.widgets import AttentionExplorer, LayoutBuilder, MagPlayground

PROMPT = "a red circle and a blue square"


@contextmanager
def unet_calls(pipe):
    """A list that gets one entry per UNet forward pass while the block runs."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def result(sd15_pipe):
    return generate(sd15_pipe, PROMPT, num_inference_steps=5, seed=0, progress=False,
                    store=AttentionStore(heads="all", dtype=torch.float32))


@pytest.fixture(scope="module")
def layout():
    return Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)],
                              prompt=PROMPT)


def processors(pipe):
    return dict(pipe.unet.attn_processors)


# ============================================================================ explorer
def test_explorer_controls_select_the_asked_map_and_never_run_the_model(sd15_pipe, result):
    store = result.store
    explorer = AttentionExplorer(result, token="circle")
    assert explorer.token.value == result.token_indices("circle")[0] == 3
    assert explorer.step.value == store.step_indices[-1]
    layer = store.layers[0]
    with unet_calls(sd15_pipe) as calls:
        seen = {explorer.image.value}
        explorer.layer.value = ("layer", layer)
        seen.add(explorer.image.value)
        explorer.step.value = 1
        seen.add(explorer.image.value)
        explorer.token.value = result.token_indices("square")[0]
        seen.add(explorer.image.value)
        explorer.head.value = 2
        seen.add(explorer.image.value)
        explorer.opacity.value = 0.2
        seen.add(explorer.image.value)
    assert calls == []  # display only: the model was not called
    assert len(seen) == 6  # every change redrew a different picture
    assert torch.equal(explorer.selected_map(), store.map(1, layer, 7, head=2))
    assert not torch.equal(explorer.selected_map(), store.map(1, layer, 7))  # one head is not the mean
    assert '"square"' in explorer.caption.value and "step 1" in explorer.caption.value
    assert "head 2" in explorer.caption.value


def test_explorer_grid_and_all_layers(result):
    store = result.store
    explorer = AttentionExplorer(result, token=2)
    explorer.step.value = 0
    by_res = [layer for layer in store.layers if store.grid(layer) == (4, 4)]
    assert len(by_res) == 3  # one down layer, two up layers
    explorer.layer.value = ("grid", (4, 4))
    expected = torch.stack([store.map(0, layer, 2) for layer in by_res]).mean(0)
    assert torch.allclose(explorer.selected_map(), expected)
    explorer.layer.value = ("all", None)
    everything = explorer.selected_map()
    assert everything.shape == (8, 8)  # resampled to the finest layer
    # the mean of heads over all layers is what the store's own aggregate gives
    assert torch.allclose(everything, store.aggregate(tokens=[2], steps=[0])[0], atol=1e-6)


def test_explorer_play_animates_the_step_slider(result):
    explorer = AttentionExplorer(result)
    before = explorer.image.value
    draws = explorer.draws
    explorer.play.value = 0  # what the Play widget does on each tick
    assert explorer.step.value == result.store.step_indices[0]
    assert explorer.image.value != before and explorer.draws == draws + 1
    explorer.step.value = 3
    assert explorer.play.value == 3


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_explorer_head_choice_needs_all_heads(sd15_pipe):
    mean_only = generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, progress=False, store=AttentionStore())
    explorer = AttentionExplorer(mean_only)
    assert explorer.head.disabled and explorer.head.options == (("mean of heads", None),)
    no_store = generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="no attention maps"):
        AttentionExplorer(no_store)
    with pytest.raises(ValueError, match="not stored"):
        AttentionExplorer(mean_only, token=40)


# ============================================================================ playground
@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_playground_waits_for_run_then_matches_generate(sd15_pipe, layout):
    playground = MagPlayground(sd15_pipe, layout, num_inference_steps=5, seed=0)
    preview = playground.image.value
    with unet_calls(sd15_pipe) as calls:
        playground.alpha.value = 0.3
        playground.lmbda.value = 1.0
        playground.mag_step_range.value = (0, 2)
        playground.swap_step_range.value = (1, 3)
        playground.cfg.value = 5.0
        playground.seed.value = 7
    assert calls == [] and playground.result is None and playground.image.value == preview
    assert "press Run" in playground.status.value

    with unet_calls(sd15_pipe) as calls:
        playground.run_button.click()
    assert playground.error is None, playground.error
    # 5 denoising passes + 2 guidance passes (the gradient comes from the same forward)
    assert len(calls) == 7
    assert playground.progress.value == 5 and playground.progress.bar_style == "success"
    assert playground.image.value != preview
    assert playground.result.store.step_indices == [0, 1, 2, 3, 4]
    assert "inside the masks" in playground.status.value

    swap, mag = playground.controls()
    assert isinstance(swap, MaskedAttentionSwap) and isinstance(mag, MaskedAttentionGuidance)
    assert (mag.alpha, mag.lmbda) == (0.3, 1.0)
    same = generate(sd15_pipe, PROMPT, num_inference_steps=5, seed=7, guidance_scale=5.0, progress=False,
                    store=AttentionStore(),
                    controls=[MaskedAttentionSwap(layout, step_range=(1, 3)),
                              MaskedAttentionGuidance(layout, alpha=0.3, lmbda=1.0, step_range=(0, 2))])
    np.testing.assert_array_equal(playground.result.pixels, same.pixels)

    first = playground.image.value
    playground.seed.value = 8
    playground.run_button.click()
    assert playground.runs == 2 and playground.image.value != first


def test_playground_empty_ranges_switch_methods_off(sd15_pipe, layout):
    playground = MagPlayground(sd15_pipe, layout, num_inference_steps=4)
    playground.mag_step_range.value = (2, 2)
    assert playground.controls() == []
    assert "MAG: off" in playground.status.value and "swap: off" in playground.status.value
    with unet_calls(sd15_pipe) as calls:
        playground.run_button.click()
    assert len(calls) == 4  # no guidance pass
    # the same explicit attention (the playground records maps) and no control
    plain = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, progress=False, store=AttentionStore())
    np.testing.assert_array_equal(playground.result.pixels, plain.pixels)


def test_playground_interrupt_leaves_no_hooks(sd15_pipe, layout):
    before = processors(sd15_pipe)
    playground = MagPlayground(sd15_pipe, layout, num_inference_steps=5)
    playground.swap_step_range.value = (0, 5)

    def stop_on_third_call(module, args, count=[0]):
        count[0] += 1
        if count[0] == 3:
            raise KeyboardInterrupt  # what the kernel's stop button raises
    handle = sd15_pipe.unet.register_forward_pre_hook(stop_on_third_call)
    try:
        playground.run_button.click()
    finally:
        handle.remove()
    assert isinstance(playground.error, KeyboardInterrupt)
    assert "interrupted" in playground.status.value and playground.progress.bar_style == "warning"
    after = processors(sd15_pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, CrossAttentionProcessor) for p in after.values())
    assert not playground.run_button.disabled
    playground.run_button.click()  # and the next run works
    assert playground.error is None and playground.runs == 1


def test_playground_shows_errors_and_restores(sd15_pipe):
    wrong = Layout.from_shapes(64, 64, [rect("green triangle", 0, 0, 0.5, 1)])
    before = processors(sd15_pipe)
    playground = MagPlayground(sd15_pipe, wrong, prompt=PROMPT, num_inference_steps=3)
    playground.run_button.click()
    assert isinstance(playground.error, ValueError)
    assert "error" in playground.status.value and "green triangle" in playground.status.value
    assert playground.progress.bar_style == "danger"
    after = processors(sd15_pipe)
    assert all(after[k] is before[k] for k in before)


# ============================================================================ layout builder
def test_layout_builder_regions_follow_the_sliders():
    builder = LayoutBuilder(PROMPT, size=64)
    with pytest.raises(ValueError, match="no region"):
        builder.layout
    builder.add_region("red circle", kind="ellipse", x=0.3, y=0.5, width=0.4, height=0.6)
    first_preview = builder.preview.value
    builder.add_region()  # the button's action: a region with no words yet
    assert "pick one or more words" in builder.status.value
    builder.phrase.value = (5, 6)  # "blue", "square"
    builder.x.value, builder.w.value = 0.75, 0.3
    builder.kind.value = "rectangle"
    layout = builder.layout
    assert [r.phrase for r in layout.regions] == ["red circle", "blue square"]
    np.testing.assert_array_equal(layout.regions[0].mask, ellipse("red circle", 0.3, 0.5, 0.2, 0.3).mask(64, 64))
    np.testing.assert_array_equal(layout.regions[1].mask, rect("blue square", 0.6, 0.3, 0.9, 0.7).mask(64, 64))
    assert builder.preview.value != first_preview
    assert "2 region(s)" in builder.status.value

    shown = builder.preview.value
    builder.region.value = 0  # select the first region: the sliders show its values
    assert (builder.x.value, builder.kind.value, builder.phrase.value) == (0.3, "ellipse", (1, 2))
    assert builder.preview.value == shown  # selecting changes nothing
    builder.y.value = 0.25
    assert builder.layout.regions[0].mask[:8].any() and not builder.layout.regions[0].mask[48:].any()
    assert builder.preview.value != shown

    builder.phrase.value = (1, 3)  # "red" and "and": not consecutive
    assert "not consecutive" in builder.status.value
    builder.remove_region()
    assert [r.phrase for r in builder.layout.regions] == ["blue square"]
    assert "rect('blue square', 0.6, 0.3, 0.9, 0.7)" in builder.to_code()


def test_layout_builder_repeated_words_and_tokens(sd15_pipe):
    prompt = "a red circle and a red square"
    builder = LayoutBuilder(prompt)
    assert [label for label, _ in builder.phrase.options][:3] == ["a (1)", "red (1)", "circle"]
    builder.add_region("red", occurrence=2, x=0.75)
    region = builder.layout.regions[0]
    assert (region.phrase, region.occurrence) == ("red", 2)
    assert builder.layout.resolve(sd15_pipe.tokenizer).regions[0].token_indices == (6,)


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_playground_reads_the_builder_at_each_run(sd15_pipe):
    builder = LayoutBuilder(PROMPT)
    builder.add_region("red circle", x=0.25, width=0.5, height=1.0)
    playground = MagPlayground(sd15_pipe, builder, num_inference_steps=3)
    assert playground.prompt == PROMPT
    playground.run_button.click()
    first = playground.result.pixels
    builder.x.value = 0.75  # move the region: the next run uses the new layout
    mag = playground.controls()[0]
    assert mag.layout.regions[0].mask[:, 60].all() and not mag.layout.regions[0].mask[:, 4].any()
    playground.run_button.click()
    assert playground.error is None and not np.array_equal(first, playground.result.pixels)


def test_playground_accepts_an_empty_builder_and_says_why_it_cannot_run(sd15_pipe):
    builder = LayoutBuilder(PROMPT)
    playground = MagPlayground(sd15_pipe, builder, num_inference_steps=3)
    assert "layout not ready" in playground.status.value
    with unet_calls(sd15_pipe) as calls:
        playground.run_button.click()
    assert calls == [] and isinstance(playground.error, ValueError) and "no region" in playground.status.value
    builder.add_region("blue square")
    playground.run_button.click()
    assert playground.error is None and playground.runs == 1


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_playground_remembers_the_last_runs_and_chooses_mags_layers(sd15_pipe, layout):
    from mag_explore.widgets.playground import cross_attention_layer_sizes

    # the tiny SD1.5-like UNet: 64×64 images, 8×8 latents, cross-attention at 8×8, 4×4 and (mid) 2×2
    assert cross_attention_layer_sizes(sd15_pipe) == [8, 4, 2]
    playground = MagPlayground(sd15_pipe, layout, num_inference_steps=3, remember=2, score_iou=True)
    assert [v for _, v in playground.layer_sizes.options] == [8, 4, 2]
    playground.mag_step_range.value = (0, 1)
    playground.run_button.click()
    playground.alpha.value = 0.5
    playground.layer_sizes.value = (4,)
    playground.places.value = ("up",)
    mag = playground.controls()[0]
    assert mag.layer_sizes == {4} and mag.places == {"up"}
    with unet_calls(sd15_pipe) as calls:
        playground.run_button.click()
    assert playground.error is None, playground.error
    assert len(calls) == 4  # 3 denoising passes + 1 guidance pass
    # MAG read only the 4×4 layers of the up half: the tiny UNet has two of them
    assert playground.result.diagnostics["mag"]["step"] == [0]
    assert playground.last_controls[0].history[0]["layers"] == 2
    playground.seed.value = 3
    playground.run_button.click()
    assert [entry["run"] for entry in playground.history] == [3, 2]  # newest first, only `remember` kept
    newest, older = playground.history
    assert newest["settings"]["seed"] == 3 and older["settings"]["alpha"] == 0.5
    assert older["settings"]["layer_sizes"] == [4] and older["settings"]["places"] == ["up"]
    # each region's IoU again, from the newest image: the pixels of its color word vs its mask
    from mag_explore.shapes.world import segment_by_color

    picture = np.asarray(playground.result.images[0].convert("RGB"))
    found = segment_by_color(picture)
    want = {}
    for label, mask in zip(layout.labels, layout.masks_at(*picture.shape[:2]).numpy() > 0.5):
        got = found.get(label.split()[0], np.zeros_like(mask))
        union = np.logical_or(got, mask).sum()
        want[label] = np.logical_and(got, mask).sum() / union if union else 0.0
    assert newest["iou"] == pytest.approx(want, abs=1e-9)
    assert len(playground.memory.children) == 2
    assert "IoU red circle" in playground.memory.children[0].children[1].value
