"""Peak memory (RSS) of one MAG guided step for full-size SD 1.5 at 512², with and without
gradient checkpointing, on the CPU (random weights: values do not change the memory).

    flock /work/bigmem.lock python bench/mag_memory.py            # ~7 GB at the peak; both variants
    python bench/mag_memory.py --variant plain --size 512          # one variant, in this process

Each variant runs in a fresh process (peak RSS only grows): it builds the pipeline, notes
the resident memory, then runs the sampler's first step with MAG (one conditional UNet
pass with its graph, the gradient back to x_t, then the ordinary CFG step) and reports
the peak. "step" = peak − resident before the step: activations, attention maps and
gradients, which on a GPU in fp16 take about half as many bytes.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kB on Linux


def one_variant(variant: str, size: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_engine import PROMPT, full_size_sd15
    from mag_explore import Layout, MaskedAttentionGuidance, Sampler, rect

    torch.set_num_threads(2)
    pipe = full_size_sd15("cpu", torch.float32)
    layout = Layout.from_shapes(size, size, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])
    mag = MaskedAttentionGuidance(layout, gradient_checkpointing=variant == "checkpointing")
    sampler = Sampler(pipe, PROMPT, num_inference_steps=50, guidance_scale=9.0, negative_prompt="low quality",
                      seed=0, height=size, width=size, controls=[mag])
    resident, peak_before = rss_gb(), peak_gb()
    sampler.step()  # t = 981 > 700: a guided step
    assert mag.history, "the first step was not guided"
    weights = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.text_encoder, pipe.vae)
                  for p in m.parameters()) / 1e9
    return {"variant": variant, "size": size, "weights_gb": weights, "resident_before_gb": resident,
            "peak_before_gb": peak_before, "peak_gb": peak_gb(), "step_gb": peak_gb() - resident}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["plain", "checkpointing"], default=None, help="one variant, in this process")
    p.add_argument("--size", type=int, default=512)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.variant, args.size)))
        return
    print(f"SD1.5 full size, random weights, {args.size}², fp32, CPU: one MAG guided step (first step, t = 981)")
    for variant in ("plain", "checkpointing"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--size", str(args.size)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"  {variant:<14} weights {r['weights_gb']:.2f} GB, resident before the step {r['resident_before_gb']:.2f} GB, "
              f"peak {r['peak_gb']:.2f} GB -> the step adds {r['step_gb']:.2f} GB")


if __name__ == "__main__":
    main()
