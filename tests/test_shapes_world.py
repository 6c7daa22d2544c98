"""The shapes world: scenes are what they claim, and the reading tools read them back.

The evaluation of the embedded model trusts ``segment_by_color``, ``blobs`` and
``classify_shape``; these tests hold them to rendered scenes with known masks,
clean and slightly blurred (generated images are never pixel-perfect).
"""
import numpy as np
import pytest

from mag_explore.layouts import mask_iou
from mag_explore.shapes import (COLORS, SHAPES, blobs, caption_for, classify_shape, make_scene,
                                parse_caption, score_image, segment_by_color)


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(123)
    return [make_scene(rng) for _ in range(150)]


def box_blur(image: np.ndarray) -> np.ndarray:
    """3×3 mean filter: softens edges about as much as the VAE decoder does."""
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    out = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
    return np.round(out).astype(np.uint8)


def test_scene_is_seeded_and_well_formed(scenes):
    again = make_scene(np.random.default_rng(123))
    assert np.array_equal(again.image, scenes[0].image) and again.caption == scenes[0].caption
    for scene in scenes:
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 3
        colors = [o.color for o in scene.objects]
        assert len(set(colors)) == len(colors)  # distinct colors within a scene
        total = np.zeros((64, 64), int)
        for obj in scene.objects:
            assert obj.color in COLORS and obj.shape in SHAPES
            width = np.nonzero(obj.mask.any(0))[0]
            assert 12 <= width.max() - width.min() + 1 <= 31  # objects ~14–30 px wide
            total += obj.mask
        assert total.max() <= 1  # no overlap
        # The caption names exactly the objects drawn (in some order), or nothing.
        if scene.caption:
            assert sorted(parse_caption(scene.caption)) == sorted(
                (o.color, o.shape) for o in scene.objects)


def test_captions_order_and_empty_share():
    assert caption_for([("red", "circle")]) == "a red circle"
    assert caption_for([("red", "circle"), ("blue", "square")]) == "a red circle and a blue square"
    assert (caption_for([("red", "circle"), ("blue", "square"), ("green", "triangle")])
            == "a red circle, a blue square and a green triangle")
    rng = np.random.default_rng(0)
    captions = [make_scene(rng).caption for _ in range(400)]
    assert 0.05 < captions.count("") / len(captions) < 0.15  # ~10 % for CFG
    # Random order: the first-named object is not always the first one drawn.
    firsts = {parse_caption(c)[0][1] for c in captions if c}
    assert firsts == set(SHAPES)


@pytest.mark.parametrize("blur", [False, True])
def test_classify_shape_on_ground_truth_masks(scenes, blur):
    right = total = 0
    for scene in scenes:
        image = box_blur(scene.image) if blur else scene.image
        segments = segment_by_color(image)
        for obj in scene.objects:
            # Clean: the true mask. Blurred: the mask as the evaluation would see it.
            mask = blobs(segments[obj.color])[0] if blur else obj.mask
            right += classify_shape(mask) == obj.shape
            total += 1
    assert right / total >= (0.95 if blur else 0.98)


@pytest.mark.parametrize("blur", [False, True])
def test_segmentation_matches_ground_truth(scenes, blur):
    ious, extra = [], 0
    for scene in scenes:
        image = box_blur(scene.image) if blur else scene.image
        segments = segment_by_color(image)
        for obj in scene.objects:
            ious.append(mask_iou(segments.get(obj.color, np.zeros_like(obj.mask)), obj.mask))
        # Blended edges (red next to blue reads as purple) may leave a few stray pixels,
        # but never a blob big enough (2 % of the image) to count as an object.
        true_caption = caption_for([(o.color, o.shape) for o in scene.objects])
        extra += len(score_image(image, true_caption)["unrequested"])
    assert np.mean(ious) >= 0.9 and np.min(ious) >= 0.7
    assert extra == 0


def test_blobs_separates_components():
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = True  # 9 px
    mask[6:8, 6:9] = True  # 6 px
    mask[0, 9] = True  # 1 px on its own
    mask[4, 4] = True  # touches the first blob only diagonally: a separate blob
    found = blobs(mask)
    assert [int(b.sum()) for b in found] == [9, 6, 1, 1]
    assert not np.logical_and(found[0], found[1]).any()
    assert blobs(np.zeros((5, 5), bool)) == []


def test_score_image_on_a_true_scene_and_a_wrong_caption():
    rng = np.random.default_rng(7)
    scene = make_scene(rng, n_objects=2, empty_caption_prob=0.0)
    good = score_image(scene.image, scene.caption)
    assert good["all_present"] and good["unrequested"] == []
    assert all(o["shape_ok"] for o in good["objects"])
    drawn = {o.color for o in scene.objects}
    missing = next(c for c in COLORS if c not in drawn)
    bad = score_image(scene.image, f"a {missing} circle")
    assert not bad["all_present"] and sorted(bad["unrequested"]) == sorted(drawn)
