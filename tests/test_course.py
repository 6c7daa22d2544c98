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


# ------------------------------------------------------------------ claims the text makes
def test_claims_are_checked_on_the_embedded_model_at_its_defaults(capsys):
    from mag_explore import load_pipeline

    shapes = load_pipeline("shapes", device="cpu")
    claims = course.Claims(shapes, None)
    assert claims.apply
    claims.expect("two is more than one", 2 > 1, {"two": 2.004})
    assert claims.checked == 1 and capsys.readouterr().out == "✓ two is more than one · measured {'two': 2.0}\n"
    with pytest.raises(course.ClaimFailed, match=r"the text says: MAG places it; but · measured 0.12"):
        claims.expect("MAG places it", False, 0.123)
    # a claim is a function where computing it only makes sense on the embedded model
    claims.expect("lazily", lambda: True)
    assert claims.checked == 2


def test_claims_elsewhere_say_so_instead_of_checking(sd15_pipe, capsys):
    from mag_explore import load_pipeline

    calls = []
    claims = course.Claims(sd15_pipe, None)
    assert not claims.apply
    claims.expect("MAG places it", lambda: calls.append(1))
    assert calls == [] and claims.skipped == 1 and claims.checked == 0  # never computed, never asserted
    out = capsys.readouterr().out
    assert out.startswith("– not checked here (the text describes the embedded 'shapes' model at its default steps; "
                          "this run uses ") and out.endswith("): MAG places it\n")
    # fewer steps than the text measured: not checked either
    shapes = load_pipeline("shapes", device="cpu")
    fewer = course.Claims(shapes, 8)
    assert not fewer.apply and "at 8 steps" in fewer.reason
    # a notebook measured at its own step count (06 edits at 25) checks at that count only
    assert course.Claims(shapes, 25, text_steps=25).apply
    assert not course.Claims(shapes, None, text_steps=25).apply
    # a claim about shapes or counts holds on every model and is checked everywhere
    with pytest.raises(course.ClaimFailed):
        claims.expect("rows sum to one", False, anywhere=True)


def test_object_counts_see_a_duplicate():
    from mag_explore.shapes.world import render

    background = np.array([240.0, 240.0, 240.0])
    image, _ = render([("red", "circle", 14, 14, 14), ("red", "circle", 48, 48, 14), ("blue", "square", 48, 14, 14)],
                      background=background, size=64)
    assert course.object_counts(image) == {"red": 2, "blue": 1}
    masks = course.color_masks(image)
    assert masks["red"].sum() > 0 and set(course.object_counts(image)) <= set(masks)


def test_describe_names_model_place_and_defaults(sd15_pipe):
    line = course.describe(sd15_pipe)
    assert "StableDiffusionPipeline" in line and "on cpu" in line and "torch.float32" in line
    assert "64×64 images, 50 steps, CFG 9.0" in line


def test_cpu_threads_for_a_small_model(sd15_pipe, monkeypatch):
    import torch

    from mag_explore import use_cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("MAG_EXPLORE_THREADS", raising=False)
        assert use_cpu_threads(sd15_pipe) == 1 == torch.get_num_threads()
        monkeypatch.setenv("MAG_EXPLORE_THREADS", "2")
        assert use_cpu_threads(sd15_pipe) == 2 == torch.get_num_threads()
        monkeypatch.setenv("MAG_EXPLORE_THREADS", "many")
        with pytest.raises(ValueError, match=r"\$MAG_EXPLORE_THREADS='many': expected a whole number"):
            use_cpu_threads(sd15_pipe)
    finally:
        torch.set_num_threads(before)
