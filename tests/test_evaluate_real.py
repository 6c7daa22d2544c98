"""The built-in real-image segmenters, instance success and CLIP score, on tiny random models.

The tiny Grounding DINO / OWLv2 / SAM / CLIP (mag_explore.testing.vision) are saved to
folders and loaded back the way a hub model is. Their outputs are random, so the glue is
checked on *constructed* outputs: the models' forward is replaced by one that returns
logits, boxes and mask logits written out here (and records what it was given), and the
expected boxes, masks and IoUs are computed by hand in the test.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mag_explore.evaluate import (ClipScorer, DetectSegment, RealImageScorer, box_iou, build_real_scorer, clip_score,
                                  mask_box)
from mag_explore.evaluate.run import Item, score_row
from mag_explore.evaluate.segmenters import grounding_scores, owl_pixels, pick_box
from mag_explore.layouts import Layout, rect
from mag_explore.layouts.suite import SuiteLayout
from mag_explore.testing.vision import tiny_vision_folders

CLIP_MEAN, CLIP_STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_vision_folders(tmp_path_factory.mktemp("tiny-vision"))


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_grounding_scores_and_pick_box_apply_the_thresholds_as_documented():
    # three candidates; token positions 0 [CLS], 1 "red", 2 "car", 3 "."; the phrase is positions 1, 2
    probs = [[0.1, 0.9, 0.2, 0.1],   # "red" only: its noun is under the text threshold -> 0
             [0.1, 0.3, 0.6, 0.1],   # noun 0.6 >= 0.25: score max(0.3, 0.6) = 0.6
             [0.1, 0.5, 0.4, 0.99]]  # noun 0.4: score 0.5 (the "." position is not the phrase's)
    logits = torch.tensor([[logit(p) for p in row] for row in probs])
    scores = grounding_scores(logits, [1, 2], text_threshold=0.25)
    assert scores.tolist() == pytest.approx([0.0, 0.6, 0.5], abs=1e-6)
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.5, 0.25, 0.5, 0.5], [0.9, 0.9, 0.4, 0.4]])
    # candidate 2 wins; (cx, cy, w, h) relative to an 80 x 64 (width x height) image -> pixels
    box, score = pick_box(scores, boxes, (80, 64), (80, 64), threshold=0.35)
    assert box == pytest.approx((20.0, 0.0, 60.0, 32.0)) and score == pytest.approx(0.6)
    box, score = pick_box(scores, boxes, (80, 64), (80, 64), threshold=0.7)  # under the box threshold: not found
    assert box is None and score == pytest.approx(0.6)
    # OWLv2: relative to the padded 80 x 80 square, clipped to the 80 x 64 image
    box, _ = pick_box(torch.tensor([0.2]), torch.tensor([[0.5, 0.75, 0.5, 0.5]]), (80, 80), (80, 64), 0.1)
    assert box == pytest.approx((20.0, 40.0, 60.0, 64.0))


def test_owl_pixels_pad_with_gray_at_the_bottom_right_then_normalise():
    image = np.zeros((2, 4, 3), np.uint8)
    image[:, :, 0] = 255
    pixels = owl_pixels(image, 4)[0].numpy()  # 4 x 4 square: no resize, two gray rows below the image
    red = (np.array([1.0, 0.0, 0.0]) - CLIP_MEAN) / CLIP_STD
    gray = (np.array([0.5, 0.5, 0.5]) - CLIP_MEAN) / CLIP_STD
    assert np.allclose(pixels[:, :2, :], red[:, None, None], atol=1e-5)
    assert np.allclose(pixels[:, 2:, :], gray[:, None, None], atol=1e-5)


def test_box_helpers():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 1:7] = True
    assert mask_box(mask) == (1.0, 2.0, 7.0, 5.0)
    assert box_iou((0, 0, 4, 4), (2, 0, 6, 4)) == pytest.approx(8 / 24)
    assert box_iou(None, (0, 0, 1, 1)) == 0.0


class FakeGroundingDino:
    """Replaces the tiny Grounding DINO's forward: constructed logits per phrase, inputs recorded."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, pixel_values, input_ids, **inputs):
        self.calls.append({"dtype": pixel_values.dtype, "device": pixel_values.device,
                           "text": self.tokenizer.decode(input_ids[0], skip_special_tokens=True)})
        tokens = input_ids.shape[1]  # [CLS] color noun . [SEP]
        logits = torch.full((1, 2, tokens), logit(0.01))
        boxes = torch.tensor([[[0.25, 0.1875, 0.5, 0.375], [0.75, 0.75, 0.5, 0.5]]])
        if "car" in self.calls[-1]["text"]:  # candidate 0: noun 0.8 -> found, box (0, 0, 32, 24) on 64 x 64
            logits[0, 0, 2] = logit(0.8)
        else:  # the dog: the color is sure (0.9), the noun is not (0.2 < text threshold 0.25): not found
            logits[0, 1, 1], logits[0, 1, 2] = logit(0.9), logit(0.2)
        return SimpleNamespace(logits=logits, pred_boxes=boxes)


class FakeSam:
    """Replaces the tiny SAM's forward: for each box a 16 x 16 logit grid, +1 on cells rows 0-5, cols 0-7."""

    def __init__(self):
        self.calls = []

    def __call__(self, pixel_values, input_boxes, multimask_output):
        self.calls.append({"boxes": input_boxes.float().tolist(), "dtype": pixel_values.dtype,
                           "multimask": multimask_output})
        grid = torch.full((1, input_boxes.shape[1], 1, 16, 16), -1.0)
        grid[..., :6, :8] = 1.0
        return SimpleNamespace(pred_masks=grid.to(pixel_values.dtype))


def test_boxes_to_masks_to_per_region_iou_on_a_constructed_case(folders):
    segmenter = DetectSegment("grounded-sam", detector=folders["grounding-dino"], sam=folders["sam"],
                              box_threshold=0.35, text_threshold=0.25)
    segmenter.detector.forward = FakeGroundingDino(segmenter.tokenizer)
    segmenter.sam.forward = FakeSam()
    image = np.full((64, 64, 3), 128, np.uint8)
    layout = Layout.from_shapes(64, 64, [rect("red car", 0, 0, 0.5, 0.5), rect("blue dog", 0.5, 0.5, 1, 1)],
                                prompt="a red car and a blue dog")
    detections = segmenter.detect(image, layout.labels)
    assert [c["text"] for c in segmenter.detector.forward.calls] == ["red car.", "blue dog."]  # one query a phrase
    assert detections[0].box == pytest.approx((0.0, 0.0, 32.0, 24.0)) and detections[0].score == pytest.approx(0.8)
    assert detections[1].box is None and detections[1].score == 0.0  # the noun missed the text threshold
    # SAM gets only the found box, in its 64-pixel frame (the image is 64 x 64: scale 1), one mask per box
    scorer = RealImageScorer(segmenter, clip=None, success_iou=0.5)
    masks, columns = scorer.measure(image, layout)
    assert segmenter.sam.forward.calls[-1]["boxes"] == [[[0.0, 0.0, 32.0, 24.0]]]
    assert segmenter.sam.forward.calls[-1]["multimask"] is False
    # the 16 x 16 grid upsampled 4x (bilinear, half-pixel centres) and cut at 0: output pixel i reads the grid at
    # (i + 0.5) / 4 - 0.5, so an edge between a +1 and a -1 cell falls exactly between pixels 4k-1 and 4k: cells
    # 0-5 x 0-7 -> pixels rows 0-23, cols 0-31, except the inner corner (23, 31), which reads (5.375, 7.375):
    # 0.625 * 0.625 * (+1) + (0.625 * 0.375 + 0.375 * 0.625 + 0.375 * 0.375) * (-1) = -0.21875 < 0
    expected = np.zeros((64, 64), bool)
    expected[:24, :32] = True
    expected[23, 31] = False
    assert np.array_equal(masks[0], expected) and not masks[1].any()
    # by hand: region 1 is 32 x 32 = 1024 pixels, the mask 24 x 32 - 1 = 767 inside it -> IoU 767 / 1024
    row = score_row(Item(0, "L", "none", "default", (), 0), SuiteLayout("L", layout), image, scorer, None, 1.0)
    assert row["iou_1"] == pytest.approx(767 / 1024) and row["iou_2"] == 0.0
    assert row["iou"] == pytest.approx(767 / 2048)
    # box IoU of (0, 0, 32, 24) with the region's (0, 0, 32, 32) is 0.75 >= 0.5: the car succeeds, the dog not
    assert row["box_iou"] == pytest.approx(0.375) and row["instances"] == 0.5 and row["success"] == 0.0
    assert row["clip_score"] == "" and row["iou_3"] == "" and row["fidelity"] == ""


def test_models_follow_the_device_and_dtype_asked_for(folders):
    scorer = build_real_scorer("grounded-sam", detector=folders["grounding-dino"], sam=folders["sam"],
                               clip=folders["clip"], device="cpu", dtype="bfloat16")
    for model in (scorer.segmenter.detector, scorer.segmenter.sam, scorer.clip.model):
        assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")}
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    fake = FakeGroundingDino(scorer.segmenter.tokenizer)
    real_forward = scorer.segmenter.detector.forward
    scorer.segmenter.detector.forward = fake
    scorer.segmenter.detect(image, ["red car"])
    assert fake.calls[0]["dtype"] == torch.bfloat16 and fake.calls[0]["device"].type == "cpu"
    scorer.segmenter.detector.forward = real_forward  # and the real tiny models run through in bfloat16
    masks = scorer.segmenter.masks(image, [(4.0, 4.0, 30.0, 40.0), None])
    assert [m.shape for m in masks] == [(48, 64), (48, 64)] and masks[0].dtype == bool and not masks[1].any()
    assert len(scorer.segmenter(image, ["red car", "blue dog"])) == 2
    assert scorer.describe()["dtype"] == "bfloat16" and scorer.describe()["clip"] == str(folders["clip"])


def test_owl_sam_queries_one_phrase_with_owlv2_s_padded_frame(folders):
    segmenter = DetectSegment("owl-sam", detector=folders["owlv2"], sam=folders["sam"], box_threshold=0.3)
    seen = []

    def fake(input_ids, attention_mask, pixel_values):
        seen.append((input_ids.shape, pixel_values.shape))
        return SimpleNamespace(logits=torch.tensor([[[logit(0.2)], [logit(0.4)]]]),
                               pred_boxes=torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.25, 0.5, 0.5]]]))

    segmenter.detector.forward = fake
    image = np.zeros((40, 80, 3), np.uint8)  # padded to 80 x 80
    (found,) = segmenter.detect(image, ["red car"])
    assert seen == [(torch.Size([1, 16]), torch.Size([1, 3, 64, 64]))]  # 16-token query, 64-pixel input
    assert found.box == pytest.approx((20.0, 0.0, 60.0, 40.0)) and found.score == pytest.approx(0.4)
    assert segmenter.describe()["text_threshold"] is None


def test_clip_score_equals_a_hand_computation_from_the_same_embeddings(folders):
    scorer = ClipScorer(folders["clip"])
    rng = np.random.default_rng(1)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(2)]
    texts = ["a red car and a blue dog", "a green bench"]
    # the image embedding is CLIP's on pixels normalised by hand (32 x 32: no resize, no crop)
    pixels = torch.tensor(np.stack([((i / 255.0) - CLIP_MEAN) / CLIP_STD for i in images]).transpose(0, 3, 1, 2),
                          dtype=torch.float32)
    with torch.no_grad():
        reference = scorer.model.get_image_features(pixel_values=pixels)
    reference = reference if isinstance(reference, torch.Tensor) else reference.pooler_output
    image_emb = scorer.image_embeddings(images).numpy()
    assert np.allclose(image_emb, reference.numpy(), atol=1e-4)
    text_emb = scorer.text_embeddings(texts).numpy()
    cos = (image_emb * text_emb).sum(1) / np.linalg.norm(image_emb, axis=1) / np.linalg.norm(text_emb, axis=1)
    assert scorer.scores(images, texts) == pytest.approx(list(100 * np.maximum(cos, 0)), abs=1e-3)
    # the clamp at 0 and the scale of 100, on embeddings written out
    assert clip_score(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[-1.0, 0.0], [1.0, 1.0]])).tolist() == \
        pytest.approx([0.0, 100 / np.sqrt(2)])


def test_the_attribute_check_ranks_the_phrase_against_the_other_colors(folders):
    scorer = RealImageScorer(SimpleNamespace(), ClipScorer(folders["clip"]))  # no detector needed here
    image = (np.random.default_rng(2).random((40, 40, 3)) * 255).astype(np.uint8)
    from mag_explore.evaluate.segmenters import Detection

    detection = Detection("red car", (0.0, 0.0, 20.0, 30.0), 0.9)
    others = [f"{c} car" for c in ("orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")]
    crop = image[0:30, 0:20]  # the detected box's pixels
    emb_i = scorer.clip.image_embeddings([crop]).numpy()[0]
    emb_t = scorer.clip.text_embeddings(["red car", *others]).numpy()
    cos = emb_t @ emb_i / np.linalg.norm(emb_t, axis=1) / np.linalg.norm(emb_i)
    asked = []
    ranks_first = scorer.clip.ranks_first
    scorer.clip.ranks_first = lambda crop, text, others: asked.append((crop.shape, text, others)) or ranks_first(
        crop, text, others)
    assert scorer.attribute_ok(image, detection) == bool(cos[0] > cos[1:].max())
    assert asked == [((30, 20, 3), "red car", others)]  # the box's crop against the same noun in every other color
    assert scorer.attribute_ok(image, Detection("car", (0.0, 0.0, 20.0, 30.0), 0.9))  # no attribute: nothing to check


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "clipseg"}, "the built-in ones are \\['grounded-sam', 'owl-sam'\\]"),
    ({"box_threshold": 1.5}, "box_threshold 1.5: give a probability between 0 and 1"),
    ({"dtype": "float64"}, "dtype 'float64': use one of"),
])
def test_bad_segmenter_options_are_named(folders, kwargs, message):
    options = {"name": "grounded-sam", "detector": folders["grounding-dino"], "sam": folders["sam"], **kwargs}
    with pytest.raises(ValueError, match=message):
        DetectSegment(options.pop("name"), **options)


def test_a_folder_without_safetensors_weights_is_refused(folders, tmp_path):
    with pytest.raises(ValueError, match="--detector .*cannot load .*safetensors"):
        DetectSegment("grounded-sam", detector=tmp_path, sam=folders["sam"])
    with pytest.raises(ValueError, match="text_threshold 0.2: only grounded-sam has one"):
        DetectSegment("owl-sam", detector=folders["owlv2"], sam=folders["sam"], text_threshold=0.2)
