"""Tiny random-weight Stable Diffusion pipelines, built offline in well under a second.

The real SD1.5 / SD2.1 weights are gigabytes and need the internet. The tests, the
benchmarks and the quick notebook demos instead use pipelines with the *same block
structure* (where the cross-attention layers sit, how their heads are laid out, how
the text is tokenized and encoded) but only ~1.6 million random weights (SD1.5:
~1 billion).
Their images are noise, but every code path that touches cross-attention is
exercised exactly as with the real models.

=================  ===========================  ===============================
                   SD1.5-like                   SD2.1-like
=================  ===========================  ===============================
image (default)    64 x 64                      96 x 96 (SD2.1: 768 vs SD1.5 512)
latent             8 x 8 x 4                    12 x 12 x 4
cross-attention    8x8, 4x4 (down, up),         12x12, 6x6 (down, up),
grids              2x2 (mid)                    3x3 (mid)
channels           32, 64, 64                   32, 64, 64
heads              4 everywhere, head dim       2, 4, 4 heads, head dim 16
                   8, 16, 16 (SD1.5: 8 heads,   everywhere (SD2: 5/10/20 heads
                   dim 40/80/160)               of dim 64)
transformer proj   1x1 conv                     linear (``use_linear_projection``)
text encoder       CLIP, 2 layers, width 32,    same, GELU (OpenCLIP) ;
                   quick-GELU (as CLIP ViT-L)   padding token "!" as in SD2
prediction         epsilon                      v_prediction, upcast_attention
=================  ===========================  ===============================

Both have seven cross-attention (``attn2``) layers: one per down block with
attention, one in the mid block and two per up block with attention, as in SD
(which has 6 + 1 + 9 = 16 of them).

:func:`tiny_sdxl_pipeline` is a ``StableDiffusionXLPipeline`` with SDXL base's structure:
no attention in the first (finest) block, cross-attention at 1/2 and 1/4 of the latent
only, several transformer blocks per attention at the coarse level (SDXL: 1, 2, 10 per
down level; here 1, 1, 2), so most layers sit at the coarse resolution (SDXL: 60 of 70 at
32², 10 at 64²; here 8 of 11 at 4², 3 at 8², for 128² images). Two CLIP text encoders
(quick-GELU width 32, then GELU width 64 with a 32-wide projection: ViT-L, then OpenCLIP
bigG), keys of width 32 + 64 = 96, the "text_time" added conditioning, pad token "!" in
the second tokenizer, an EulerDiscreteScheduler with SDXL's config (the sampler turns it
into DDIM), and a VAE with SDXL's scaling factor 0.13025 and ``force_upcast``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..text.bpe import build_clip_tokenizer
from ..models.load import library_output

#: Words that are single tokens in the tiny vocabulary. A word that is *not* here
#: ("purple", "astronaut", "bears") is split into several sub-word tokens, exactly
#: like a rare word in the real CLIP vocabulary; tests rely on that.
TINY_WORDS: list[str] = [
    # function words
    "a", "an", "the", "and", "on", "in", "of", "with", "to", "at", "next", "is",
    "above", "below", "under", "behind", "near",
    # colours (no "purple": it must split)
    "red", "green", "blue", "yellow", "orange", "black", "white", "pink", "brown", "gray",
    # shapes
    "circle", "square", "triangle", "star", "ball", "box",
    # things
    "cat", "dog", "teddy", "bear", "car", "tree", "house", "table", "bowl", "apple",
    "man", "woman", "horse", "bird", "flower", "sky", "grass", "beach",
    # sizes, places, styles
    "big", "small", "large", "tiny", "left", "right", "top", "bottom", "middle", "center",
    "photo", "picture", "painting", "drawing", "sitting", "standing",
    # negative prompts
    "low", "quality", "blurry", "bad", "ugly",
]

#: Where each tiny pipeline's cross-attention lives, for tests to compare with.
#: (height, width) of the latent at each attention layer for the default image size.
SD15_ATTENTION_GRIDS = ((8, 8), (4, 4), (2, 2))
SD21_ATTENTION_GRIDS = ((12, 12), (6, 6), (3, 3))
SDXL_ATTENTION_GRIDS = ((8, 8), (4, 4))
#: Cross-attention layers of the tiny SDXL per resolution (SDXL base at 1024²: 10 at 64², 60 at 32²).
SDXL_LAYERS_PER_GRID = {(8, 8): 3, (4, 4): 8}

# With the default random init the cross-attention logits q.k/sqrt(d) are tiny, so
# every map is nearly uniform: the largest of the 77 token probabilities at a pixel
# is ~0.019 on average (uniform: 0.013). Uniform maps would hide bugs -- a wrong
# token index or a transposed map looks just the same -- so the query and key
# projections of the cross-attention layers are scaled up. The logits grow with the
# square of the gain; with 4 the largest probability is ~0.2-0.4 and each token's map
# varies over the image (std ~0.07 per pixel vs ~0.004 unscaled), as measured in
# tests/test_models.py::test_cross_attention_maps_are_not_flat.
_CROSS_ATTENTION_QK_GAIN = 4.0


def tiny_tokenizer(folder: str | Path, pad_token: str | None = None):
    """A CLIP-style BPE tokenizer over :data:`TINY_WORDS` (77 tokens, as in SD).

    ``vocab.json`` and ``merges.txt`` are written into ``folder``. ``pad_token``
    defaults to EOS (SD1.x); SD2.x pads with ``"!"`` instead.
    """
    tokenizer = build_clip_tokenizer(TINY_WORDS, folder, max_length=77)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer


def _unet_config(sd2: bool) -> dict:
    config = dict(
        sample_size=12 if sd2 else 8,
        in_channels=4,
        out_channels=4,
        # SD: three attention blocks then a plain one (CA, CA, CA, Down); with one
        # level less we still get attention on three grids, mid block included.
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
    )
    if sd2:
        # Diffusers' historical naming: ``attention_head_dim`` is really the NUMBER
        # of heads (see UNet2DConditionModel.__init__); the head size is
        # channels // heads. SD2 gives a list [5, 10, 20, 20] over channels
        # [320, 640, 1280, 1280], i.e. a constant head size of 64. Mirror that:
        # heads [2, 4, 4] over [32, 64, 64] = constant head size 16.
        config.update(attention_head_dim=[2, 4, 4], use_linear_projection=True, upcast_attention=True)
    else:
        # SD1.5 gives one int (8): the same number of heads everywhere, so the head
        # size grows with the channels (40, 80, 160). Here: 4 heads of 8, 16, 16.
        config.update(attention_head_dim=4, use_linear_projection=False)
    return config


def _text_config(tokenizer, sd2: bool) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        # SD1.x uses OpenAI CLIP ViT-L (quick_gelu), SD2.x OpenCLIP ViT-H (gelu).
        hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _scheduler(sd2: bool):
    from diffusers import DDIMScheduler

    # The scheduler settings of SD1.5 / SD2.1; SD2.1 (768) predicts v, not noise.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )


def _build(sd2: bool, folder: str | Path | None, seed: int):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as scratch:
        # The tokenizer files go where save_pretrained will put the tokenizer, so the
        # saved folder also holds CLIP's vocab.json/merges.txt (transformers 4 needs them;
        # transformers 5 only writes tokenizer.json).
        tok_dir = Path(folder) / "tokenizer" if folder is not None else Path(scratch)
        tokenizer = tiny_tokenizer(tok_dir, pad_token="!" if sd2 else None)

        # fork_rng: seed our own copy of the global RNG, so building a pipeline does
        # not change the random numbers the caller draws afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**_unet_config(sd2))
            _sharpen_cross_attention(unet)
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                # four levels = three downsamplings = factor 8, as in SD
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 16, 16),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=4,
                sample_size=96 if sd2 else 64,
                scaling_factor=0.18215,
            )
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer, sd2)))

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=_scheduler(sd2),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        with library_output(verbose=False):  # no "Writing model shards" bar in test logs
            pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


@torch.no_grad()
def _sharpen_cross_attention(unet) -> None:
    """Scale the query and key weights of every cross-attention layer (see the gain above)."""
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.to_q.weight.mul_(_CROSS_ATTENTION_QK_GAIN)
            module.to_k.weight.mul_(_CROSS_ATTENTION_QK_GAIN)


def tiny_sd15_pipeline(folder: str | Path | None = None, seed: int = 0):
    """A tiny random-weight ``StableDiffusionPipeline`` with SD1.5's structure.

    Deterministic for a given ``seed``; on CPU in fp32. If ``folder`` is given the
    pipeline is also saved there (diffusers format, safetensors), ready for
    ``load_pipeline(folder)``.
    """
    return _build(sd2=False, folder=folder, seed=seed)


def tiny_sd21_pipeline(folder: str | Path | None = None, seed: int = 0):
    """A tiny random-weight ``StableDiffusionPipeline`` with SD2.1's structure.

    Linear projections in the transformer blocks, a per-block list of head counts
    with a constant head size, v-prediction, upcast attention, "!" as padding token,
    96x96 default images. Otherwise as :func:`tiny_sd15_pipeline`.
    """
    return _build(sd2=True, folder=folder, seed=seed)


# --------------------------------------------------------------------------- SDXL

def _sdxl_unet_config() -> dict:
    return dict(
        sample_size=16,  # 128² images (SDXL: 128 -> 1024²)
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),  # SDXL: 320, 640, 1280
        layers_per_block=1,  # SDXL: 2
        transformer_layers_per_block=(1, 1, 2),  # SDXL: 1, 2, 10
        attention_head_dim=(2, 4, 4),  # number of heads (diffusers' naming); SDXL 5, 10, 20 of size 64
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=32 + 64,  # both text encoders' widths (SDXL: 768 + 1280)
        addition_embed_type="text_time",
        addition_time_embed_dim=8,  # SDXL: 256
        projection_class_embeddings_input_dim=32 + 6 * 8,  # text_encoder_2's projection + 6 time ids
    )


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL base's scheduler_config.json (the sampler builds a DDIMScheduler from it)
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
        use_karras_sigmas=False,
    )


def tiny_sdxl_pipeline(folder: str | Path | None = None, seed: int = 0):
    """A tiny random-weight ``StableDiffusionXLPipeline`` with SDXL base's structure.

    Deterministic for a given ``seed``; on CPU in fp32; 128x128 default images. If
    ``folder`` is given the pipeline is also saved there (safetensors) for ``load_pipeline``.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as scratch:
        where = Path(folder) if folder is not None else Path(scratch)
        tokenizer = tiny_tokenizer(where / "tokenizer")
        tokenizer_2 = tiny_tokenizer(where / "tokenizer_2", pad_token="!")  # as SDXL's OpenCLIP tokenizer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**_sdxl_unet_config())
            _sharpen_cross_attention(unet)
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=128, scaling_factor=0.13025, force_upcast=True,
            )
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer, sd2=False)))
            torch.manual_seed(seed + 3)
            config_2 = {**_text_config(tokenizer_2, sd2=True), "hidden_size": 64, "intermediate_size": 128}
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        with library_output(verbose=False):
            pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
