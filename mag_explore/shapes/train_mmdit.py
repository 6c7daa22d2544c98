"""Train the embedded MMDiT model "shapes_flux": a tiny Flux.1-shaped pipeline of the shapes world.

Command (the shipped model: ≈ 90 minutes on one CPU thread, README has the figures)::

    OMP_NUM_THREADS=1 python -m mag_explore.shapes.train_mmdit --out mag_explore/data/models/shapes_flux \
        --workdir checkpoints/shapes_flux --steps 6500 --layers 3 --single-layers 6 --threads 1

The VAE is the shapes model's (kept frozen). A fixed pool of captioned scenes is encoded once
(cached in ``--workdir``); then the ``FluxTransformer2DModel``, the ``CLIPTextModel`` (pooled
vector) and the ``T5EncoderModel`` (token states) train together with Flux's rectified-flow
objective: x_σ = (1 − σ)·x₀ + σ·ε and the transformer predicts ε − x₀ (what
FlowMatchEulerDiscreteScheduler steps along), σ drawn logit-normal (SD3's choice) and then
shifted as FluxPipeline shifts its schedule for 64 image tokens. One caption in ten is
replaced by "" for classifier-free guidance. EMA weights are what gets saved. Batches are
seeded by step, checkpoints go to ``--workdir`` every 5 minutes, ``--resume`` continues.

The token grounding loss of ``train.py`` (``--grounding``), adapted to joint attention: a
training-time processor (``GroundingProcessor``) computes each layer's joint softmax
explicitly and keeps its image→text block (image-token rows, text-token columns, mean over
heads); each color or shape word's column is pulled onto its object's mask (8×8 token grid).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import mmdit
from .train import SEED, grounding_loss, grounding_targets
from .train_loop import checkpoint_now, ema_update, learning_rate, load_checkpoint, save_checkpoint
from .world import COLORS, SIZE, make_scene

LATENT = SIZE // 4  # 16: the VAE's latent side
GRID = LATENT // 2  # 8: Flux packs 2×2 latent patches into one image token


# ---------------------------------------------------------------------------- data
def tokenize(t5_tokenizer, clip_tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 ids (padded to MAX_SEQUENCE_LENGTH) and CLIP ids (77), as FluxPipeline tokenizes."""
    t5 = t5_tokenizer(captions, padding="max_length", max_length=mmdit.MAX_SEQUENCE_LENGTH,
                      truncation=True, return_tensors="pt").input_ids
    clip = clip_tokenizer(captions, padding="max_length", max_length=mmdit.CLIP_LENGTH,
                          truncation=True, return_tensors="pt").input_ids
    return t5, clip


def scene_batch(seed: int, n: int, t5_tokenizer, clip_tokenizer, grid: int = GRID):
    """``n`` captioned scenes from one seed, with what the grounding loss needs.

    Returns images in [-1, 1] (n, 3, 64, 64), T5 ids, CLIP ids, object masks (n, 3, grid, grid)
    as the share of each image token's pixels the object covers, and for every T5 token the
    index of the object it names ("▁red" and the shape word after it), or -1.
    """
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, empty_caption_prob=0.0) for _ in range(n)]
    images = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1
    t5_ids, clip_ids = tokenize(t5_tokenizer, clip_tokenizer, [s.caption for s in scenes])
    color_ids = {t5_tokenizer.convert_tokens_to_ids("▁" + c): c for c in COLORS}  # "▁red ▁circle"
    masks, token_object = grounding_targets(scenes, t5_ids, color_ids, grid)
    return torch.from_numpy(images).permute(0, 3, 1, 2), t5_ids, clip_ids, masks, token_object


@torch.no_grad()
def encode_pool(vae, t5_tokenizer, clip_tokenizer, workdir: Path, size: int, device: str) -> dict:
    """Latents (unscaled posterior means) of ``size`` scenes and their tokens, cached in ``workdir``."""
    path = workdir / f"pool_{size}.pt"
    if (cached := load_checkpoint(path)) is not None:
        return cached
    parts = []
    for start in tqdm(range(0, size, 256), desc="encode pool"):
        images, *rest = scene_batch(SEED * 104729 + start, min(256, size - start), t5_tokenizer, clip_tokenizer)
        parts.append((vae.encode(images.to(device)).latent_dist.mean.cpu(), *rest))
    keys = ("latents", "t5_ids", "clip_ids", "masks", "token_object")
    pool = {key: torch.cat([p[i] for p in parts]) for i, key in enumerate(keys)}
    save_checkpoint(path, **pool)
    return pool


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, 16, 16) latents -> (B, 64, 16) image tokens, exactly as FluxPipeline packs them."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def image_ids(device="cpu") -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, GRID, GRID, device, torch.float32)


# ---------------------------------------------------------------------------- attention
class GroundingProcessor:
    """diffusers' FluxAttnProcessor with the joint softmax written out, keeping image→text maps.

    Same projections, QK RMS-norms, text-first concatenation and rotary embedding
    (``apply_rotary_emb``, as the default processor applies it); only the fused SDPA kernel
    is replaced by softmax(q·kᵀ/√d)·v, so its outputs equal the default's to float error.
    With ``keep`` on, each call appends the head-mean image→text probabilities
    (B, image tokens, text tokens), with their gradient, to ``maps``. ``text_len`` says
    where the text ends in the single-stream blocks, which get one joint sequence.
    """

    def __init__(self, text_len: int, keep: bool = True):
        self.text_len, self.keep, self.maps = text_len, keep, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if getattr(attn, "fused_projections", False) or attention_mask is not None:
            raise ValueError("GroundingProcessor supports unfused projections and no attention mask only")
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  (B, S, H, D)
        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        text_len = self.text_len
        if attn.added_kv_proj_dim is not None:  # double-stream block: text has its own projections
            text_len = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D)
        probs = (q @ k.transpose(-1, -2) * attn.head_dim ** -0.5).softmax(dim=-1)
        if self.keep:
            self.maps.append(probs[:, :, text_len:, :text_len].mean(dim=1))
        hidden_states = (probs @ v).transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:  # single-stream block: its caller splits text and image
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


@contextmanager
def grounding_processor(transformer, text_len: int, keep: bool = True):
    """Install one ``GroundingProcessor`` on every attention layer; the old processors come back after."""
    saved = transformer.attn_processors
    processor = GroundingProcessor(text_len, keep)
    transformer.set_attn_processor(processor)
    try:
        yield processor
    finally:
        transformer.set_attn_processor(saved)


# ---------------------------------------------------------------------------- training
def sample_sigmas(batch: int, generator: torch.Generator, mu: float) -> torch.Tensor:
    """Logit-normal u (SD3), then FluxPipeline's exponential shift by e^mu, in (0, 1)."""
    u = torch.randn(batch, generator=generator).sigmoid()
    return (np.exp(mu) / (np.exp(mu) + (1 / u - 1))).clamp(1e-4, 1 - 1e-4)


def predict(models, noisy, sigma, t5_ids, clip_ids):
    """The transformer's velocity for packed ``noisy`` latents, text encoded as FluxPipeline does."""
    transformer, clip, t5 = models
    return transformer(hidden_states=pack(noisy), timestep=sigma, pooled_projections=clip(clip_ids).pooler_output,
                       encoder_hidden_states=t5(t5_ids)[0], txt_ids=torch.zeros(t5_ids.shape[1], 3),
                       img_ids=image_ids(noisy.device), return_dict=False)[0]


def build(args, t5_tokenizer):
    torch.manual_seed(SEED + 1)
    return (mmdit.make_transformer(args.layers, args.single_layers), mmdit.make_clip(mmdit.clip_tokenizer()),
            mmdit.make_t5(t5_tokenizer))


def train(pool: dict, scale: float, empty: tuple, models, workdir: Path, args, stop_at: float | None):
    """Rectified flow + grounding; returns the EMA models, the last step and the first step of this run."""
    device, names = args.device, ("transformer", "clip", "t5")
    models = [m.to(device).train() for m in models]
    emas = [copy.deepcopy(m) for m in models]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ckpt_path, step = workdir / "mmdit.pt", 0
    if args.resume and (ckpt := load_checkpoint(ckpt_path)):
        for module, key in [*zip(models, names), *zip(emas, [f"ema_{n}" for n in names]), (opt, "opt")]:
            module.load_state_dict(ckpt[key])
        step = ckpt["step"]
    first = step
    data = {"latents": (pool["latents"] * scale).to(device),  # shift_factor 0: latents are scaled only
            "t5_ids": pool["t5_ids"].to(device), "clip_ids": pool["clip_ids"].to(device),
            "token_object": pool["token_object"].to(device), "empty": [e.to(device) for e in empty],
            "mu": mmdit.image_mu(GRID * GRID)}
    masks = pool["masks"].to(device)
    recent = []
    last_save, bar = time.time(), tqdm(total=args.steps, initial=step, desc="MMDiT+text")
    while step < args.steps:
        idx, tok5, tokc, named, sigma, x0, noise, noisy = _flow_batch(step, data, args, device)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, "cosine", warmup=200)
        with grounding_processor(models[0], tok5.shape[1], keep=args.grounding > 0) as proc:
            pred = predict(models, noisy, sigma, tok5, tokc)
        flow = F.mse_loss(pred, pack(noise - x0))
        ground = (grounding_loss([(m, GRID, GRID) for m in proc.maps], masks[idx], named)
                  if args.grounding else torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        (flow + args.grounding * ground).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # EMA warm-up
        for ema, model in zip(emas, models):
            ema_update(ema, model, decay)
        step += 1
        recent.append(flow.item())
        bar.update(1)
        bar.set_postfix(flow=f"{flow.item():.4f}", ground=f"{ground.item():.3f}")
        save_now, stop = checkpoint_now(step, args.steps, last_save, stop_at)
        if save_now:
            save_checkpoint(ckpt_path, **{n: m.state_dict() for n, m in zip(names, models)},
                            **{f"ema_{n}": m.state_dict() for n, m in zip(names, emas)}, opt=opt.state_dict(), step=step)
            last_save = time.time()
        if stop:
            break
    bar.close()
    if recent:
        print(f"mean flow loss of the last {min(len(recent), 200)} steps: {np.mean(recent[-200:]):.4f}")
    return [m.eval() for m in emas], step, first


def _flow_batch(step: int, data: dict, args, device: str):
    """One batch from a generator seeded by the step (so a resumed run is exact): indices, T5 and
    CLIP ids (captions dropped for CFG), each token's object, σ, x_0, noise and x_σ."""
    g = torch.Generator().manual_seed(SEED * 31 + step)
    latents, (empty_t5, empty_clip) = data["latents"], data["empty"]
    idx = torch.randint(0, len(latents), (args.batch,), generator=g)
    drop = (torch.rand(args.batch, 1, generator=g) < 0.1).to(device)  # CFG: caption -> ""
    # Also the pooled CLIP vector alone, often: it enters every block's modulation, a global
    # route around the joint attention that would leave the T5 words' maps free to mean nothing.
    drop_pooled = drop | (torch.rand(args.batch, 1, generator=g) < args.pooled_drop).to(device)
    tok5 = torch.where(drop, empty_t5, data["t5_ids"][idx])
    tokc = torch.where(drop_pooled, empty_clip, data["clip_ids"][idx])
    named = torch.where(drop, -1, data["token_object"][idx])
    sigma = sample_sigmas(args.batch, g, data["mu"]).to(device)
    x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=g).to(device)
    s = sigma.view(-1, 1, 1, 1)
    return idx, tok5, tokc, named, sigma, x0, noise, (1 - s) * x0 + s * noise


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("mag_explore/data/models/shapes_flux"))
    p.add_argument("--workdir", type=Path, default=Path("checkpoints/shapes_flux"))
    p.add_argument("--steps", type=int, default=6500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pool", type=int, default=12800, help="scenes in the pre-encoded pool")
    p.add_argument("--grounding", type=float, default=0.1,
                   help="weight of the token grounding loss on the image→text maps (0: off)")
    p.add_argument("--pooled-drop", type=float, default=0.3,
                   help="share of captions whose pooled CLIP vector alone is that of '' (T5 tokens kept)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine to a tenth)")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--layers", type=int, default=3, help="double-stream blocks")
    p.add_argument("--single-layers", type=int, default=6, help="single-stream blocks")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training (and export) once this run has taken this long")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "pool", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be at least 1")
    if args.grounding < 0 or not 0 <= args.ema_decay < 1 or not 0 <= args.pooled_drop <= 1:
        p.error(f"--grounding {args.grounding} must be >= 0, --ema-decay {args.ema_decay} in [0, 1) "
                f"and --pooled-drop {args.pooled_drop} in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stop_at = t0 + 60 * args.max_minutes if args.max_minutes else None
    vae = mmdit.load_vae().to(args.device)
    t5_tokenizer, clip_tokenizer = mmdit.build_t5_tokenizer(), mmdit.clip_tokenizer()
    pool = encode_pool(vae, t5_tokenizer, clip_tokenizer, args.workdir, args.pool, args.device)
    t1 = time.time()
    empty = tokenize(t5_tokenizer, clip_tokenizer, [""])
    models, steps, first = train(pool, vae.config.scaling_factor, empty, build(args, t5_tokenizer),
                                 args.workdir, args, stop_at)
    t2 = time.time()
    transformer, clip, t5 = models
    meta = {"steps": steps, "batch": args.batch, "pool": args.pool, "grounding": args.grounding,
            "pooled_drop": args.pooled_drop, "lr": args.lr, "ema_decay": args.ema_decay, "seed": SEED,
            "max_sequence_length": mmdit.MAX_SEQUENCE_LENGTH, "layers": args.layers,
            "single_layers": args.single_layers,
            "transformer_params": mmdit.n_params(transformer), "clip_params": mmdit.n_params(clip),
            "t5_params": mmdit.n_params(t5), "vae_params": mmdit.n_params(vae),
            "vae": "the shapes model's, frozen (shift_factor 0)",
            "this_run_minutes": {"pool": round((t1 - t0) / 60, 1), "train": round((t2 - t1) / 60, 1)},
            "steps_per_second": round((steps - first) / max(t2 - t1, 1e-9), 3), "threads": args.threads}
    mmdit.export(args.out, vae, transformer, clip, t5, t5_tokenizer, meta)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
