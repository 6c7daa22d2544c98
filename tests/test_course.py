"""The helpers the notebooks share."""
import math

import numpy as np
import pytest
from PIL import Image

from mag_explore import course, solutions
from mag_explore.attention import AttentionHook
from mag_explore.layouts import Layout, rect
from mag_explore.sampling import Hooks, generate
from mag_explore.shapes.world import COLORS

PROMPT = "a red circle and a blue square"


def test_example_layout_at_the_model_size(sd15_pipe):
    layout = course.example_layout("left_right", sd15_pipe)
    assert (layout.height, layout.width) == (64, 64) and layout.prompt == PROMPT
    big = course.example_layout("left_right", size=(128, 96))
    assert (big.height, big.width) == (128, 96)
    with pytest.raises(FileNotFoundError, match="left_right"):
        course.example_layout("no_such_layout")


def test_region_iou_reads_colors():
    layout = Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 0.75, 1),
                                         rect("the sky", 0.75, 0, 1, 1)])
    picture = np.full((64, 64, 3), 240, np.uint8)
    picture[:, :32] = COLORS["red"]          # exactly the red region
    picture[:32, 32:48] = COLORS["blue"]     # half the blue region
    scores = course.region_iou(Image.fromarray(picture), layout)
    assert scores["red circle"] == 1.0
    assert scores["blue square"] == pytest.approx(0.5)
    assert math.isnan(scores["the sky"])     # names no color
    assert course.color_of("a big Green triangle") == "green"
    assert course.iou_text(picture, layout).startswith("IoU red circle 1.00 · blue square 0.50")


def test_hooks_control_and_runs(sd15_pipe):
    class Count(AttentionHook):
        calls = 0

        def observe(self, probs, ctx):
            Count.calls += 1
    generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, controls=[Hooks(Count())], progress=False)
    assert Count.calls == 2 * 7  # 2 steps x 7 cross-attention layers
    layout = course.example_layout("left_right", sd15_pipe)
    runs = course.run_methods_on(sd15_pipe, layout, ["none", "swap"], num_inference_steps=4)  # 4 steps: t=751 > 700
    assert set(runs) == {"none", "swap"} and runs["none"].diagnostics == {}
    assert runs["swap"].timesteps == [751, 501, 251, 1]
    assert runs["swap"].diagnostics["swap"]["swapped_steps"] == [0]  # only t = 751 > 700


def test_method_images_titles_name_method_and_iou():
    class Item:
        name = "left-right"
    rows = [{"layout": "left-right", "seed": 0, "method": "none", "iou": 0.125},
            {"layout": "left-right", "seed": 1, "method": "none", "iou": 0.9},
            {"layout": "left-right", "seed": 0, "method": "mag", "iou": 0.5}]
    images = {("left-right", "none"): "A", ("left-right", "mag"): "B"}
    assert course.method_images(Item, ["none", "mag"], images, rows, seed=0) == {"none · IoU 0.12": "A",
                                                                                "mag · IoU 0.50": "B"}


def test_first_step_and_x0(sd15_pipe):
    layout = course.example_layout("left_right", sd15_pipe).resolve(sd15_pipe.tokenizer)
    first = course.first_step_attention(sd15_pipe, layout, alpha=0.3, num_inference_steps=4)
    assert first["loss_after"] < first["loss_before"]
    assert first["plain_store"].step_indices == first["guided_store"].step_indices == [0]
    # exactly one update at the stated alpha: the probes move nothing, so the denoising pass after them
    # sees what one MAG update of x_T at 0.3 gives
    from mag_explore.attention import AttentionStore
    from mag_explore.methods import MaskedAttentionGuidance
    from mag_explore.sampling import Sampler

    one = AttentionStore()
    Sampler(sd15_pipe, layout.prompt, seed=0, num_inference_steps=4, store=one,
            controls=[MaskedAttentionGuidance(layout, alpha=0.3, step_range=(0, 1))]).step()
    layer = one.layers[0]
    assert np.allclose(one.get(0, layer), first["guided_store"].get(0, layer))
    mine = course.first_step_attention(sd15_pipe, layout, alpha=0.3, num_inference_steps=4,
                                       step_fn=solutions.mag_step)
    assert mine["loss_after"] == pytest.approx(first["loss_after"], rel=1e-4)
    result = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, keep_x0=True, progress=False)
    pictures = course.x0_images(sd15_pipe, result, count=3)
    assert list(pictures) == [f"step {i} (t={result.timesteps[i]})" for i in (0, 2, 3)]
    with pytest.raises(ValueError, match="keep_x0"):
        course.x0_images(sd15_pipe, generate(sd15_pipe, PROMPT, num_inference_steps=2, progress=False))


def test_attention_inside_outside_per_pixel(sd15_pipe):
    from mag_explore.attention import AttentionStore

    layout = Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.25, 1), rect("blue square", 0.5, 0, 1, 1)],
                                prompt=PROMPT)
    result = generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, progress=False, store=AttentionStore())
    scores = course.attention_inside_outside(result, layout)
    # written out: the finest (8×8) aggregate of the words' tokens, mean over the mask's cells and the rest
    heat = result.store.aggregate(tokens=result.token_indices("red circle")).sum(0).numpy()
    mask = np.zeros((8, 8), bool)
    mask[:, :2] = True  # the left quarter of 8 columns
    assert scores["red circle"]["inside"] == pytest.approx(heat[mask].mean(), rel=1e-5)
    assert scores["red circle"]["outside"] == pytest.approx(heat[~mask].mean(), rel=1e-5)
    assert scores["red circle"]["ratio"] == pytest.approx(heat[mask].mean() / heat[~mask].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="no attention maps"):
        course.attention_inside_outside(generate(sd15_pipe, PROMPT, num_inference_steps=1, progress=False), layout)


def test_guidance_cost_times_the_guided_steps(sd15_pipe):
    layout = course.example_layout("left_right", sd15_pipe)
    cost = course.guidance_cost(sd15_pipe, layout, num_inference_steps=4, repeats=1)
    # the tiny model's default: guide while t > 700; with 4 DDIM steps (t 751, 501, 251, 1) that is step 0
    assert cost["guided_steps"] == [0]
    assert cost["plain_step_s"] > 0 and cost["guided_step_s"] > 0
    assert cost["ratio"] == pytest.approx(cost["guided_step_s"] / cost["plain_step_s"])
