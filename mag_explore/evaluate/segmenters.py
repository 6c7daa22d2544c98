"""Open-vocabulary segmenters for real images: text-prompted boxes, refined to masks by SAM.

    --segmenter grounded-sam   Grounding DINO finds each phrase's box, SAM turns it into a mask
    --segmenter owl-sam        the same with OWLv2 as the detector

This is the recipe of MIG_Bench (COCO-MIG) and Grounded-SAM, through transformers: the
models load from the hub or a local folder (``save_pretrained``), safetensors only and
never with remote code, on the run's device and in the dtype asked for.

How a phrase becomes a mask (what the tests check on constructed outputs):

1. The detector is asked for *one phrase at a time* (Grounding DINO: ``"red car."``,
   lower case with the period it was trained with; OWLv2: the query ``"red car"``), so a
   box answers exactly one phrase and phrases never compete for a box.
2. Each candidate box gets a score. Grounding DINO: the largest sigmoid probability over
   the phrase's tokens (as its own post-processing), and the candidate only counts if the
   probability on the phrase's *last* token (the noun) is at least ``text_threshold`` -
   so "red" alone does not make a car. OWLv2: the sigmoid of its one query logit.
3. The phrase's box is the best-scoring candidate if that score is at least
   ``box_threshold``; otherwise the phrase is not found and its mask is empty.
4. SAM gets every found box of the image at once (one image encoding) and returns one
   mask per box (``multimask_output=False``), upscaled to the image and cut at
   ``mask_threshold`` on its logits (SAM's own 0.0 by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

#: segmenter name -> its detector; every one of them refines boxes with SAM
SEGMENTER_DETECTORS = {"grounded-sam": "grounding-dino", "owl-sam": "owlv2"}
DEFAULT_MODELS = {"grounding-dino": "IDEA-Research/grounding-dino-tiny",
                  "owlv2": "google/owlv2-base-patch16-ensemble", "sam": "facebook/sam-vit-base"}
#: (box_threshold, text_threshold): Grounded-SAM's demo values, and OWLv2's post-processing default
DEFAULT_THRESHOLDS = {"grounding-dino": (0.35, 0.25), "owlv2": (0.1, None)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# OWLv2 normalises with CLIP's statistics (its image processor's defaults)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the image


@dataclass(frozen=True)
class Detection:
    """What the detector made of one phrase: its box (None: not found) and the best score seen."""

    phrase: str
    box: Box | None
    score: float


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {list(DTYPES)}")
    return DTYPES[dtype]


def load_pretrained(cls, name: str, what: str, **kwargs):
    """A transformers model or processor from the hub or a local folder; safetensors weights only."""
    try:
        return cls.from_pretrained(str(name), **kwargs)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{what} {str(name)!r}: cannot load a {cls.__name__} from it ({first}); give a hub name "
                         f"or a local folder written by save_pretrained, with safetensors weights") from None


def load_model(cls, name: str, what: str, device, dtype):
    # cast after loading: the keyword for the dtype changed across transformers versions (torch_dtype -> dtype)
    model = load_pretrained(cls, name, what, use_safetensors=True, trust_remote_code=False)
    return model.to(device=device, dtype=dtype).eval()


def pil_processor(module, name: str):
    """transformers 5's ``<name>Pil`` image processor (no torchvision needed), else 4.x's ``<name>`` (PIL-based)."""
    return getattr(module, f"{name}Pil", None) or getattr(module, name)


def pick_box(scores: torch.Tensor, boxes: torch.Tensor, reference: tuple[float, float],
             image_size: tuple[int, int], threshold: float) -> tuple[Box | None, float]:
    """The best candidate's box in pixels if its score reaches ``threshold``, and that score.

    ``boxes`` are (cx, cy, w, h) relative to ``reference`` = (width, height) in pixels (the
    image itself for Grounding DINO, the padded square for OWLv2); the box is clipped to
    ``image_size`` = (width, height).
    """
    if scores.numel() == 0:
        return None, 0.0
    best = int(scores.argmax())
    score = float(scores[best])
    if score < threshold:
        return None, score
    cx, cy, w, h = (float(v) for v in boxes[best])
    (rw, rh), (width, height) = reference, image_size
    x0, x1 = np.clip([(cx - w / 2) * rw, (cx + w / 2) * rw], 0, width)
    y0, y1 = np.clip([(cy - h / 2) * rh, (cy + h / 2) * rh], 0, height)
    return (float(x0), float(y0), float(x1), float(y1)), score


def grounding_scores(logits: torch.Tensor, phrase_positions: Sequence[int], text_threshold: float) -> torch.Tensor:
    """Per candidate: max probability over the phrase's tokens, 0 where the noun's is under ``text_threshold``."""
    probs = logits.float().sigmoid()[:, list(phrase_positions)]  # (candidates, phrase tokens)
    return torch.where(probs[:, -1] >= text_threshold, probs.max(-1).values, torch.zeros(()))


class DetectSegment:
    """``segmenter(image, phrases) -> masks`` from an open-vocabulary detector and SAM (see the module)."""

    def __init__(self, name: str = "grounded-sam", *, detector: str | None = None, sam: str | None = None,
                 box_threshold: float | None = None, text_threshold: float | None = None,
                 mask_threshold: float = 0.0, device: str | torch.device = "cpu", dtype="float32"):
        if name not in SEGMENTER_DETECTORS:
            raise ValueError(f"segmenter {name!r}: the built-in ones are {list(SEGMENTER_DETECTORS)} "
                             f"(or give your own as package.module:function)")
        self.name, self.kind = name, SEGMENTER_DETECTORS[name]
        boxes, text = DEFAULT_THRESHOLDS[self.kind]
        self.box_threshold = _threshold("box_threshold", box_threshold, boxes)
        self.text_threshold = _threshold("text_threshold", text_threshold, text) if self.kind == "grounding-dino" else None
        if text_threshold is not None and self.kind != "grounding-dino":
            raise ValueError(f"text_threshold {text_threshold}: only grounded-sam has one (OWLv2 scores a whole query)")
        self.mask_threshold = float(mask_threshold)
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self.detector_name = str(detector or DEFAULT_MODELS[self.kind])
        self.sam_name = str(sam or DEFAULT_MODELS["sam"])
        self._load()

    def _load(self) -> None:
        from transformers import (AutoTokenizer, GroundingDinoForObjectDetection, Owlv2ForObjectDetection,
                                  SamModel)
        from transformers.models import grounding_dino, sam

        cls = GroundingDinoForObjectDetection if self.kind == "grounding-dino" else Owlv2ForObjectDetection
        self.detector = load_model(cls, self.detector_name, "--detector", self.device, self.dtype)
        self.tokenizer = load_pretrained(AutoTokenizer, self.detector_name, "--detector")
        processor = pil_processor(grounding_dino, "GroundingDinoImageProcessor")
        self.detector_processor = (load_pretrained(processor, self.detector_name, "--detector")
                                   if self.kind == "grounding-dino" else None)  # OWLv2's needs scipy: see owl_pixels
        self.sam = load_model(SamModel, self.sam_name, "--sam", self.device, self.dtype)
        self.sam_processor = load_pretrained(pil_processor(sam, "SamImageProcessor"), self.sam_name, "--sam")

    def describe(self) -> dict:
        """What run.json records: names, models, thresholds, dtype."""
        return {"name": self.name, "detector": self.detector_name, "sam": self.sam_name,
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold,
                "mask_threshold": self.mask_threshold, "dtype": str(self.dtype).removeprefix("torch.")}

    # ------------------------------------------------------------------ detection
    @torch.no_grad()
    def detect(self, image: np.ndarray, phrases: Sequence[str]) -> list[Detection]:
        """One detection per phrase (box None where the phrase is not found)."""
        from PIL import Image

        image = _check_image(image)
        pil = Image.fromarray(image)
        if self.kind == "grounding-dino":
            pixels = self.detector_processor(pil, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in pixels.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            return [self._detect_grounding(inputs, phrase, pil.size) for phrase in phrases]
        pixels = owl_pixels(image, self.detector.config.vision_config.image_size).to(self.device, self.dtype)
        return [self._detect_owl(pixels, phrase, pil.size) for phrase in phrases]

    def _detect_grounding(self, inputs: dict, phrase: str, size: tuple[int, int]) -> Detection:
        text = self.tokenizer(phrase.lower().strip() + ".", return_tensors="pt")
        ids = text["input_ids"][0].tolist()
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.convert_tokens_to_ids(["."]))
        positions = [i for i, t in enumerate(ids) if t not in special]  # the phrase's own tokens
        if not positions:
            raise ValueError(f"phrase {phrase!r} has no tokens for the detector")
        out = self.detector(**inputs, **{k: v.to(self.device) for k, v in text.items()})
        scores = grounding_scores(out.logits[0], positions, self.text_threshold)
        box, score = pick_box(scores, out.pred_boxes[0].float(), size, size, self.box_threshold)
        return Detection(phrase, box, score)

    def _detect_owl(self, pixels: torch.Tensor, phrase: str, size: tuple[int, int]) -> Detection:
        length = self.detector.config.text_config.max_position_embeddings
        text = self.tokenizer([phrase], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        out = self.detector(input_ids=text["input_ids"].to(self.device),
                            attention_mask=text["attention_mask"].to(self.device), pixel_values=pixels)
        side = max(size)  # OWLv2's boxes are relative to the image padded to a square at the bottom right
        box, score = pick_box(out.logits[0, :, 0].float().sigmoid(), out.pred_boxes[0].float(), (side, side), size,
                              self.box_threshold)
        return Detection(phrase, box, score)

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def masks(self, image: np.ndarray, boxes: Sequence[Box | None]) -> list[np.ndarray]:
        """SAM's mask for each box (all boxes in one call); an empty mask where the box is None."""
        from PIL import Image

        image = _check_image(image)
        height, width = image.shape[:2]
        masks = [np.zeros((height, width), bool) for _ in boxes]
        found = [i for i, b in enumerate(boxes) if b is not None]
        if not found:
            return masks
        inputs = self.sam_processor(Image.fromarray(image), return_tensors="pt")
        (h0, w0), (h1, w1) = inputs["original_sizes"][0].tolist(), inputs["reshaped_input_sizes"][0].tolist()
        scale = torch.tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0])  # boxes go to SAM's resized frame
        prompt = torch.tensor([[boxes[i] for i in found]], dtype=torch.float32) * scale
        out = self.sam(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                       input_boxes=prompt.to(self.device, self.dtype), multimask_output=False)
        full = self.sam_processor.post_process_masks(
            [out.pred_masks[0].float().cpu()], inputs["original_sizes"], inputs["reshaped_input_sizes"],
            mask_threshold=self.mask_threshold)[0]  # (boxes, 1, height, width) bool
        for k, i in enumerate(found):
            masks[i] = full[k, 0].numpy().astype(bool)
        return masks

    def __call__(self, image: np.ndarray, phrases: Sequence[str]) -> list[np.ndarray]:
        return self.masks(image, [d.box for d in self.detect(image, phrases)])


def owl_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """OWLv2's input: the image in [0, 1], padded to a square with 0.5 gray at the bottom
    and right, resized to ``size`` (bilinear with antialiasing; the library's processor
    blurs with scipy first, which is not installed here), then normalised with CLIP's
    statistics. Returns (1, 3, size, size) float32."""
    x = torch.from_numpy(_check_image(image)).permute(2, 0, 1).float() / 255
    side = max(x.shape[1:])
    square = torch.full((3, side, side), 0.5)
    square[:, : x.shape[1], : x.shape[2]] = x
    resized = torch.nn.functional.interpolate(square[None], size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (resized - mean) / std


def _threshold(name: str, value, default) -> float:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} {value!r}: give a probability between 0 and 1")
    return float(value)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"an image of shape {image.shape} and dtype {image.dtype}: give H×W×3 uint8 RGB")
    return image
