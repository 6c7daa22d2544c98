"""Sharpen the embedded models' VAE decoder, with its encoder frozen.

    python -m mag_explore.shapes.train_decoder --steps 3000

The VAE of the shapes model was trained for 300 steps (``train.py``, stage 1) and decodes
soft edges: its reconstruction of a *real* scene reads as that scene's caption (every color,
no other color, every shape right; ``world.score_image``) in only 92 % / 92 % / 86 % of
1- / 2- / 3-object scenes, because a blurred square fills less of its box and reads as a
circle. Whatever a diffusion model draws goes through this decoder, so that is a ceiling on
both embedded models' prompt fidelity.

This stage trains the decoder (``post_quant_conv`` and ``decoder``) on fresh scenes with
MSE + L1 and leaves the encoder and ``quant_conv`` untouched: the latent space stays what
it was, so the shapes UNet and the shapes_flux transformer, both trained on the encoder's
latents, keep working and get the sharper decoder. ``--also`` writes the same decoder into
other model folders whose encoder is the same (shapes_flux); a different encoder is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .architecture import drop_source_paths
from .train import SEED, scene_batch
from .train_loop import learning_rate, load_checkpoint, save_checkpoint
from .world import make_scene, score_image

MODEL = Path("mag_explore/data/models/shapes")
FLUX_MODEL = Path("mag_explore/data/models/shapes_flux")
DATA_SEED = SEED * 15485863  # scenes of this stage: none of stage 1's (SEED * 7919 + step)
EVAL_SEED = 5  # held-out scenes for the figures below


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    return [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]


def encoder_state(vae) -> dict[str, torch.Tensor]:
    """The weights that define the latent space: encoder and quant_conv."""
    return {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}


@torch.no_grad()
def reconstruction_fidelity(vae, n: int = 100, seed: int = EVAL_SEED) -> dict[str, float]:
    """Per object count: the share of ``n`` real scenes whose reconstruction still reads as
    the caption (``score_image``: every color, no other, every shape right), and the PSNR."""
    rng = np.random.default_rng(seed)
    figures = {}
    for count in (1, 2, 3):
        scenes = [make_scene(rng, n_objects=count, empty_caption_prob=0) for _ in range(n)]
        images = torch.from_numpy(np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1)
        images = images.permute(0, 3, 1, 2)
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = 10 * math.log10(4 / F.mse_loss(recon, images).item())
        pixels = ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        faithful = []
        for scene, picture in zip(scenes, pixels):
            score = score_image(picture, scene.caption)
            faithful.append(score["all_present"] and not score["unrequested"]
                            and all(o["shape_ok"] for o in score["objects"]))
        figures[f"fidelity_{count}"] = round(float(np.mean(faithful)), 3)
        figures[f"psnr_{count}"] = round(psnr, 2)
    return figures


def finetune_decoder(vae, steps: int, batch: int, lr: float, workdir: Path, resume: bool) -> None:
    """MSE + L1 on fresh scenes, decoder only, the learning rate on a cosine; latents sampled from the frozen posterior, as
    in stage 1, so the decoder also learns to read slightly-off latents (a diffusion model's)."""
    torch.manual_seed(SEED + 2)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = decoder_parameters(vae)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ckpt_path, step = workdir / "decoder.pt", 0
    if resume and (ckpt := load_checkpoint(ckpt_path)):
        vae.load_state_dict(ckpt["vae"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    last_save = time.time()
    bar = tqdm(total=steps, initial=step, desc="decoder")
    while step < steps:
        for group in opt.param_groups:  # a short warm-up, then cosine down to a tenth
            group["lr"] = learning_rate(step, steps, lr, "cosine", warmup=100)
        images, _ = scene_batch(DATA_SEED + step, batch)  # seed by step: exact resume
        generator = torch.Generator().manual_seed(DATA_SEED + step)
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, images) + F.l1_loss(recon, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_save > 300 or step == steps:
            save_checkpoint(ckpt_path, vae=vae.state_dict(), opt=opt.state_dict(), step=step)
            last_save = time.time()
    bar.close()
    vae.eval()


def write_decoder(vae, folder: Path, meta: dict) -> None:
    """Save ``vae``'s decoder into the model in ``folder`` (same encoder required) and record
    ``meta`` under ``training.decoder_finetune`` in its mag_explore.json."""
    from diffusers import AutoencoderKL

    target = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
    mine, theirs = encoder_state(vae), encoder_state(target)
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        raise ValueError(f"{folder / 'vae'} has another encoder than the decoder was trained for: "
                         "its latents would not match; give only folders that share the shapes VAE")
    decoder = {k: v for k, v in vae.state_dict().items() if k not in mine}
    target.load_state_dict({**theirs, **decoder})
    target.save_pretrained(folder / "vae", safe_serialization=True)
    drop_source_paths(folder)
    defaults_path = folder / "mag_explore.json"
    defaults = json.loads(defaults_path.read_text())
    defaults.setdefault("training", {})["decoder_finetune"] = meta
    defaults_path.write_text(json.dumps(defaults, indent=2, ensure_ascii=False) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL, help="the model whose VAE to start from and write")
    p.add_argument("--also", type=Path, nargs="*", default=[FLUX_MODEL],
                   help="other model folders with the same encoder that get the new decoder")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--workdir", type=Path, default=Path("checkpoints/decoder"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> None:
    from diffusers import AutoencoderKL

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(args.model / "vae", use_safetensors=True).eval()
    before = reconstruction_fidelity(vae)
    print(f"before: {before}")
    start = time.time()
    finetune_decoder(vae, args.steps, args.batch, args.lr, args.workdir, args.resume)
    after = reconstruction_fidelity(vae)
    print(f"after:  {after}")
    meta = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "loss": "mse + l1", "lr_schedule": "cosine, 100 warm-up steps", "seed": DATA_SEED,
            "threads": args.threads, "minutes": round((time.time() - start) / 60, 1),
            "reconstruction_before": before, "reconstruction_after": after,
            "note": "decoder only; encoder and quant_conv frozen, so the latent space is unchanged"}
    for folder in [args.model, *args.also]:
        write_decoder(vae, folder, meta)
        print(f"wrote the decoder into {folder / 'vae'}")


if __name__ == "__main__":
    main()
