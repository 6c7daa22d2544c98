"""The README's frontier on the embedded model: every method and setting of its table, and the figure.

    OMP_NUM_THREADS=1 python bench/frontier.py --part baselines --out outputs/frontier &   # ~32 min
    OMP_NUM_THREADS=1 python bench/frontier.py --part mag --out outputs/frontier          # ~40 min
    python bench/frontier.py --plot --out outputs/frontier   # summary.md + docs/frontier_shapes.png

26 layouts x seeds 0-3, 50 DDIM steps, CFG 3, the shipped weights; each part writes
``<part>.csv`` in ``--out`` (run the two parts side by side, one per core). ``--plot`` reads
both, prints the bootstrap table with the README's names for the settings and draws the figure
with the settings the README discusses (the others stay in the table).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mag_explore.evaluate import evaluate, load_suite  # noqa: E402
from mag_explore.evaluate.report import bootstrap_summary, format_summary, plot_frontier, read_csv, write_csv  # noqa: E402
from mag_explore.evaluate.settings import DEFAULT, setting_label  # noqa: E402
from mag_explore.models import load_pipeline, model_defaults  # noqa: E402

PAPER = {"step_rule": "official", "alpha": 0.08, "lmbda": 0.5, "mask_mode": "nearest", "loss_fn": "official",
         "layer_sizes": [8, 16]}
EARLIER = {**PAPER, "step_rule": "normalized", "alpha": 0.03}  # the first calibrated default
BALANCED = {**EARLIER, "mask_mode": "area", "loss_fn": "balanced"}

# part -> method -> [(setting, its name in the README's table, its label in the figure or None)]
PARTS = {
    "baselines": {
        "none": [({}, "", "none")],
        "swap": [({}, "default (t > 700)", "default"), ({"while_t_above": 500}, "t > 500", "t>500")],
        "pww": [({}, "default (w 0.1)", "default"), ({"weight": 0.4}, "w 0.4", "w 0.4"),
                ({"weight": 1.0}, "w 1", "w 1")],
        "lg": [({}, "default (loss scale 30)", "default"), ({"loss_scale": 10}, "loss scale 10", "scale 10"),
               ({"loss_scale": 60}, "loss scale 60", "scale 60")],
    },
    "mag": {"mag": [
        (PAPER, "the paper's: official step α 0.08, λ 0.5, nearest masks, all layers", "paper (official step, α 0.08)"),
        ({**PAPER, "alpha": 0.3}, "official step α 0.3", None),
        (EARLIER, "normalized α 0.03 (the earlier default)", None),
        ({**EARLIER, "mask_mode": "area"}, "… area masks", "area masks, paper loss"),
        (BALANCED, "… area, balanced loss λ 0.5", "area, balanced λ 0.5"),
        ({**BALANCED, "lmbda": 2.0}, "… area, balanced λ 2", None),
        ({}, "**shipped: … area, balanced λ 1.25, 16×16 layers**", "default"),
        ({"lmbda": 1.0}, "… the same, λ 1 (shipped before)", None),  # on top of the star
        ({"lmbda": 2.0}, "… the same, λ 2", "16×16, balanced λ 2"),
    ]},
}


def run(part: str, out: Path) -> None:
    torch.set_num_threads(1)
    pipe = load_pipeline("shapes", device="cpu", dtype=torch.float32)
    d = model_defaults(pipe)
    suite = load_suite(ROOT / "mag_explore" / "data" / "suites" / "shapes.json", d["height"], d["width"])
    methods = list(PARTS[part])
    settings = {m: [s for s, _, _ in PARTS[part][m]] for m in methods}
    rows, _ = evaluate(pipe, suite, methods, [0, 1, 2, 3], settings=settings)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"{part}.csv")


def plot(out: Path) -> None:
    rows = [r for part in PARTS for r in read_csv(out / f"{part}.csv")]
    names = {(m, setting_label(s)): (name, label) for part in PARTS.values() for m, entries in part.items()
             for s, name, label in entries}
    summary = bootstrap_summary(rows, ["none", "swap", "pww", "lg", "mag"])
    table = [{**e, "setting": names[e["method"], e["setting"]][0]} for e in summary]
    text = format_summary(table, "The frontier on the embedded model (26 layouts x 4 seeds)")
    (out / "summary.md").write_text(text + "\n")
    print(text)
    shown = [{**e, "setting": DEFAULT if names[key][1] == "default" else names[key][1]}
             for e in summary if names[key := (e["method"], e["setting"])][1] is not None]
    plot_frontier(shown, ROOT / "docs" / "frontier_shapes.png",
                  title="The price of control on the embedded model (26 layouts × 4 seeds)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=sorted(PARTS))
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--out", default="outputs/frontier")
    args = parser.parse_args(argv)
    if args.part:
        run(args.part, Path(args.out))
    if args.plot:
        plot(Path(args.out))
    if not (args.part or args.plot):
        parser.error("give --part baselines, --part mag or --plot")


if __name__ == "__main__":
    main()
