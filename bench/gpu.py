"""Everything that needs a GPU, in one command: ≤ 8 minutes on one GPU, nothing to download.

    python bench/gpu.py                 # SD1.5 at 512² and SDXL at 1024², full size, random weights, 50 steps, fp16
    python bench/gpu.py --models sd15   # one of them
    python bench/gpu.py --tiny --device cpu --dtype float32 --steps 5 --size 64   # the same code on the CPU (tested)

Builds Stable Diffusion 1.5 and SDXL base at full size from mag_explore/data/configs with random
weights (values do not change time or memory) and runs, for each, on the same prompt and seed:
diffusers' pipeline (with the same DDIM scheduler), our sampler plain, with the attention store capturing every
step, with masked-attention swap and with MAG (without and with gradient checkpointing).
For each: seconds per image (best of ``--repeats`` after a warm-up) and peak GPU memory;
plus MAG's analytical cost (plain + guided steps × one batch-1 forward+backward).
Writes ``bench/results/gpu-<device>-<date>.json`` and ``.md`` (device name and date inside).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import PROMPT, full_size_sd15  # noqa: E402
from bench_sdxl import full_size_sdxl, guided_forward_backward  # noqa: E402

from mag_explore import (  # noqa: E402
    AttentionStore, Layout, MaskedAttentionGuidance, MaskedAttentionSwap, Sampler, StepRange, generate, rect,
)

#: name -> (label, native size, builder of the full-size model)
MODELS = {"sd15": ("SD1.5", 512, full_size_sd15), "sdxl": ("SDXL base", 1024, full_size_sdxl)}


def tiny_pipeline(model: str, device: str, dtype: torch.dtype):
    """The tests' tiny pipeline of that family (same block structure, random weights): a CPU check of this script."""
    from mag_explore import testing

    pipe = testing.tiny_sd15_pipeline(seed=0) if model == "sd15" else testing.tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def with_ddim(pipe):
    """The same pipeline with the DDIM scheduler our sampler uses (SDXL ships an Euler config)."""
    from diffusers import DDIMScheduler

    theirs = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)},
                        **({"add_watermarker": False} if "text_encoder_2" in pipe.components else {}))
    theirs.set_progress_bar_config(disable=True)
    return theirs


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def measure(fn, device: str, repeats: int) -> tuple[float, float | None]:
    """Best seconds over ``repeats`` (after a warm-up) and peak GPU memory in GiB (None off the GPU)."""
    fn()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def run(model: str, size: int, steps: int, device: str, dtype: torch.dtype, repeats: int, tiny: bool) -> dict:
    label, _, build = MODELS[model]
    pipe = tiny_pipeline(model, device, dtype) if tiny else build(device, dtype)
    theirs = with_ddim(pipe)
    layout = Layout.from_shapes(size, size, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])
    common = dict(num_inference_steps=steps, guidance_scale=9.0, negative_prompt="low quality", height=size, width=size)
    ours = lambda **kw: generate(pipe, PROMPT, seed=0, progress=False, **common, **kw)
    variants = {
        f"diffusers {type(pipe).__name__}": lambda: theirs(PROMPT, generator=torch.Generator().manual_seed(0), **common),
        "ours, no controls": lambda: ours(),
        "ours + store (all steps)": lambda: ours(store=AttentionStore()),
        "ours + swap (t > 700)": lambda: ours(controls=[MaskedAttentionSwap(layout)]),
        "ours + MAG (t > 700)": lambda: ours(controls=[MaskedAttentionGuidance(layout)]),
        "ours + MAG, gradient checkpointing": lambda: ours(controls=[MaskedAttentionGuidance(
            layout, gradient_checkpointing=True)]),
    }
    rows = []
    for name, fn in variants.items():
        seconds, peak = measure(fn, device, repeats)
        rows.append({"variant": name, "seconds": seconds, "peak_gib": peak})
    base = rows[0]["seconds"]
    for row in rows:
        row["ratio"] = row["seconds"] / base
    guided = len(StepRange(while_t_above=700).selected(_timesteps(pipe, steps)))  # MAG's default on SD
    sampler = Sampler(pipe, PROMPT, seed=0, **common)
    extra, _ = measure(lambda: guided_forward_backward(pipe, sampler), device, repeats)
    plain = rows[1]["seconds"]
    mag = next(r for r in rows if r["variant"] == "ours + MAG (t > 700)")["seconds"]
    del pipe, theirs, sampler
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the next model starts from an empty GPU
    return {"model": f"{label}-like tiny (tests)" if tiny else f"{label} full size, random weights",
            "device": device_name(device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "size": size, "steps": steps, "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
            "torch": torch.__version__, "rows": rows,
            "mag_analytical": {"guided_steps": guided, "forward_backward_s": extra,
                               "expected_s": plain + guided * extra, "measured_over_expected": mag / (plain + guided * extra)}}


def _timesteps(pipe, steps: int) -> list[int]:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def markdown(result: dict) -> str:
    lines = [f"{result['model']}, {result['size']}² × {result['steps']} DDIM steps, {result['dtype']}, CFG 9; "
             f"{result['device']}, {result['date']}, torch {result['torch']}, best of {result['repeats']}", "",
             "| variant | s / image | × diffusers | peak GPU memory (GiB) |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['variant']} | {r['seconds']:.2f} | {r['ratio']:.2f} | {peak} |")
    a = result["mag_analytical"]
    lines += ["", f"MAG analytical: plain + {a['guided_steps']} guided steps × {a['forward_backward_s']:.3f} s "
                  f"(batch-1 forward+backward) = {a['expected_s']:.2f} s; measured/expected = "
                  f"{a['measured_over_expected']:.3f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,sdxl", help="comma-separated, of " + ", ".join(MODELS))
    p.add_argument("--size", type=int, default=None, help="image side (default: each model's native size)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="the tests' tiny pipelines (a CPU check)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no notes about casting random weights
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; pass --device cpu --tiny to check the script on the CPU")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise SystemExit(f"error: --models {args.models!r}: use names of {', '.join(MODELS)}")
    results = []
    for model in models:
        size = args.size or MODELS[model][1]
        results.append(run(model, size, args.steps, args.device, getattr(torch, args.dtype), args.repeats, args.tiny))
        print(markdown(results[-1]) + "\n", flush=True)  # each model's table as soon as it is measured
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", results[0]["device"].lower()).strip("-")
    stem = args.out / f"gpu-{slug}-{results[0]['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps({"runs": results}, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n\n".join(markdown(r) for r in results) + "\n")
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return stem


if __name__ == "__main__":
    main()
