"""The embedded model's parts (a tiny Stable Diffusion pipeline), and how it is saved and read back."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..text.bpe import build_clip_tokenizer
from .world import SIZE, WORDS

MAX_LENGTH = 77  # like CLIP: every prompt padded to 77 tokens


def make_vae():
    from diffusers import AutoencoderKL

    # Three blocks = two downsamplings: 64×64 images ↔ 16×16 latents (factor 4).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    # Latents are 16×16 (image side / 4). Cross-attention at 16×16 and 8×8, plus the
    # middle block at 8×8: the 16×16 maps are 4×4-pixel cells of the image, sharp
    # enough for MAG's masks. Two levels rather than three keeps the number of modules
    # (and so the CPU time per sampling step) low. ``attention_head_dim`` is
    # (misleadingly) the number of heads in diffusers: heads of 48 and 32 channels.
    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        block_out_channels=(48, 96), layers_per_block=1,
        cross_attention_dim=64, attention_head_dim=(1, 3), norm_num_groups=16,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_tokenizer(folder: Path):
    return build_clip_tokenizer(WORDS, folder, max_length=MAX_LENGTH)


def make_scheduler(kind: str = "ddpm"):
    from diffusers import DDIMScheduler, DDPMScheduler

    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 num_train_timesteps=1000)
    if kind == "ddpm":
        return DDPMScheduler(**betas, clip_sample=False)
    return DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- export
def drop_source_paths(out: Path) -> None:
    """Remove ``_name_or_path`` from a saved pipeline's configs: loading from a folder
    (``--init-from``, the shipped VAE) leaves that machine's path in them."""
    for config in out.glob("*/config.json"):
        fields = json.loads(config.read_text())
        if fields.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def export(out: Path, vae, unet, text, tokenizer, meta: dict) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
        scheduler=make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    drop_source_paths(out)
    defaults_path = out / "mag_explore.json"
    defaults = json.loads(defaults_path.read_text()) if defaults_path.exists() else {}
    defaults = {
        "height": SIZE, "width": SIZE, "guidance_scale": 3.0, "num_inference_steps": 50,
        # A starting point only: the shipped model's calibration (README, "MAG on the embedded
        # model"). Measure a new model with bench/mag_steps.py and bench/mag_suite.py, and edit this file.
        "mag_step_rule": "normalized", "mag_alpha": 0.03, "mag_lmbda": 1.25, "mag_mask_mode": "area",
        "mag_loss": "balanced", "mag_layer_sizes": [16],
        "description": "Tiny Stable Diffusion trained on the shapes world: 64×64 scenes of "
                       "1–3 red/green/blue/yellow/purple circles, squares and triangles.",
        **defaults, "training": meta,
    }
    defaults_path.write_text(json.dumps(defaults, indent=2) + "\n")


def load_exported(folder: Path):
    """VAE, UNet, text encoder and tokenizer of a model this module exported (safetensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return (AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True),
            UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True),
            CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True),
            CLIPTokenizer.from_pretrained(folder / "tokenizer"))
