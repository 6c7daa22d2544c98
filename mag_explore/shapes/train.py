"""Train the embedded "shapes" model: a tiny Stable Diffusion for the shapes world.

Command (2-core CPU, the default model shipped in mag_explore/data/models/shapes)::

    python -m mag_explore.shapes.train --out mag_explore/data/models/shapes --workdir checkpoints/shapes

Stage 1 trains an ``AutoencoderKL`` (64×64 RGB → 4×16×16 latents) on fresh scenes.
Stage 2 encodes a fixed pool of captioned scenes once, then trains the
``UNet2DConditionModel`` and the ``CLIPTextModel`` together to predict the noise added
with Stable Diffusion's own betas, so "t > 700" means the same as on SD. EMA weights
are what gets saved. Both stages checkpoint to ``--workdir`` every few minutes and
``--resume`` continues from there; ``--max-minutes`` ends stage 2 early (at that total
run time) and exports what it has. ``--init-from FOLDER`` continues from an exported
model instead (its VAE is kept, stage 1 skipped); ``--vae-from FOLDER`` takes only that
model's VAE and trains the UNet and text encoder from scratch.

Stage 2 adds a token grounding loss (``--grounding``, see ``grounding_loss``): the pool
knows which object each color and shape word names, so the word's cross-attention is
pulled onto that object's mask. Without it a model this small learns to read the whole
prompt from the EOS and padding tokens and its word maps tie to nothing (README, "The
embedded model", has the measurement).

The shipped model is two runs of this command (the VAE alone, then ``--vae-from`` it after
``train_decoder`` sharpened its decoder); ``python -m mag_explore.shapes.recipe`` runs the
three stages in order with their fixed step counts.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attention import AttentionHook, cross_attention_hooks
from .architecture import (MAX_LENGTH, export, load_exported, make_scheduler, make_text_encoder,  # noqa: F401
                           make_tokenizer, make_unet, make_vae, n_params)
from .train_loop import (CHECKPOINT_SECONDS, LR_SCHEDULES, checkpoint_now, ema_update,
                         learning_rate, load_checkpoint, save_checkpoint)
from .world import COLORS, OBJECT_COUNTS_P, SIZE, make_scene

SEED = 1234


# ---------------------------------------------------------------------------- data
def scene_batch(seed: int, n: int, empty_caption_prob: float = 0.0):
    """``n`` scenes from one seed: images as float tensors in [-1, 1], and captions."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, empty_caption_prob=empty_caption_prob) for _ in range(n)]
    images = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(images).permute(0, 3, 1, 2), [s.caption for s in scenes]


def scene_batch_grounded(seed: int, n: int, tokenizer, grid: int,
                         object_counts_p: tuple[float, float, float] = OBJECT_COUNTS_P):
    """Like ``scene_batch``, plus what the grounding loss needs.

    Returns images, token ids, object masks (n, 3, grid, grid) as the share of each latent
    cell the object covers, and for every token the index of the object it names
    (its color word and its shape word), or -1 (BOS, "a", "and", EOS, padding).
    """
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, empty_caption_prob=0.0, object_counts_p=object_counts_p)
              for _ in range(n)]
    images = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1
    ids = tokenize(tokenizer, [s.caption for s in scenes])
    color_ids = {tokenizer(c, add_special_tokens=False).input_ids[0]: c for c in COLORS}
    masks, token_object = grounding_targets(scenes, ids, color_ids, grid)
    return torch.from_numpy(images).permute(0, 3, 1, 2), ids, masks, token_object


def grounding_targets(scenes, ids: torch.Tensor, color_ids: dict[int, str], grid: int):
    """Object masks (n, 3, grid, grid) as the share of each cell an object covers, and for
    every token the index of the object it names, or -1.

    ``color_ids`` maps a color word's token id to the color; the token after it is the
    shape word of the same object ("<color> <shape>").
    """
    masks = torch.zeros(len(scenes), 3, grid, grid)
    token_object = torch.full(ids.shape, -1, dtype=torch.int8)
    for i, scene in enumerate(scenes):
        for k, obj in enumerate(scene.objects):
            cover = torch.from_numpy(obj.mask.astype(np.float32))[None, None]
            masks[i, k] = F.adaptive_avg_pool2d(cover, grid)[0, 0]
        index = {obj.color: k for k, obj in enumerate(scene.objects)}
        for pos, token in enumerate(ids[i].tolist()):
            if token in color_ids:  # both words name the same object
                token_object[i, pos] = token_object[i, pos + 1] = index[color_ids[token]]
    return masks, token_object


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=MAX_LENGTH,
                     truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------- stage 1
def train_vae(workdir: Path, steps: int, batch: int, lr: float, resume: bool,
              device: str) -> torch.nn.Module:
    """Reconstruction (MSE) plus a tiny KL term, on fresh scenes every step."""
    torch.manual_seed(SEED)
    vae = make_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ckpt_path, step = workdir / "vae.pt", 0
    if resume and (ckpt := load_checkpoint(ckpt_path)):
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    last_save = time.time()
    bar = tqdm(total=steps, initial=step, desc="VAE")
    while step < steps:
        images, _ = scene_batch(SEED * 7919 + step, batch)  # seed by step: exact resume
        images = images.to(device)
        post = vae.encode(images).latent_dist
        recon = vae.decode(post.sample()).sample
        mse = F.mse_loss(recon, images)
        loss = mse + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        psnr = 10 * math.log10(4 / max(mse.item(), 1e-10))  # range [-1, 1] has peak² = 4
        bar.update(1)
        bar.set_postfix(psnr=f"{psnr:.1f}")
        if time.time() - last_save > CHECKPOINT_SECONDS or step == steps:
            save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step)
            last_save = time.time()
    bar.close()
    return vae.eval()


@torch.no_grad()
def vae_psnr(vae, n: int = 64, device: str = "cpu") -> float:
    images, _ = scene_batch(SEED + 999, n)
    images = images.to(device)
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    return 10 * math.log10(4 / F.mse_loss(recon, images).item())


@torch.no_grad()
def encode_pool(vae, tokenizer, workdir: Path, size: int, device: str,
                object_counts_p: tuple[float, float, float] = OBJECT_COUNTS_P):
    """Latents (unscaled posterior means), token ids, object masks and token→object maps."""
    mix = "" if tuple(object_counts_p) == OBJECT_COUNTS_P else "_" + "-".join(f"{p:g}" for p in object_counts_p)
    path = workdir / f"pool_{size}{mix}.pt"
    if (cached := load_checkpoint(path)) is not None:
        return cached
    grid = SIZE // 4  # the latent's side
    parts = []
    for start in tqdm(range(0, size, 256), desc="encode pool"):
        images, ids, masks, token_object = scene_batch_grounded(
            SEED * 104729 + start, min(256, size - start), tokenizer, grid, object_counts_p)
        latents = vae.encode(images.to(device)).latent_dist.mean.cpu()
        parts.append((latents, ids, masks, token_object))
    pool = {key: torch.cat([p[i] for p in parts])
            for i, key in enumerate(("latents", "ids", "masks", "token_object"))}
    save_checkpoint(path, **pool)
    return pool


# ---------------------------------------------------------------------------- stage 2
class KeepProbs(AttentionHook):
    """Keeps every cross-attention map of a training forward pass, with its gradient."""

    def __init__(self):
        self.maps = []

    def active(self, ctx) -> bool:
        return True

    def observe(self, probs, ctx) -> None:
        self.maps.append((probs.mean(dim=1), ctx.height, ctx.width))  # head mean: (B, pixels, tokens)


def grounding_loss(maps, masks: torch.Tensor, token_object: torch.Tensor) -> torch.Tensor:
    """Token-level grounding (as in TokenCompose, Wang et al. 2024), averaged over layers.

    For each word that names an object, (1 − share of its attention inside the object)²
    plus the total-variation distance between its attention, normalized over pixels, and
    the object's mask, normalized the same way: the first puts the word's attention on
    its object, the second spreads it over the whole object rather than one spot.
    Without it a model this small routes the prompt through EOS and padding tokens
    (which see every word through the causal text encoder) and its color words'
    maps tie to nothing, so there is nothing for MAG to steer.
    """
    named = token_object >= 0  # (B, tokens)
    if not named.any():
        return masks.new_zeros(())
    rows, cols = named.nonzero(as_tuple=True)
    losses = []
    for probs, h, w in maps:
        cell = F.adaptive_avg_pool2d(masks, (h, w)).flatten(2)  # (B, objects, pixels)
        target = cell[rows, token_object[rows, cols].long()]  # (words, pixels)
        attention = probs[rows, :, cols]  # (words, pixels)
        total = attention.sum(-1).clamp_min(1e-8)
        share = (attention * target).sum(-1) / total
        tv = 0.5 * (attention / total[:, None] - target / target.sum(-1, keepdim=True).clamp_min(1e-8)).abs().sum(-1)
        losses.append(((1 - share) ** 2 + tv).mean())
    return torch.stack(losses).mean()


def train_unet(pool: dict, scale: float, empty_ids: torch.Tensor,
               tokenizer, workdir: Path, steps: int, batch: int, lr: float,
               stop_at: float | None, resume: bool, device: str,
               grounding: float = 0.0, init: tuple | None = None, lr_schedule: str = "constant"):
    """Epsilon prediction with min-SNR-5 weighting; UNet and text encoder trained jointly.

    Min-SNR weighting (Hang et al. 2023) stops the many nearly-clean timesteps from
    dominating the loss, which makes a small budget go noticeably further.
    """
    ckpt_path = workdir / "unet.pt"
    unet, text, ema_unet, ema_text, opt, params, step = _unet_models(tokenizer, device, init, lr, ckpt_path, resume)
    alphas = make_scheduler().alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    weight = snr.clamp(max=5.0) / snr
    data = {"latents": (pool["latents"] * scale).to(device), "ids": pool["ids"].to(device),
            "token_object": pool["token_object"].to(device), "empty_ids": empty_ids.to(device)}
    masks = pool["masks"].to(device)
    keep = KeepProbs()
    last_save = time.time()
    bar = tqdm(total=steps, initial=step, desc="UNet+text")
    while step < steps:
        idx, tok, tok_object, t, noise, noisy = _noisy_batch(step, batch, data, alphas, device)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr, lr_schedule)
        keep.maps.clear()
        with cross_attention_hooks(unet, [keep] if grounding else []):
            pred = unet(noisy, t, encoder_hidden_states=text(tok)[0]).sample
        diffusion = (weight[t] * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        ground = grounding_loss(keep.maps, masks[idx], tok_object) if grounding else torch.zeros(())
        loss = diffusion + grounding * ground
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))  # EMA warm-up, then 0.999
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{diffusion.item():.4f}", ground=f"{ground.item():.3f}")
        save_now, stop = checkpoint_now(step, steps, last_save, stop_at)
        if save_now:
            save_checkpoint(ckpt_path, unet=unet.state_dict(), text=text.state_dict(),
                            ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict(),
                            opt=opt.state_dict(), step=step)
            last_save = time.time()
        if stop:
            break
    bar.close()
    return ema_unet.eval(), ema_text.eval(), step


def _unet_models(tokenizer, device: str, init: tuple | None, lr: float, ckpt_path: Path, resume: bool):
    """UNet, text encoder, their EMA copies, the optimizer, its parameters and the step reached
    (from ``ckpt_path`` when resuming)."""
    torch.manual_seed(SEED + 1)
    if init is not None:  # continue from an exported model (its weights, fresh optimizer)
        unet, text = (m.to(device).train() for m in init)
    else:
        unet, text = make_unet().to(device), make_text_encoder(tokenizer).to(device)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    step = 0
    if resume and (ckpt := load_checkpoint(ckpt_path)):
        for module, key in ((unet, "unet"), (text, "text"), (ema_unet, "ema_unet"),
                            (ema_text, "ema_text"), (opt, "opt")):
            module.load_state_dict(ckpt[key])
        step = ckpt["step"]
    # Channels-last convolutions are ~10 % faster on CPU (oneDNN's native layout).
    return unet.to(memory_format=torch.channels_last), text, ema_unet, ema_text, opt, params, step


def _noisy_batch(step: int, batch: int, data: dict, alphas: torch.Tensor, device: str):
    """One training batch, drawn from a generator seeded by the step (so a resumed run is exact):
    indices, token ids (10 % empty prompts), each token's object, timesteps, noise and x_t."""
    g = torch.Generator().manual_seed(SEED * 31 + step)
    idx = torch.randint(0, len(data["latents"]), (batch,), generator=g)
    x0 = data["latents"][idx]
    empty = torch.rand(batch, 1, generator=g).to(device) < 0.1
    tok = torch.where(empty, data["empty_ids"], data["ids"][idx])
    tok_object = torch.where(empty, -1, data["token_object"][idx])
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = (a.sqrt() * x0 + (1 - a).sqrt() * noise).contiguous(memory_format=torch.channels_last)
    return idx, tok, tok_object, t, noise, noisy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("mag_explore/data/models/shapes"))
    p.add_argument("--workdir", type=Path, default=Path("checkpoints/shapes"))
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--unet-steps", type=int, default=2346)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--pool", type=int, default=6400, help="scenes in the pre-encoded pool")
    p.add_argument("--grounding", type=float, default=0.1,
                   help="weight of the token grounding loss on the cross-attention maps (0: off)")
    p.add_argument("--object-counts", type=float, nargs=3, default=list(OBJECT_COUNTS_P),
                   metavar=("P1", "P2", "P3"),
                   help="share of 1-, 2- and 3-object scenes in the pool (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="UNet + text encoder learning rate")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="after the warm-up: constant, or cosine down to a tenth at the last step")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from an exported model folder: keep its VAE, start the UNet and "
                        "text encoder from its weights (stage 1 is skipped)")
    p.add_argument("--vae-from", type=Path, default=None,
                   help="take the VAE of an exported model folder (stage 1 is skipped) and train the UNet "
                        "and text encoder from scratch")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop stage 2 (and export) once this run has taken this long")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    stop_at = t0 + 60 * args.max_minutes if args.max_minutes else None
    init, previous, vae_record = None, None, None
    if args.init_from is not None and args.vae_from is not None:
        p.error("--init-from already keeps that model's VAE; give --init-from or --vae-from, not both")
    if args.vae_from is not None:
        vae = load_exported(args.vae_from)[0].to(args.device).eval()
        vae_record = json.loads((args.vae_from / "mag_explore.json").read_text()).get("training", {})
        tokenizer = make_tokenizer(args.workdir / "tokenizer")
    elif args.init_from is not None:
        vae, unet0, text0, tokenizer = load_exported(args.init_from)
        vae, init = vae.to(args.device).eval(), (unet0, text0)
        previous = json.loads((args.init_from / "mag_explore.json").read_text()).get("training")
    else:
        tokenizer = make_tokenizer(args.workdir / "tokenizer")
        vae = train_vae(args.workdir, args.vae_steps, args.vae_batch, 1e-3, args.resume, args.device)
    psnr = vae_psnr(vae, device=args.device)
    t1 = time.time()
    if abs(sum(args.object_counts) - 1) > 1e-6 or min(args.object_counts) < 0:
        p.error(f"--object-counts {args.object_counts}: three shares >= 0 that sum to 1")
    pool = encode_pool(vae, tokenizer, args.workdir, args.pool, args.device,
                       tuple(args.object_counts))
    scale = 1.0 / pool["latents"].std().item()  # unit-variance latents, as SD's 0.18215 does
    vae.register_to_config(scaling_factor=scale)
    print(f"VAE: PSNR {psnr:.1f} dB on fresh scenes, latent std {1 / scale:.3f}")
    empty_ids = tokenize(tokenizer, [""])
    unet, text, steps = train_unet(pool, scale, empty_ids, tokenizer, args.workdir,
                                   args.unet_steps, args.unet_batch, args.lr, stop_at,
                                   args.resume, args.device, grounding=args.grounding, init=init,
                                   lr_schedule=args.lr_schedule)
    t2 = time.time()
    kept = previous or vae_record  # the VAE came from another run
    meta = {"vae_steps": args.vae_steps if kept is None else kept.get("vae_steps"),
            "vae_psnr_db": round(psnr, 2), "unet_steps": steps, "grounding": args.grounding,
            "pool": args.pool, "object_counts": list(args.object_counts), "lr": args.lr,
            "lr_schedule": args.lr_schedule,
            "seed": SEED, "vae_params": n_params(vae),
            "unet_params": n_params(unet), "text_encoder_params": n_params(text),
            "this_run_minutes": {"vae": round((t1 - t0) / 60, 1),
                                 "unet": round((t2 - t1) / 60, 1)}}
    if previous is not None:
        meta["continued_from"] = previous
    if vae_record is not None:
        meta["vae_from"] = {k: vae_record[k] for k in ("vae_steps", "vae_psnr_db", "decoder_finetune") if k in vae_record}
    export(args.out, vae, unet, text, tokenizer, meta)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
