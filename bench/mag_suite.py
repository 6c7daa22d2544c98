"""One MAG setting on the whole suite (26 layouts x 4 seeds), scored as ``evaluate`` scores it.

    OMP_NUM_THREADS=1 nice python bench/mag_suite.py --step normalized --alpha 0.03 --out outputs/suite_n003
    python bench/mag_suite.py --method none --out outputs/suite_none

Writes results.csv and summary.md in ``--out`` (``evaluate.write_reports``) and prints mean IoU,
fidelity and its parts. The README's calibration table (MAG on the embedded model) is these runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mag_explore.evaluate import evaluate, load_suite, write_reports  # noqa: E402
from mag_explore.models import load_pipeline, model_defaults  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mag")
    parser.add_argument("--step", default=None)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline("shapes", device="cpu", dtype=torch.float32)
    d = model_defaults(pipe)
    suite = load_suite(ROOT / "mag_explore" / "data" / "suites" / "shapes.json", d["height"], d["width"])
    options = {k: v for k, v in (("step", args.step), ("alpha", args.alpha)) if v is not None}
    rows, images = evaluate(pipe, suite, [args.method], list(range(args.seeds)), progress=False,
                            method_options={args.method: options}, image_dir=Path(args.out) / "images")
    write_reports(suite, [args.method], rows, images, args.out, f"{args.method} {options}")
    mean = lambda key: np.mean([float(r[key] == 1.0) if key == "present" else r[key] for r in rows])  # noqa: E731
    print(f"{args.method} {options}: IoU {mean('iou'):.3f}  fidelity {mean('fidelity'):.2f}  "
          f"all present {mean('present'):.2f}  shapes right {np.mean([r['shapes_ok'] for r in rows]):.2f}  "
          f"extra colour {np.mean([r['extra_colors'] > 0 for r in rows]):.2f}  s/image {mean('seconds'):.2f}")


if __name__ == "__main__":
    main()
