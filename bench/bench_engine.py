"""Speed and memory of the engine, printed as ratios to diffusers' own pipeline.

Builds a full-size Stable Diffusion 1.5 (UNet, text encoder, VAE) from the configs in
mag_explore/data/configs/sd15 with random weights - values do not change the cost - and times, on the
same inputs in one run: StableDiffusionPipeline, our sampler without controls, with the
attention store capturing every step, with masked-attention swapping and with MAG.

    python bench/bench_engine.py                    # 256², 4 steps: a few minutes on a 2-core CPU
    python bench/bench_engine.py --size 512 --steps 50 --device cuda --dtype float16
    python bench/bench_engine.py --store-only        # the store's bytes at 512², 50 steps

Goals (not tests): capture ≤ 1.10× plain, swap ≤ 1.10×, MAG within 5 % of its analytical
cost, default store for SD1.5 at 512², 50 steps ≤ 100 MB.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mag_explore import (  # noqa: E402
    AttentionStore, Layout, MaskedAttentionGuidance, MaskedAttentionSwap, Sampler, StepRange, generate, rect,
)
from mag_explore.text.bpe import build_clip_tokenizer  # noqa: E402

CONFIGS = ROOT / "mag_explore" / "data" / "configs" / "sd15"
PROMPT = "a red circle and a blue square"


def full_size_sd15(device: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    load = lambda name: {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}
    tokenizer = build_clip_tokenizer(PROMPT.split() + ["low", "quality"], tempfile.mkdtemp())
    text = CLIPTextModel(CLIPTextConfig(**load("text_encoder.json")))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**load("vae.json")), text_encoder=text, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**load("unet.json")), scheduler=DDIMScheduler(**load("scheduler.json")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def timed(fn, device: str, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def guided_forward_backward(pipe, size: int, device: str) -> None:
    """The extra work of one MAG step, without hooks: a batch-1 UNet forward + backward to the latent."""
    from mag_explore.methods.guidance import frozen_weights

    unet = pipe.unet
    f = pipe.vae_scale_factor
    latents = torch.randn(1, unet.config.in_channels, size // f, size // f, device=device, dtype=unet.dtype,
                          requires_grad=True)
    text = torch.randn(1, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device,
                       dtype=unet.dtype)
    with torch.enable_grad(), frozen_weights(unet):  # as MAG: only the latent requires grad
        out = unet(latents, 801, encoder_hidden_states=text).sample
        torch.autograd.grad(out.float().square().mean(), latents)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--store-only", action="store_true", help="only the store's size at 512², 50 steps")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    pipe = full_size_sd15(args.device, dtype)
    if args.store_only:
        return store_size(pipe, args.device)
    size, steps = args.size, args.steps
    layout = Layout.from_shapes(size, size, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])
    common = dict(num_inference_steps=steps, guidance_scale=9.0, negative_prompt="low quality",
                  height=size, width=size)
    ours = lambda **kw: generate(pipe, PROMPT, seed=0, progress=False, **common, **kw)
    runs = {
        "diffusers StableDiffusionPipeline": lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(0), **common),
        "ours, no controls": lambda: ours(),
        "ours + store (all steps)": lambda: ours(store=AttentionStore()),
        "ours + swap (t > 700)": lambda: ours(controls=[MaskedAttentionSwap(layout)]),
        "ours + MAG (t > 700)": lambda: ours(controls=[MaskedAttentionGuidance(layout)]),
    }
    print(f"SD1.5 full size, random weights, {size}², {steps} DDIM steps, {args.device} {args.dtype}")
    runs["ours, no controls"]()  # warm-up
    # Round-robin over the repeats, best of each: a slow spell of a shared machine then
    # touches every variant instead of making one of them look expensive.
    seconds = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds[name] = min(seconds[name], timed(fn, args.device))
    base = seconds["diffusers StableDiffusionPipeline"]
    for name, s in seconds.items():
        print(f"  {name:<36} {s:8.2f} s   {s / base:5.2f}×")
    guided = StepRange(while_t_above=700).selected(_timesteps(steps))  # MAG's default on SD
    extra = timed(lambda: guided_forward_backward(pipe, size, args.device), args.device)
    expected = seconds["ours, no controls"] + len(guided) * extra
    print(f"  MAG analytical: plain + {len(guided)} guided steps × {extra:.2f} s (batch-1 forward+backward) "
          f"= {expected:.2f} s; measured/expected = {seconds['ours + MAG (t > 700)'] / expected:.3f}")
    if args.device == "cuda":
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def _timesteps(steps: int) -> list[int]:
    scheduler = DDIMScheduler(**{k: v for k, v in json.loads((CONFIGS / "scheduler.json").read_text()).items()
                                 if not k.startswith("_")})
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def store_size(pipe, device: str, measured_steps: int = 2, total_steps: int = 50) -> None:
    """Bytes of the default store at 512², 50 steps: each step stores the same amount, so a
    few steps are measured and scaled (a full CPU run would take most of an hour)."""
    store = AttentionStore()
    sampler = Sampler(pipe, PROMPT, num_inference_steps=total_steps, seed=0, height=512, width=512, store=store)
    for _ in range(measured_steps):
        sampler.step()
    per_step = store.nbytes / measured_steps
    print(f"default store (head mean, prompt tokens {store.token_indices}, cond half, fp16, CPU): "
          f"{per_step / 1e6:.2f} MB per step -> {per_step * total_steps / 1e6:.1f} MB for {total_steps} steps at 512²")
    contexts = [c for (step, _), c in store.contexts.items() if step == 0]
    full = sum(c.height * c.width * c.heads for c in contexts) * 77 * 2 * 4 * total_steps  # 77 tokens, 2 halves, fp32
    print(f"full per-head float32 storage of all 77 tokens and both CFG halves: {full / 1e9:.2f} GB "
          f"({full / (per_step * total_steps):.0f}× more)")


if __name__ == "__main__":
    main()
