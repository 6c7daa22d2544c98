"""Scoring a real image against its layout: masks, instance success, CLIP scores.

What ``evaluate`` runs for ``--segmenter grounded-sam`` / ``owl-sam``. Per image it adds
these columns to results.csv (besides the per-region mask IoU of SAM's masks):

* ``instances``: the fraction of the layout's regions whose instance succeeded, and
  ``success``: 1 when every one did (the image's flag). An instance succeeds when
  (a) the detector found its phrase (``segmenters``: box and text thresholds),
  (b) the detected box overlaps the region's box with IoU >= ``success_iou`` (0.5, as
      COCO-MIG's instance success), and
  (c) where the phrase starts with an attribute word (``real_suite.COLOR_WORDS``), CLIP
      ranks the crop of the detected box closer to the phrase ("red car") than to the
      same noun with each other attribute ("orange car", "yellow car", ...). The
      detector's query already holds the attribute, but detectors are weak on colors.
* ``box_iou``: the mean over regions of the IoU between the detected box (none: 0) and
  the region's box, the box mIoU of MIG_Bench.
* ``clip_score``: the CLIP score of the image against the prompt, and ``clip_regions``:
  the mean over regions of the CLIP score of the crop of the region's box against its phrase.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .clip_score import ClipScorer, crop
from .real_suite import COLOR_WORDS
from .segmenters import SEGMENTER_DETECTORS, Box, Detection, DetectSegment

REAL_COLUMNS = ["success", "instances", "box_iou", "clip_score", "clip_regions"]


def mask_box(mask: np.ndarray) -> Box:
    """The box (x0, y0, x1, y1) in pixels around a mask's pixels (x1, y1 one past the last)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        raise ValueError("an empty region has no box")
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def box_iou(a: Box | None, b: Box | None) -> float:
    """Intersection over union of two boxes (0 if either is missing or both are empty)."""
    if a is None or b is None:
        return 0.0
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


class RealImageScorer:
    """Masks for the IoU (``scorer(image, phrases)``, the segmenter protocol) and the columns above."""

    def __init__(self, segmenter: DetectSegment, clip: ClipScorer | None = None, *, success_iou: float = 0.5,
                 attributes: Sequence[str] = COLOR_WORDS):
        if not 0 < success_iou <= 1:
            raise ValueError(f"success_iou {success_iou!r}: give a number in (0, 1]")
        self.segmenter, self.clip = segmenter, clip
        self.success_iou, self.attributes = float(success_iou), tuple(attributes)

    def __call__(self, image: np.ndarray, phrases: Sequence[str]) -> list[np.ndarray]:
        return self.segmenter(image, phrases)

    def describe(self) -> dict:
        return {**self.segmenter.describe(), "clip": self.clip.name if self.clip else None,
                "success_iou": self.success_iou, "attributes": list(self.attributes)}

    def attribute_ok(self, image: np.ndarray, detection: Detection) -> bool:
        """CLIP prefers the phrase to the same noun with every other attribute (True: no attribute, or no CLIP)."""
        words = detection.phrase.split()
        if self.clip is None or len(words) < 2 or words[0].lower() not in self.attributes:
            return True
        others = [" ".join([a, *words[1:]]) for a in self.attributes if a != words[0].lower()]
        return self.clip.ranks_first(crop(image, detection.box), detection.phrase, others)

    def measure(self, image: np.ndarray, layout) -> tuple[list[np.ndarray], dict]:
        """(one mask per region, the columns of the module's list) for ``image`` generated for ``layout``."""
        phrases = layout.labels
        detections = self.segmenter.detect(image, phrases)
        masks = self.segmenter.masks(image, [d.box for d in detections])
        targets = [mask_box(region.mask) for region in layout.regions]
        ious = [box_iou(d.box, t) for d, t in zip(detections, targets)]
        ok = [d.box is not None and iou >= self.success_iou and self.attribute_ok(image, d)
              for d, iou in zip(detections, ious)]
        columns = {"success": float(all(ok)), "instances": float(np.mean(ok)), "box_iou": float(np.mean(ious))}
        if self.clip is not None:
            columns["clip_score"] = self.clip.scores([image], [layout.prompt])[0]
            columns["clip_regions"] = float(np.mean(self.clip.scores([crop(image, t) for t in targets], phrases)))
        return masks, columns


def build_real_scorer(name: str, *, detector: str | None = None, sam: str | None = None, clip: str | None = None,
                      box_threshold: float | None = None, text_threshold: float | None = None,
                      mask_threshold: float = 0.0, success_iou: float = 0.5, device="cpu",
                      dtype="float32") -> RealImageScorer:
    """``--segmenter grounded-sam`` (or ``owl-sam``) with its models and thresholds, and the CLIP scorer."""
    if name not in SEGMENTER_DETECTORS:
        raise ValueError(f"--segmenter {name!r}: the built-in ones are {list(SEGMENTER_DETECTORS)}")
    segmenter = DetectSegment(name, detector=detector, sam=sam, box_threshold=box_threshold,
                              text_threshold=text_threshold, mask_threshold=mask_threshold, device=device, dtype=dtype)
    return RealImageScorer(segmenter, ClipScorer(clip, device=device, dtype=dtype), success_iou=success_iou)
