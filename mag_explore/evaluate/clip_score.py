"""Text fidelity of real images: the CLIP score of an image (or a crop of it) against a text.

CLIP score as torchmetrics and the layout papers report it: ``100 · max(cos(E_image, E_text), 0)``
with the embeddings of ``CLIPModel.get_image_features`` / ``get_text_features``. The image
goes through the checkpoint's own ``CLIPImageProcessorPil`` (resize the short side, centre
crop, normalise); texts are cut at the model's 77 tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .segmenters import Box, load_model, load_pretrained, pil_processor, resolve_dtype

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ClipScorer:
    """CLIP score of images against texts, on ``device`` in ``dtype``; ``name`` is what run.json records."""

    def __init__(self, model: str | None = None, *, device: str | torch.device = "cpu", dtype="float32"):
        from transformers import AutoTokenizer, CLIPModel
        from transformers.models import clip

        self.name = str(model or DEFAULT_CLIP)
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self.model = load_model(CLIPModel, self.name, "--clip", self.device, self.dtype)
        self.processor = load_pretrained(pil_processor(clip, "CLIPImageProcessor"), self.name, "--clip")
        self.tokenizer = load_pretrained(AutoTokenizer, self.name, "--clip")

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) float32 embeddings (not normalised) of H×W×3 uint8 images."""
        from PIL import Image

        pixels = self.processor([Image.fromarray(np.asarray(i)) for i in images], return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return _tensor(features).float().cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 embeddings (not normalised) of the texts."""
        length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=length, return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                attention_mask=tokens["attention_mask"].to(self.device))
        return _tensor(features).float().cpu()

    def scores(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> list[float]:
        """The CLIP score of each image against the text beside it (same length)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts: give one text per image")
        if not images:
            return []
        return clip_score(self.image_embeddings(images), self.text_embeddings(texts)).tolist()

    def ranks_first(self, image: np.ndarray, text: str, others: Sequence[str]) -> bool:
        """Whether ``image`` matches ``text`` better than every one of ``others`` (True if none)."""
        if not others:
            return True
        image_emb = self.image_embeddings([image])
        similarity = torch.nn.functional.cosine_similarity(image_emb, self.text_embeddings([text, *others]))
        return bool(similarity[0] > similarity[1:].max())


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """``100 · max(cos, 0)`` row by row."""
    return 100 * torch.nn.functional.cosine_similarity(image_embeddings, text_embeddings, dim=-1).clamp(min=0)


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of ``box`` (x0, y0, x1, y1; at least one pixel each way)."""
    height, width = image.shape[:2]
    x0, y0 = min(int(box[0]), width - 1), min(int(box[1]), height - 1)
    x1, y1 = max(int(np.ceil(box[2])), x0 + 1), max(int(np.ceil(box[3])), y0 + 1)
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def _tensor(features) -> torch.Tensor:
    # transformers 5 may hand back an output object whose pooled embedding is the projection
    return features if isinstance(features, torch.Tensor) else features.pooler_output
