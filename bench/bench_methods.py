"""Seconds per image of each method on the embedded shapes model (or any model), on this machine.

    python bench/bench_methods.py                         # shapes model, its default steps
    python bench/bench_methods.py --model /path/to/sd --steps 20 --device cuda

Every method runs the same prompt, layout and seeds, round-robin; the first run of each is a warm-up.
Prints seconds per image (median), the ratio to "none", and the extra conditional-only
UNet passes the guidance methods made (MAG: one per guided step; layout guidance: up to
5 per guided step, fewer once its loss is under the threshold), and MAG's analytical cost:
the time of "none" plus, per guided step, one batch-1 UNet forward + backward without hooks.
Goals (not tests): swap ≤ 1.10× none; MAG within 5 % of its analytical cost.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mag_explore.layouts.suite import load_suite  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_engine import guided_forward_backward  # noqa: E402
from mag_explore.methods import METHOD_NAMES, make_controls  # noqa: E402
from mag_explore.models import load_pipeline, model_defaults  # noqa: E402
from mag_explore.sampling import generate  # noqa: E402

SUITE = ROOT / "mag_explore" / "data" / "suites" / "shapes.json"


def time_once(pipe, layout, method: str, steps: int, seed: int) -> tuple[float, int]:
    """Seconds of one image, and the extra conditional-only UNet passes it made."""
    controls = make_controls(method, layout)  # the model's defaults, resolved when the run starts
    start = time.perf_counter()
    result = generate(pipe, layout.prompt, num_inference_steps=steps, seed=seed, controls=controls, progress=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(diag.get("loss", [])) for diag in result.diagnostics.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--layout", default="left-right", help="name of a layout of mag_explore/data/suites/shapes.json")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for the shapes model)")
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=args.device)
    d = model_defaults(pipe)
    suite = {s.name: s.layout for s in load_suite(SUITE, d["height"], d["width"])}
    if args.layout not in suite:
        raise SystemExit(f"error: no layout {args.layout!r}; the suite has {sorted(suite)}")
    layout, methods = suite[args.layout], args.methods.split(",")
    torch.set_num_threads(args.threads)
    steps = args.steps or d["num_inference_steps"]
    print(f"model {args.model}, {d['height']}×{d['width']}, {steps} DDIM steps, CFG {d['guidance_scale']}, "
          f"prompt {layout.prompt!r}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} after a warm-up")
    print(f"{'method':<7} {'s/image':>8} {'× none':>7} {'extra passes':>13}")
    for method in methods:  # warm-up
        time_once(pipe, layout, method, steps, 0)
    # Round-robin over the seeds: a slow spell of the (shared) machine touches every method
    # alike instead of making one of them look expensive; the median of each is kept.
    times, passes = {m: [] for m in methods}, {}
    for seed in range(1, args.repeats + 1):
        for method in methods:
            seconds, passes[method] = time_once(pipe, layout, method, steps, seed)
            times[method].append(seconds)
    median = {m: statistics.median(t) for m, t in times.items()}
    base = median.get("none")
    for method in methods:
        ratio = f"{median[method] / base:.2f}" if base else "—"
        print(f"{method:<7} {median[method]:>8.3f} {ratio:>7} {passes[method]:>13}")
    if "mag" in median and base:
        runs = []
        for _ in range(6):  # the first is a warm-up
            start = time.perf_counter()
            guided_forward_backward(pipe, d["height"], args.device)
            runs.append(time.perf_counter() - start)
        extra = statistics.median(runs[1:])
        expected = base + passes["mag"] * extra
        print(f"MAG analytical: none + {passes['mag']} guided steps × {extra * 1000:.1f} ms (batch-1 forward+backward, "
              f"no hooks) = {expected:.3f} s; measured/analytical = {median['mag'] / expected:.3f}")

if __name__ == "__main__":
    main()
