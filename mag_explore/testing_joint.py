"""Tiny random-weight Chroma, Qwen-Image, Z-Image and Flux.2 (Klein) pipelines, built offline.

Same idea as :mod:`mag_explore.testing_mmdit`: the block structure of the real models (where
the joint attention sits, text first or image first, which text encoder feeds it and how),
a few thousand random weights, images of noise. Nothing is downloaded: the tokenizers are
built in-process with the ``tokenizers`` library.

=============  =================================  =========================================
family         text keys                          attention
=============  =================================  =========================================
Chroma         T5, padded to 512; mask keeps the  Flux.1-shaped: 1 double-, 2 single-stream
               prompt, ``</s>`` and one pad       blocks, [txt, img], rotary (2, 2, 4)
=============  =================================  =========================================

Random weights attend almost uniformly, so every query and key projection is scaled up
(:func:`sharpen`) to give maps that tests can see an effect in.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mag_explore.testing_mmdit import _finish, _sharpen, _t5_encoder, _vae, tiny_t5_tokenizer

sharpen = _sharpen


def _flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)


def tiny_chroma_pipeline(folder: str | Path | None = None, seed: int = 0):
    """A tiny random-weight ``ChromaPipeline``: Flux.1's blocks, T5 only, no pooled vector, no guidance embedding."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_t5_tokenizer(512)
        torch.manual_seed(seed)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=16,
            approximator_hidden_dim=32, approximator_layers=1).eval()
        _sharpen(transformer)
        components = dict(
            transformer=transformer, vae=_vae(seed + 1, 0.3611, 0.1159),  # Flux.1's VAE factors (Chroma uses it)
            text_encoder=_t5_encoder(tokenizer, seed + 3), tokenizer=tokenizer,
            # Chroma1-HD's scheduler_config.json: Flux.1-dev's
            scheduler=_flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                      base_image_seq_len=256, max_image_seq_len=4096))
    return _finish(ChromaPipeline(**components), folder)
