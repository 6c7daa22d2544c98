"""Tiny random Grounding DINO, OWLv2, SAM and CLIP models, built offline from configs.

The real checkpoints (Grounding DINO tiny 172 M parameters, SAM ViT-B 94 M, CLIP ViT-L 428 M)
come from the hub; the tests of the built-in segmenter and the CLIP score instead save
these (a few tens of thousands of weights each, their processors shrunk to 32-96 px) to
local folders with ``save_pretrained`` and load them back through the same path a real
model takes. Their outputs are random; the tests check the glue, not the quality.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..text.bpe import build_clip_tokenizer


def _suite_words() -> list[str]:
    """Every word of the shipped real-world suite's prompts: one token each in the tiny tokenizers."""
    suite = Path(__file__).resolve().parent.parent / "data" / "suites" / "real.json"  # the shipped one, not $MAG_EXPLORE_DATA's
    layouts = json.loads(suite.read_text())["layouts"]
    return sorted({w.strip(",") for entry in layouts for w in entry["prompt"].split()})


WORDS = sorted({"a", "and", "photo", "of", *_suite_words()})


def _bert_tokenizer():
    """A WordPiece tokenizer over ``WORDS`` (Grounding DINO's text side is BERT)."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
    return BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})


def _special_ids(tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def tiny_grounding_dino(folder: str | Path, seed: int = 0):
    """A ``GroundingDinoForObjectDetection`` (Swin 2 stages, 10 queries) with its tokenizer and processor."""
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    folder = Path(folder)
    tokenizer = _bert_tokenizer()
    torch.manual_seed(seed)
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                      out_features=["stage1", "stage2"])
    bert = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=32, encoder_layers=1,
                                 decoder_layers=2,  # the box heads of layers 1.. are tied to layer 0's: needs 2
                                 encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=10, num_feature_levels=2, encoder_n_points=2,
                                 decoder_n_points=2, max_text_len=32)
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return model


def _clip_like(folder: str | Path, seed: int, model_class, config_class, max_length: int, image_size: int,
               patch_size: int, projection_dim: int):
    """A CLIP-shaped model (OWLv2, CLIP: one layer of width 32, two heads per tower) saved in ``folder``
    with its CLIP tokenizer of ``max_length`` tokens."""
    folder = Path(folder)
    tokenizer = build_clip_tokenizer(WORDS, folder / "tokenizer-files", max_length=max_length)
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = config_class(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=max_length,
                                           **_special_ids(tokenizer), **tower),
                          vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
                          projection_dim=projection_dim)
    model = model_class(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def tiny_owlv2(folder: str | Path, seed: int = 0):
    """An ``Owlv2ForObjectDetection`` (64² images, 16 patches, 16-token queries) with its CLIP tokenizer."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    return _clip_like(folder, seed, Owlv2ForObjectDetection, Owlv2Config, max_length=16, image_size=64, patch_size=16,
                      projection_dim=32)


def tiny_sam(folder: str | Path, seed: int = 0):
    """A ``SamModel`` for 64² inputs (16² patches, 16² low-resolution masks) with its processor."""
    from transformers import SamConfig, SamModel
    from transformers.models.sam import SamImageProcessorPil

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16,
                  output_channels=16, mlp_dim=32, global_attn_indexes=[0], window_size=2, num_pos_feats=8)
    config = SamConfig(vision_config=vision,
                       prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
                       mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                                iou_head_hidden_dim=16))
    model = SamModel(config).eval()
    model.save_pretrained(folder)
    SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(folder)
    return model


def tiny_clip(folder: str | Path, seed: int = 0):
    """A ``CLIPModel`` for 32² images (patches of 8, embeddings of 16) with its tokenizer and processor."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip import CLIPImageProcessorPil

    model = _clip_like(folder, seed, CLIPModel, CLIPConfig, max_length=77, image_size=32, patch_size=8, projection_dim=16)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


def tiny_vision_folders(root: str | Path) -> dict[str, Path]:
    """Every tiny model saved under ``root``: {"grounding-dino", "owlv2", "sam", "clip"} -> folder."""
    root = Path(root)
    builders = {"grounding-dino": tiny_grounding_dino, "owlv2": tiny_owlv2, "sam": tiny_sam, "clip": tiny_clip}
    for name, build in builders.items():
        build(root / name)
    return {name: root / name for name in builders}
