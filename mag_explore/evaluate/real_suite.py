"""Layout suites for real models: the shipped COCO-MIG-like suite, and MIG_Bench box files.

``mag_explore/data/suites/real.json`` (written by ``make_real_suite.py`` next to it, from a
fixed seed: no data set is downloaded; its colors are ``COLOR_WORDS``) holds layouts of two to four COCO objects, each
with a color ("a red car, a blue dog and a green bench"), each in its own box, in the
suite format of ``mag_explore.layouts.suite``. Instance success checks the color: see
``instances``.

MIG_Bench (the COCO-MIG benchmark of MIGC) describes its layouts in a YAML file,
``mig_bench_anno.yaml``: ``{prompt: {"coco_id": N, phrase: [[x0, y0, x1, y1], ...], ...}}``
with coordinates relative to the image. ``mig_bench_suite`` turns such a file into our
suite format (one region per box), and the command line writes it out::

    python -m mag_explore.evaluate.real_suite mig_bench_anno.yaml --out mig_suite.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..layouts.suite import MAX_REGIONS

#: The attribute words of the real suite (and of COCO-MIG): a phrase whose first word is one
#: of these has an attribute, which instance success checks against the others.
COLOR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
def mig_bench_suite(path: str | Path, limit_regions: int = MAX_REGIONS) -> tuple[dict, list[str]]:
    """A MIG_Bench annotation file (YAML or JSON) as a suite, and what was left out and why.

    Each phrase's boxes become regions of that phrase; a prompt that does not contain a
    phrase, or has more than ``limit_regions`` boxes, is left out (and named in the list).
    """
    import yaml

    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)  # safe_load: no code in YAML
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected MIG_Bench's {{prompt: {{phrase: [[x0, y0, x1, y1], ...]}}}}")
    layouts, skipped = [], []
    for prompt, entry in data.items():
        regions = [{"phrase": phrase, "rect": _relative_box(box, f"{path}: {prompt!r}, {phrase!r}")}
                   for phrase, boxes in (entry or {}).items() if phrase != "coco_id" for box in boxes]
        missing = [r["phrase"] for r in regions if r["phrase"].lower() not in str(prompt).lower()]
        if missing or not 1 <= len(regions) <= limit_regions:
            skipped.append(f"{prompt!r}: " + (f"phrases {missing} are not in the prompt" if missing
                                              else f"{len(regions)} boxes (at most {limit_regions})"))
            continue
        name = f"{prompt} (coco {entry['coco_id']})" if "coco_id" in entry else str(prompt)
        layouts.append({"name": name, "prompt": str(prompt), "tags": [f"{len(regions)} instances"],
                        "regions": regions})
    if not layouts:
        raise ValueError(f"{path}: no usable layout ({'; '.join(skipped[:3])})")
    return {"about": f"converted from {path.name} by mag_explore.evaluate.real_suite", "layouts": layouts}, skipped


def _relative_box(box, where: str) -> list[float]:
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in box) or box[0] >= box[2] or box[1] >= box[3]):
        raise ValueError(f"{where}: box {box!r} must be [x0, y0, x1, y1] relative to the image, "
                         f"0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return [float(v) for v in box]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mag_explore.evaluate.real_suite",
                                     description="convert a MIG_Bench annotation file into a suite JSON")
    parser.add_argument("annotations", help="mig_bench_anno.yaml (or the same as JSON)")
    parser.add_argument("--out", required=True, help="the suite JSON to write")
    args = parser.parse_args(argv)
    try:
        suite, skipped = mig_bench_suite(args.annotations)
    except (OSError, ValueError) as error:  # a user's file: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(suite, indent=1) + "\n")
    print(f"wrote {args.out}: {len(suite['layouts'])} layouts; left out {len(skipped)}")
    for line in skipped:
        print(f"  left out {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
