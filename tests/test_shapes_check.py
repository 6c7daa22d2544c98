"""The embedded model's check: its plumbing on a tiny pipeline, and a small sample on the real model."""
import numpy as np
import pytest

from mag_explore.models import shapes_model_dir
from mag_explore.shapes import check
from mag_explore.shapes.world import COLORS, parse_caption


def test_check_prompts_are_seeded_one_or_two_objects_of_distinct_colors():
    prompts = check.check_prompts(40, seed=3)
    assert prompts == check.check_prompts(40, seed=3) and prompts != check.check_prompts(40, seed=4)
    counts = [len(parse_caption(p)) for p in prompts]
    assert counts.count(1) == counts.count(2) == 20
    assert all(len({c for c, _ in parse_caption(p)}) == n for p, n in zip(prompts, counts))
    assert {c for p in prompts for c, _ in parse_caption(p)} == set(COLORS)


def test_verdicts_compare_with_each_goal_in_its_direction():
    figures = {"colors_present": 0.9, "shape_correct": 0.7, "seconds_50_steps": 2.5, "images": 4}
    assert [(name, passed) for name, _, _, passed in check.verdicts(figures)] == [
        ("colors_present", True), ("shape_correct", False), ("seconds_50_steps", False)]
    text = check.report(figures)
    assert "colors_present" in text and "FAIL" in text and "images=4" in text


def test_the_check_runs_end_to_end_on_a_tiny_pipeline(sd15_pipe):
    # Random weights: the figures mean nothing, but every one is computed and in range.
    figures = check.fidelity_and_localization(sd15_pipe, check.check_prompts(2), num_inference_steps=3, progress=False)
    figures.update(check.spatial_control(sd15_pipe, seeds=1, num_inference_steps=5, max_layouts=1, progress=False))
    for name in ("colors_present", "no_extra_color", "shape_correct", "attention_iou", "none_iou", "mag_iou"):
        assert 0.0 <= figures[name] <= 1.0, name
    assert figures["layouts"] == 1 and figures["images"] == 2


needs_model = pytest.mark.skipif(not (shapes_model_dir() / "model_index.json").exists(),
                                 reason=f"the embedded model is not in {shapes_model_dir()} yet")


@pytest.fixture(scope="module")
def shapes_pipe():
    from mag_explore.models import load_pipeline

    return load_pipeline("shapes", device="cpu")


@needs_model
@pytest.mark.slow
def test_a_small_sample_of_the_embedded_model_meets_honest_thresholds(shapes_pipe):
    # 12 images and 3 layouts × 1 seed: thresholds below the full targets (90 %, 90 %, 75 %,
    # 0.4, +0.3) by about two standard errors of such a small sample, so a healthy model
    # passes and a model that lost its colors, shapes or attention does not. The full check
    # of the shipped model measured 0.92, 1.00, 0.95, 0.81 and +0.39 (64 images, 7 × 2);
    # the model before the grounding loss failed this test (colors 0.42, attention IoU 0.03).
    figures = check.fidelity_and_localization(shapes_pipe, check.check_prompts(12, seed=100), seed=100,
                                              progress=False)
    assert figures["colors_present"] >= 0.75, figures
    assert figures["no_extra_color"] >= 0.75, figures
    assert figures["shape_correct"] >= 0.6, figures
    assert figures["attention_iou"] >= 0.3, figures
    control = check.spatial_control(shapes_pipe, seeds=1, max_layouts=3, progress=False)
    assert control["mag_iou_gain"] >= 0.15, control
