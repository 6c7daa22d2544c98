"""How well the embedded MMDiT model ("shapes_flux") draws its prompts, and where its words attend.

    python -m mag_explore.shapes.check_mmdit                     # 32 prompts at CFG 3, 64 scenes
    python -m mag_explore.shapes.check_mmdit --cfg 3 5 --write   # ... and record in mag_explore.json

Plain FluxPipeline generation (no control), one image per 1–2-object prompt of
``check.check_prompts``: every requested color present (blob ≥ 2 %), no unrequested color,
shape right (``world.score_image``, as ``shapes.fidelity`` reads the UNet model). Two attention
figures, both the IoU of a color word's image→text map (mean over heads, layers and, when
generating, the conditional pass of every step; bilinear to 64×64, thresholded at half its
peak) with an object:

* ``attention_iou``: on the generated image, against the largest blob of that color (as
  ``shapes.check`` measures the UNet model);
* ``scene_attention_iou``: on held-out training-like scenes noised to σ = 0.8, 0.6, 0.4,
  against the object's true mask.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import data_path
from . import mmdit
from .check import check_prompts
from .fidelity import summarize
from .train_mmdit import GRID, grounding_processor, predict, scene_batch
from ..layouts import mask_iou
from .world import blobs, make_scene, parse_caption, segment_by_color

MODEL = data_path("models", "shapes_flux")


def load(folder: Path = MODEL):
    from ..models.load import library_output

    with library_output(verbose=False):  # no "requires torchvision" notices while loading
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def word_heat(maps: torch.Tensor, column: int) -> np.ndarray:
    """(tokens 64, text) mean map -> one word's 64×64 map, scaled to peak 1."""
    heat = maps[:, column].reshape(1, 1, GRID, GRID)
    heat = F.interpolate(heat, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    return (heat / heat.max().clamp_min(1e-12)).numpy()


def color_columns(pipe, prompt: str) -> dict[str, int]:
    """Where each color word of ``prompt`` sits in its T5 tokens."""
    ids = pipe.tokenizer_2(prompt).input_ids
    return {c: ids.index(pipe.tokenizer_2.convert_tokens_to_ids("▁" + c))
            for c, _ in parse_caption(prompt)}


@torch.no_grad()
def generate(pipe, prompt: str, seed: int, cfg: float, steps: int) -> tuple[np.ndarray, torch.Tensor]:
    """One image, and its image→text map averaged over the conditional passes (tokens, text)."""
    layers = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    with grounding_processor(pipe.transformer, mmdit.MAX_SEQUENCE_LENGTH) as proc:
        out = pipe(prompt, height=64, width=64, num_inference_steps=steps,
                   max_sequence_length=mmdit.MAX_SEQUENCE_LENGTH, negative_prompt="", true_cfg_scale=cfg,
                   generator=torch.Generator().manual_seed(seed), output_type="np")
    # FluxPipeline calls the transformer for the prompt, then for the negative prompt, each step.
    passes = [proc.maps[i:i + layers] for i in range(0, len(proc.maps), layers)]
    cond = passes[::2] if cfg > 1 else passes
    maps = torch.stack([m[0] for p in cond for m in p]).mean(0)
    return (out.images[0] * 255).round().astype(np.uint8), maps


def fidelity(pipe, prompts: list[str], cfg: float, steps: int, seed: int = 0, progress: bool = True):
    """Prompt fidelity and generated-image attention IoU; also returns the images."""
    images, ious = [], []
    for i, prompt in enumerate(tqdm(prompts, desc=f"CFG {cfg:g}", disable=not progress)):
        image, maps = generate(pipe, prompt, seed + i, cfg, steps)
        images.append(image)
        segments = segment_by_color(image)
        for color, column in color_columns(pipe, prompt).items():
            found = blobs(segments.get(color, np.zeros((64, 64), bool)))
            if found:
                ious.append(mask_iou(word_heat(maps, column) >= 0.5, found[0]))
    figures = summarize(images, prompts)
    figures["attention_iou"] = float(np.mean(ious)) if ious else 0.0
    return figures, images


@torch.no_grad()
def scene_attention_iou(pipe, n: int = 64, sigmas=(0.8, 0.6, 0.4), seed: int = 777) -> float:
    """Color-word attention vs the true object mask on held-out scenes noised to each sigma."""
    images, t5_ids, clip_ids, _, _ = scene_batch(seed, n, pipe.tokenizer_2, pipe.tokenizer)
    rng = np.random.default_rng(seed)  # the same scenes again, for their masks and captions
    scenes = [make_scene(rng, empty_caption_prob=0.0) for _ in range(n)]
    latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    models = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
    g = torch.Generator().manual_seed(seed)
    total = 0
    for sigma in sigmas:
        noisy = (1 - sigma) * latents + sigma * torch.randn(latents.shape, generator=g)
        with grounding_processor(pipe.transformer, t5_ids.shape[1]) as proc:
            predict(models, noisy, torch.full((n,), sigma), t5_ids, clip_ids)
        total = total + torch.stack(proc.maps).mean(0)
    ious = []
    for i, scene in enumerate(scenes):
        columns = color_columns(pipe, scene.caption)
        for obj in scene.objects:
            ious.append(mask_iou(word_heat(total[i], columns[obj.color]) >= 0.5, obj.mask))
    return float(np.mean(ious))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("-n", type=int, default=32, help="prompts (one image each)")
    p.add_argument("--seed", type=int, default=100, help="prompt seed; image i uses seed + i")
    p.add_argument("--cfg", type=float, nargs="+", default=[3.0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--scenes", type=int, default=64, help="held-out scenes for scene_attention_iou")
    p.add_argument("--out", type=Path, default=Path("outputs/shapes_flux_check"))
    p.add_argument("--write", action="store_true", help="record the figures under 'measured' in mag_explore.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        p.error(f"-n {args.n} and --steps {args.steps} must be at least 1")
    torch.set_num_threads(args.threads)
    from .fidelity import save_grid

    pipe = load(args.model)
    prompts = check_prompts(args.n, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    measured = {}
    for cfg in args.cfg:
        start = time.time()
        figures, images = fidelity(pipe, prompts, cfg, args.steps, seed=args.seed)
        figures["seconds_per_image"] = round((time.time() - start) / len(prompts), 3)
        measured[f"fidelity_cfg{cfg:g}_n{args.n}"] = {k: round(v, 3) for k, v in figures.items()}
        save_grid(images, args.out / f"cfg{cfg:g}.png", columns=min(8, len(images)))
        print(f"CFG {cfg:g}: {figures}")
    measured["scene_attention_iou"] = round(scene_attention_iou(pipe, args.scenes), 3)
    print(f"scene attention IoU: {measured['scene_attention_iou']}")
    measured["note"] = (f"FluxPipeline, {args.steps} Euler steps, true CFG (negative prompt ''), 64×64, "
                        f"max_sequence_length {mmdit.MAX_SEQUENCE_LENGTH}; prompts check_prompts({args.n}, "
                        f"seed={args.seed}), image i seed {args.seed}+i; python -m mag_explore.shapes.check_mmdit")
    if args.write:
        path = args.model / "mag_explore.json"
        defaults = json.loads(path.read_text())
        defaults["measured"] = measured
        path.write_text(json.dumps(defaults, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
