"""Tiny random-weight PixArt-Σ and Sana pipelines, and the Gemma tokenizer Sana needs, built offline.

Same idea as :mod:`mag_explore.testing.mmdit`: the block structure of the real models (self- and
cross-attention per block, a text mask into cross-attention, resolution bins), a few thousand
random weights, images of noise. The query and key projections of the cross-attention are
scaled up (×4) so that maps are not flat.

=================  ===============================  =======================================
                   PixArt-Σ-like                    Sana-like
=================  ===============================  =======================================
image (default)    256² (sample_size 32: 256 bins)  1024² (the pipeline's fixed default;
                                                    sample_size 32: 1024 bins)
latent             4 × 32 × 32 (VAE factor 8)       4 × 32 × 32 (DC-AE factor 32)
image tokens       16 × 16 (2×2 patches)            32 × 32 (patch 1)
blocks             2: self-attn, cross-attn         2: linear self-attn, cross-attn
                   (2 heads of 8)                   (2 heads of 8)
text               T5 (2 layers), 300 keys, mask    Gemma-2 (2 layers), instruction + prompt
                                                    then <bos> + last 299 kept, mask
scheduler          DPM-Solver++ (PixArt-Σ's)        DPM-Solver++ with flow sigmas (Sana's)
=================  ===============================  =======================================

The Gemma tokenizer is a hand-built BPE (``GemmaTokenizer`` as transformers 5 builds it: a space
becomes ``▁``, ``<bos>`` prepended, ``<pad>`` = 0 padding) whose merges spell the tiny words and the
words of Sana's default instruction, so that the instruction is ~200 tokens, not thousands of
letters. "purple" has no merges of its own: it splits into ``▁pur`` + ``ple``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.load import DEFAULTS_FILE, library_output
from .mmdit import _t5_encoder, tiny_t5_tokenizer

#: Gain on the cross-attention's q/k projections: sharper maps than random weights give.
QK_GAIN = 4.0


def _sharpen_cross_attention(transformer, gain: float = QK_GAIN) -> None:
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(gain)
                module.to_k.weight.mul_(gain)


def _finish(pipe, folder, defaults: dict | None = None):
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        with library_output(verbose=False):
            pipe.save_pretrained(folder, safe_serialization=True)
        if defaults:
            (Path(folder) / DEFAULTS_FILE).write_text(json.dumps(defaults))
    return pipe


def pixart_scheduler():
    """PixArt-Σ's scheduler_config.json: DPM-Solver++ (order 2) on the linear DDPM betas."""
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                       prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++",
                                       lower_order_final=True, timestep_spacing="linspace", steps_offset=0)


def tiny_pixart_pipeline(folder: str | Path | None = None, seed: int = 0, defaults: dict | None = None):
    """A tiny random-weight ``PixArtSigmaPipeline`` (see the table above); ``defaults`` go to mag_explore.json."""
    from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_t5_tokenizer(300)
        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(
            sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
            caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False).eval()
        _sharpen_cross_attention(transformer)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=256,
                            scaling_factor=0.13025).eval()
        pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer, seed + 2),
                                   transformer=transformer, vae=vae, scheduler=pixart_scheduler())
    return _finish(pipe, folder, defaults)


# ---------------------------------------------------------------------- Sana
def _instruction_words() -> list[str]:
    """The words and marks of SanaPipeline's default complex human instruction, as the tiny vocabulary's pieces."""
    import inspect
    import re

    from diffusers import SanaPipeline

    text = "\n".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
    return sorted(set(re.findall(r"[A-Za-z]+|[^\sA-Za-z]", text)))


def _merge_chain(piece: str, vocab: dict, merges: list) -> None:
    """BPE merges that build ``piece`` left to right (▁r, ▁re, ▁red), adding each product to ``vocab``."""
    built = piece[0]
    for char in piece[1:]:
        if built + char not in vocab:
            merges.append((built, char))
            vocab[built + char] = len(vocab)
        built += char


def tiny_gemma_tokenizer():
    """A Gemma-style BPE tokenizer (``GemmaTokenizer`` as transformers builds it: spaces become ``▁``,
    no pre-tokenizer, ``<bos>`` first, ``<pad>`` = 0) over the tiny words and the instruction's words.

    Every ``▁word`` chain of merges ranks before every bare-word chain, so a word after a space is
    built whole before a bare chain could take its letters; "purple" has no chain of its own and
    splits into ``▁pur`` + ``ple``.
    """
    import string

    from transformers import GemmaTokenizer

    from .unet import TINY_WORDS

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for char in "▁\n" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    words = sorted(set(TINY_WORDS) | set(_instruction_words()))
    merges: list[tuple[str, str]] = []
    for piece in ["▁" + w for w in words] + ["▁pur"]:
        _merge_chain(piece, vocab, merges)
    for piece in ["ple"] + [w for w in words if len(w) > 1]:
        _merge_chain(piece, vocab, merges)
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=2048, add_bos_token=True, add_eos_token=False)


def _gemma2(tokenizer, seed: int):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma2Model(config).eval()


def sana_scheduler():
    """Sana 1600M's scheduler_config.json: DPM-Solver++ on flow sigmas, shift 3."""
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                       solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True,
                                       final_sigmas_type="zero", timestep_spacing="linspace")


def tiny_sana_pipeline(folder: str | Path | None = None, seed: int = 0, defaults: dict | None = None,
                       transformer_options: dict | None = None):
    """A tiny random-weight ``SanaPipeline`` (see the table above); ``defaults`` go to mag_explore.json;
    ``transformer_options``: extra SanaTransformer2DModel arguments (Sana 1.5: ``qk_norm="rms_norm_across_heads"``)."""
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_gemma_tokenizer()
        torch.manual_seed(seed)
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
            sample_size=32, patch_size=1, **(transformer_options or {})).eval()
        _sharpen_cross_attention(transformer)
        torch.manual_seed(seed + 1)
        levels = 6  # the VAE factor is 2 ** (levels - 1) = 32, as Sana's DC-AE
        vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                            encoder_block_types=("ResBlock",) * levels, decoder_block_types=("ResBlock",) * levels,
                            encoder_block_out_channels=(4,) * levels, decoder_block_out_channels=(4,) * levels,
                            encoder_layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * levels,
                            encoder_qkv_multiscales=((),) * levels, decoder_qkv_multiscales=((),) * levels,
                            downsample_block_type="conv", upsample_block_type="interpolate",
                            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()
        pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=_gemma2(tokenizer, seed + 2), transformer=transformer,
                            vae=vae, scheduler=sana_scheduler())
    return _finish(pipe, folder, defaults)
