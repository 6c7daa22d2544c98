"""SDXL: speed against diffusers' StableDiffusionXLPipeline, MAG against its analytical cost,
MAG's memory with and without gradient checkpointing, and the attention store's size.

Builds a full-size SDXL base (UNet 2.57 B parameters, both text encoders, VAE) from the
configs in mag_explore/data/configs/sdxl with random weights - values do not change the cost. In fp32
that is ~14 GB of weights: on a shared machine run it under `flock /work/bigmem.lock`.

    python bench/bench_sdxl.py --size 128 --repeats 3 --memory-size 512   # CPU: about half an hour
    python bench/bench_sdxl.py --size 1024 --steps 50 --device cuda --dtype float16
    python bench/bench_sdxl.py --tiny                 # the tiny random SDXL: checks the script in seconds

Memory: the peak of the process's resident memory (CPU; sampled every 2 ms) or of
torch.cuda.max_memory_allocated (GPU) during one MAG guidance pass (batch-1 forward with
every cross-attention map explicit, backward to the latent), above what it was before.
The store's size for 1024² × 50 steps is measured per step at the bench size and scaled
by the pixel count ((1024 / size)² per layer: the same layers at the same relative sizes).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mag_explore import AttentionStore, Layout, MaskedAttentionGuidance, MaskedAttentionSwap, Sampler, generate, rect  # noqa: E402
from mag_explore.attention import cross_attention_hooks  # noqa: E402
from mag_explore.text.bpe import build_clip_tokenizer  # noqa: E402
from mag_explore.families import Conditioning, denoise  # noqa: E402
from mag_explore.methods import guidance_pass  # noqa: E402
from mag_explore.sampling import StepState  # noqa: E402
from mag_explore.schedule import StepRange  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import timed  # noqa: E402

CONFIGS = ROOT / "mag_explore" / "data" / "configs" / "sdxl"
PROMPT = "a red circle and a blue square"


def full_size_sdxl(device: str, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    load = lambda name: {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}
    words = PROMPT.split() + ["low", "quality"]
    tokenizer = build_clip_tokenizer(words, tempfile.mkdtemp())
    tokenizer_2 = build_clip_tokenizer(words, tempfile.mkdtemp())
    tokenizer_2.pad_token = "!"
    with torch.device("meta"):  # shapes first, then random values in the target dtype (half the peak)
        parts = dict(unet=UNet2DConditionModel(**load("unet.json")), vae=AutoencoderKL(**load("vae.json")),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**load("text_encoder.json"))),
                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**load("text_encoder_2.json"))))
    for module in parts.values():
        module.to_empty(device=device)
        if dtype != torch.float32:
            module.to(dtype)
        with torch.no_grad():  # random weights of a plausible scale; the cost does not depend on them
            for name, p in module.named_parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.02)
                else:  # norms scale by 1, biases start at 0
                    p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            for b in module.buffers():
                if b.dtype.is_floating_point:
                    b.zero_()
        module.eval()
    for encoder in (parts["text_encoder"], parts["text_encoder_2"]):  # a buffer that must hold 0..76
        for name, ids in encoder.named_buffers():
            if name.endswith("position_ids"):
                ids.copy_(torch.arange(ids.shape[-1], device=device)[None])
    pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                     scheduler=EulerDiscreteScheduler.from_config(load("scheduler.json")),
                                     add_watermarker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def two_regions(size: int) -> Layout:
    return Layout.from_shapes(size, size, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, device: str) -> tuple[int, int]:
    """(peak above the start, the start) in bytes while ``fn`` runs."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, start
    try:  # give freed memory back to the OS first, so that the next run's growth shows in RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    start, peak, running = _rss(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        running[0] = False
        watcher.join()
    return max(peak[0], _rss()) - start, start


def guided_forward_backward(pipe, sampler: Sampler) -> None:
    """The extra work of one MAG step without the hooks: a batch-1 UNet forward + backward to the latent."""
    latents = sampler.latents.detach().requires_grad_(True)
    with torch.enable_grad():
        out = denoise(pipe, latents, sampler.scheduler.timesteps[0], sampler.cond)
        torch.autograd.grad(out.float().square().mean(), latents)


def one_guidance_pass(pipe, layout, size: int, checkpointing: bool):
    """A function that runs MAG's loss and gradient once at the first step (hooks installed)."""
    mag = MaskedAttentionGuidance(layout, step_range=(0, 1), gradient_checkpointing=checkpointing)
    sampler = Sampler(pipe, PROMPT, num_inference_steps=50, seed=0, height=size, width=size, controls=[mag])
    t = sampler.scheduler.timesteps[0]

    def run():
        with cross_attention_hooks(pipe.unet, sampler.hooks) as controller:
            controller.set_step(0, t)
            state = StepState(pipe, sampler.scheduler, 0, t, sampler.latents, sampler.cond, sampler.uncond,
                              controller, sampler.timesteps)
            guidance_pass(state, sampler.latents, mag.hook, checkpointing=checkpointing)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side for the timings")
    p.add_argument("--memory-size", type=int, default=None, help="image side for MAG's memory (default --size)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="best of N, round-robin over the variants")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--tiny", action="store_true", help="the tiny random SDXL instead of the full-size one")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    if args.tiny:
        from mag_explore.testing import tiny_sdxl_pipeline
        pipe = tiny_sdxl_pipeline()
        if (args.device, dtype) != ("cpu", torch.float32):
            pipe = pipe.to(args.device, dtype)
    else:
        pipe = full_size_sdxl(args.device, dtype)
    built = time.perf_counter() - started
    params = sum(p.numel() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                 for p in getattr(pipe, name).parameters())
    size, steps = args.size, args.steps
    layout = two_regions(size)
    print(f"SDXL {'tiny' if args.tiny else 'full size'}, random weights ({params / 1e9:.2f} B parameters, "
          f"built in {built:.0f} s), {size}², {steps} DDIM steps, CFG 9, {args.device} {args.dtype}")

    common = dict(num_inference_steps=steps, guidance_scale=9.0, negative_prompt="low quality", height=size, width=size)
    theirs = StableDiffusionXLPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)},
                                       add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    ours = {
        "ours, no controls": {},
        "ours + store (all steps)": {"store": AttentionStore()},
        "ours + swap (t > 700)": {"controls": [MaskedAttentionSwap(layout)]},
        "ours + MAG (t > 700)": {"controls": [MaskedAttentionGuidance(layout)]},
    }
    generate(pipe, PROMPT, seed=0, progress=False, **{**common, "num_inference_steps": 1})  # warm-up
    runs = {"diffusers StableDiffusionXLPipeline":
            lambda: theirs(PROMPT, generator=torch.Generator().manual_seed(0), **common)}
    for name, options in ours.items():
        runs[name] = lambda options=options: generate(pipe, PROMPT, seed=0, progress=False, **common, **options)
    # Round-robin over the repeats, best of each: a busy spell of a shared machine then touches
    # every variant instead of making one of them look expensive.
    seconds = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds[name] = min(seconds[name], timed(fn, args.device))
    base = seconds["diffusers StableDiffusionXLPipeline"]
    for name, s in seconds.items():
        print(f"  {name:<38} {s:8.2f} s   {s / base:5.2f}×")
    sampler = Sampler(pipe, PROMPT, num_inference_steps=steps, seed=0, height=size, width=size)
    guided = StepRange(while_t_above=700).selected(sampler.timesteps)
    extra = min(timed(lambda: guided_forward_backward(pipe, sampler), args.device) for _ in range(args.repeats))
    expected = seconds["ours, no controls"] + len(guided) * extra
    print(f"  MAG analytical: plain + {len(guided)} guided step(s) × {extra:.2f} s (batch-1 forward+backward) "
          f"= {expected:.2f} s; measured/expected = {seconds['ours + MAG (t > 700)'] / expected:.3f}")

    mem_size = args.memory_size or size
    mem_layout = two_regions(mem_size)
    unit = "GPU memory allocated" if args.device == "cuda" else "peak RSS"
    for checkpointing in (True, False):
        grow, start = peak_memory(one_guidance_pass(pipe, mem_layout, mem_size, checkpointing), args.device)
        print(f"  MAG guidance pass at {mem_size}², gradient checkpointing {'on ' if checkpointing else 'off'}: "
              f"{unit} +{grow / 2**30:.2f} GiB above {start / 2**30:.2f} GiB")

    store = AttentionStore()
    one_step = Sampler(pipe, PROMPT, num_inference_steps=50, seed=0, height=size, width=size, store=store)
    one_step.step()
    at_1024 = store.nbytes * (1024 / size) ** 2 * 50
    print(f"  default store: {store.nbytes / 1e6:.2f} MB per step at {size}² ({len(store.layers)} layers, "
          f"{len(store.token_indices)} prompt tokens) -> {at_1024 / 1e6:.0f} MB for 1024² × 50 steps")


if __name__ == "__main__":
    main()
