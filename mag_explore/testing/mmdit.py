"""Tiny random-weight Flux.1 and SD3 pipelines, and the T5 tokenizer they need, built offline.

Same idea as :mod:`mag_explore.testing`: the block structure of the real models (where
the joint attention sits, text first or image first, rotary embeddings or not, which
text encoders feed which input), a few thousand random weights, images of noise.

=================  ==========================  ==========================================
                   Flux.1-like                 SD3-like
=================  ==========================  ==========================================
image (default)    32 x 32 (folder: mag_explore.json)
latent             4 x 8 x 8 (VAE factor 4)    4 x 8 x 8
image tokens       4 x 4 (2x2 packing)         4 x 4 (patch size 2)
attention          1 double-stream block,      2 joint blocks (the last one
                   2 single-stream blocks,     ``context_pre_only``), 2 heads of 8
                   2 heads of 8, rotary (2,2,4)
text keys          T5 only (max 512 tokens)    77 CLIP (two, concatenated, zero-padded
                                               to T5's width) then T5 (max 256)
pooled vector      CLIP (pooler output)        both CLIPs' projections, concatenated
guidance           distilled guidance          classifier-free guidance on [uncond, cond]
                   embedding; true CFG with
                   a negative prompt
scheduler          FlowMatchEuler, dynamic     FlowMatchEuler, shift 3.0
                   shifting (Flux.1-dev's)
=================  ==========================  ==========================================

The T5 tokenizer is a hand-built Unigram model over :data:`TINY_T5_PIECES` with T5's
``▁`` word-start convention (``tokenizers.pre_tokenizers.Metaspace``), ``</s>`` appended
and ``<pad>`` padding, wrapped in ``T5TokenizerFast``: no sentencepiece model file is
needed. "purple" is not a piece: it splits into ``▁pur`` + ``ple``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..models.load import DEFAULTS_FILE, library_output
from .unet import TINY_WORDS, tiny_tokenizer

#: Pieces of the tiny T5 vocabulary besides "▁" + every word of ``TINY_WORDS``: sub-word
#: pieces that make "purple" and "bears" split, and single letters so that any word can be spelled.
TINY_T5_PIECES = ["▁pur", "ple", "s", ",", ".", "▁"] + list("abcdefghijklmnopqrstuvwxyz")
#: Generation defaults written to a saved tiny pipeline's mag_explore.json.
TINY_MMDIT_DEFAULTS = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 32}


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5-style tokenizer (pad 0, EOS 1, unk 2, then ``▁word`` pieces), built in-process."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # Unigram picks the split with the highest total score: whole words (-2) beat sub-word
    # pieces (-3 each), which beat single letters (-8), so known words stay whole.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -2.0) for w in TINY_WORDS]
    vocab += [(p, -3.0 if len(p) > 1 else -8.0) for p in TINY_T5_PIECES if ("▁" + p, -2.0) not in vocab]
    model = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def _t5_encoder(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _clip_encoder(tokenizer, seed: int, width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=width, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(seed: int, scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


def _sharpen(transformer, gain: float = 4.0) -> None:
    """Scale every query and key projection (as the tiny UNets' cross-attention): maps that are not flat."""
    with torch.no_grad():
        for name, module in transformer.named_modules():
            for proj in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                if hasattr(module, proj) and name.endswith("attn"):
                    getattr(module, proj).weight.mul_(gain)


def _finish(pipe, folder):
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        with library_output(verbose=False):
            pipe.save_pretrained(folder, safe_serialization=True)
        (Path(folder) / DEFAULTS_FILE).write_text(json.dumps(TINY_MMDIT_DEFAULTS))
    return pipe


def tiny_flux_pipeline(folder: str | Path | None = None, seed: int = 0, guidance_embeds: bool = True):
    """A tiny random-weight ``FluxPipeline`` with Flux.1-dev's structure (see the table above)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        tokenizer = tiny_tokenizer(Path(folder or scratch) / "tokenizer")
        tokenizer_2 = tiny_t5_tokenizer(512)
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)).eval()
        _sharpen(transformer)
        components = dict(
            transformer=transformer, vae=_vae(seed + 1, 0.3611, 0.1159),
            text_encoder=_clip_encoder(tokenizer, seed + 2, 32, projection=False), tokenizer=tokenizer,
            text_encoder_2=_t5_encoder(tokenizer_2, seed + 3), tokenizer_2=tokenizer_2,
            # Flux.1-dev's scheduler_config.json
            scheduler=FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096))
    return _finish(FluxPipeline(**components), folder)


def tiny_sd3_pipeline(folder: str | Path | None = None, seed: int = 0, with_t5: bool = True,
                      transformer_options: dict | None = None):
    """A tiny random-weight ``StableDiffusion3Pipeline`` (see the table above).

    ``with_t5=False`` leaves out text_encoder_3 and tokenizer_3, as SD3 allows: the T5 part
    of the text keys is then zeros. ``transformer_options`` are extra SD3Transformer2DModel
    arguments: SD3.5 Large is ``qk_norm="rms_norm"``, SD3.5 Medium adds ``dual_attention_layers``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        where = Path(folder or scratch)
        tokenizer, tokenizer_2 = tiny_tokenizer(where / "tokenizer"), tiny_tokenizer(where / "tokenizer_2", "!")
        tokenizer_3 = tiny_t5_tokenizer(256) if with_t5 else None
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
            pos_embed_max_size=8, **(transformer_options or {})).eval()
        _sharpen(transformer)
        components = dict(
            transformer=transformer, vae=_vae(seed + 1, 1.5305, 0.0609),
            # two CLIPs of width 16: concatenated 32 = T5's width, as 768 + 1280 = 2048 < 4096 in SD3
            text_encoder=_clip_encoder(tokenizer, seed + 2, 16, projection=True), tokenizer=tokenizer,
            text_encoder_2=_clip_encoder(tokenizer_2, seed + 3, 16, projection=True), tokenizer_2=tokenizer_2,
            text_encoder_3=_t5_encoder(tokenizer_3, seed + 4) if with_t5 else None, tokenizer_3=tokenizer_3,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))  # SD3 medium's
    return _finish(StableDiffusion3Pipeline(**components), folder)
