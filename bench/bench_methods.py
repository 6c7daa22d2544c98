"""Seconds per image of each method on the embedded shapes model (or any model), on this machine.

    python bench/bench_methods.py                         # shapes model, its default steps
    python bench/bench_methods.py --model /path/to/sd --steps 20 --device cuda

Every method runs the same prompt, layout and seeds; the first run of each is a warm-up.
Prints seconds per image (median), the ratio to "none", and the extra conditional-only
UNet passes the guidance methods made (MAG: one per guided step; layout guidance: up to
5 per guided step, fewer once its loss is under the threshold).
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

from mag_explore.evaluate import load_suite  # noqa: E402
from mag_explore.methods import METHOD_NAMES, make_controls  # noqa: E402
from mag_explore.models import load_pipeline, model_defaults  # noqa: E402
from mag_explore.sampling import generate  # noqa: E402

SUITE = ROOT / "mag_explore" / "data" / "suites" / "shapes.json"


def time_method(pipe, layout, method: str, steps, repeats: int) -> tuple[float, int]:
    """Median seconds per image over ``repeats`` seeds (after a warm-up), and extra UNet passes per image."""
    times, passes = [], 0
    for seed in range(repeats + 1):
        controls = make_controls(method, layout)  # the model's defaults, resolved when the run starts
        start = time.perf_counter()
        result = generate(pipe, layout.prompt, num_inference_steps=steps, seed=seed, controls=controls,
                          progress=False)
        if seed > 0:
            times.append(time.perf_counter() - start)
            passes = sum(len(diag.get("loss", [])) for diag in result.diagnostics.values())
    return statistics.median(times), passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--layout", default="left-right", help="name of a layout of mag_explore/data/suites/shapes.json")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=args.device, progress=False)
    d = model_defaults(pipe)
    suite = {s.name: s.layout for s in load_suite(SUITE, d["height"], d["width"])}
    if args.layout not in suite:
        raise SystemExit(f"error: no layout {args.layout!r}; the suite has {sorted(suite)}")
    layout, methods = suite[args.layout], args.methods.split(",")
    steps = args.steps or d["num_inference_steps"]
    print(f"model {args.model}, {d['height']}×{d['width']}, {steps} DDIM steps, CFG {d['guidance_scale']}, "
          f"prompt {layout.prompt!r}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} after a warm-up")
    print(f"{'method':<7} {'s/image':>8} {'× none':>7} {'extra passes':>13}")
    base = None
    for method in methods:
        seconds, passes = time_method(pipe, layout, method, steps, args.repeats)
        base = seconds if method == "none" else base
        ratio = f"{seconds / base:.2f}" if base else "—"
        print(f"{method:<7} {seconds:>8.3f} {ratio:>7} {passes:>13}")


if __name__ == "__main__":
    main()
