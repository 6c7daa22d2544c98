"""Mask-IoU benchmark: every layout of a suite × every method × every seed, in one engine.

    python -m mag_explore evaluate --model shapes --suite mag_explore/data/suites/shapes.json \\
        --methods none,swap,mag,pww,lg --seeds 4 --out outputs/eval

For each image it segments the generated picture into one mask per region phrase and
compares it with the region: IoU per region, plus prompt fidelity where a scorer exists.
Writes to ``--out``:

* ``results.csv``: one row per image (method, layout, seed, per-region IoU, fidelity, seconds);
* ``summary.md`` / ``summary.json``: mean IoU per method with a 95 % bootstrap interval,
  and the paired difference to "none";
* ``grid.png``: the layouts (rows) and each method's image for the first seed (columns);
* ``images/<method>/layoutNN_seedS.png``: every image.

A long run can be split by methods over processes and joined with ``merge_runs``.

Segmentation: the embedded shapes model draws flat known colors, so ``color_segmenter``
reads each phrase's color word exactly (``mag_explore.shapes.segment_by_color``). For
Stable Diffusion pass your own segmenter, a callable ``(image HxWx3 uint8, phrases) ->
list of HxW bool masks`` (for example around a transformers segmentation model you have):
``evaluate(..., segmenter=my_segmenter)`` or ``--segmenter my_module:my_function`` on the
command line (the module is imported by name; no text is run as code). No such model runs
in CI. A sketch with CLIPSeg, if you have its weights::

    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor
    processor = CLIPSegProcessor.from_pretrained("CIDAS/clipseg-rd64-refined")
    model = CLIPSegForImageSegmentation.from_pretrained("CIDAS/clipseg-rd64-refined")

    def my_segmenter(image, phrases):
        inputs = processor(text=list(phrases), images=[image] * len(phrases), return_tensors="pt")
        logits = model(**inputs).logits.reshape(len(phrases), 352, 352)
        masks = torch.nn.functional.interpolate(logits[:, None], size=image.shape[:2])[:, 0]
        return list((masks.sigmoid() > 0.4).numpy())
"""
from __future__ import annotations

import csv
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .layouts import Layout, ellipse, polygon, rect
from .shapes.world import COLORS, mask_iou, score_image, segment_by_color

Segmenter = Callable[[np.ndarray, Sequence[str]], Sequence[np.ndarray]]
_SHAPE_MAKERS = {"rect": rect, "ellipse": ellipse, "polygon": polygon}
MAX_REGIONS = 3  # columns iou_1 … iou_3 in the CSV


@dataclass
class SuiteLayout:
    name: str
    layout: Layout
    tags: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- suites
def _region_shape(entry: dict, where: str):
    """One region of a suite: {"phrase": ..., "rect"|"ellipse"|"polygon": [...relative coords]}."""
    if not isinstance(entry, dict) or "phrase" not in entry:
        raise ValueError(f"{where}: a region must be an object with a 'phrase', got {entry!r}")
    kinds = [k for k in _SHAPE_MAKERS if k in entry]
    if len(kinds) != 1:
        raise ValueError(f"{where}: give exactly one of {list(_SHAPE_MAKERS)}, got keys {sorted(entry)}")
    kind, coords, phrase = kinds[0], entry[kinds[0]], entry["phrase"]
    # Previews in the phrase's own color where it names one of the shapes world's colors.
    color = entry.get("color") or next((COLORS[w] for w in str(phrase).split() if w in COLORS), None)
    if kind == "polygon":
        return polygon(phrase, [tuple(p) for p in coords], color=color)
    if not isinstance(coords, list) or len(coords) != 4:
        raise ValueError(f"{where}: {kind} needs 4 relative coordinates, got {coords!r}")
    return _SHAPE_MAKERS[kind](phrase, *coords, color=color)


def load_suite(path: str | Path, height: int, width: int) -> list[SuiteLayout]:
    """The layouts of a suite JSON, drawn at ``height`` × ``width`` (coordinates are relative)."""
    path = Path(path)
    data = json.loads(path.read_text())
    entries = data.get("layouts") if isinstance(data, dict) else None
    if not entries:
        raise ValueError(f"{path}: expected {{'layouts': [{{'name', 'prompt', 'regions'}}, ...]}}")
    suite, names = [], set()
    for i, entry in enumerate(entries):
        name = entry.get("name", f"layout {i}")
        if name in names:
            raise ValueError(f"{path}: layout name {name!r} appears twice")
        names.add(name)
        regions = entry.get("regions") or []
        if not 1 <= len(regions) <= MAX_REGIONS:
            raise ValueError(f"{path}: layout {name!r} has {len(regions)} regions; give 1 to {MAX_REGIONS}")
        shapes = [_region_shape(r, f"{path}: layout {name!r}, region {j + 1}") for j, r in enumerate(regions)]
        layout = Layout.from_shapes(height, width, shapes, prompt=entry["prompt"])
        suite.append(SuiteLayout(name, layout, tuple(entry.get("tags", ()))))
    return suite


# ---------------------------------------------------------------------------- reading images
def color_segmenter(image: np.ndarray, phrases: Sequence[str]) -> list[np.ndarray]:
    """Shapes world: the pixels of each phrase's color word (all of them, not one blob)."""
    found = segment_by_color(image)
    masks = []
    for phrase in phrases:
        colors = [w for w in phrase.split() if w in COLORS]
        if len(colors) != 1:
            raise ValueError(f"phrase {phrase!r} must name exactly one of the colors {list(COLORS)}")
        masks.append(found.get(colors[0], np.zeros(image.shape[:2], dtype=bool)))
    return masks


def shapes_fidelity(image: np.ndarray, prompt: str) -> dict:
    """Shapes world: requested objects present, shapes right, no other color (read by color)."""
    score = score_image(image, prompt)
    objects = score["objects"]
    present = float(np.mean([o["present"] for o in objects]))
    shapes_ok = float(np.mean([o["shape_ok"] for o in objects]))
    extra = len(score["unrequested"])
    return {"fidelity": float(shapes_ok == 1.0 and extra == 0), "present": present,
            "shapes_ok": shapes_ok, "extra_colors": extra}


def load_segmenter(spec: str) -> Segmenter:
    """``"package.module:function"`` -> that function (imported, never evaluated)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--segmenter {spec!r}: write it as package.module:function")
    function = getattr(importlib.import_module(module), name, None)
    if not callable(function):
        raise ValueError(f"--segmenter {spec!r}: {module} has no function {name!r}")
    return function


# ---------------------------------------------------------------------------- running
def check_methods(methods: Sequence[str]) -> None:
    from .methods import METHOD_NAMES

    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown or list(methods)}; use some of {list(METHOD_NAMES)}")


def _controls(method: str, layout: Layout, defaults: dict, options: dict) -> list:
    from .methods import make_controls

    # method_options (e.g. {"mag": {"alpha": 0.1}}); the rest are the model's defaults, resolved at the start
    return make_controls(method, layout, **options.get(method, {}))


def evaluate(pipe, suite: Sequence[SuiteLayout], methods: Sequence[str], seeds: Sequence[int], *,
             segmenter: Segmenter | None = None, fidelity: Callable[[np.ndarray, str], dict] | None = None,
             num_inference_steps: int | None = None, method_options: dict | None = None,
             image_dir: str | Path | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Generate every (layout, method, seed); returns the CSV rows and the first seed's images.

    ``segmenter`` defaults to ``color_segmenter`` and ``fidelity`` to ``shapes_fidelity``
    (both for the shapes world); ``method_options`` maps a method to extra options, e.g.
    ``{"pww": {"weight": 0.4}}``. With ``image_dir`` every image is also saved as a PNG
    (``image_path``), to look at the failures behind a number.
    """
    from .models import model_defaults
    from .sampling import generate

    check_methods(methods)
    segmenter = segmenter or color_segmenter
    fidelity = fidelity if fidelity is not None else (shapes_fidelity if segmenter is color_segmenter else None)
    defaults, options = model_defaults(pipe), method_options or {}
    rows, images = [], {}
    bar = tqdm(total=len(suite) * len(methods) * len(seeds), desc="evaluate", unit="image", disable=not progress)
    for index, item in enumerate(suite):
        phrases = item.layout.labels
        for method in methods:
            for seed in seeds:
                controls = _controls(method, item.layout, defaults, options)
                start = time.perf_counter()
                result = generate(pipe, item.layout.prompt, num_inference_steps=num_inference_steps, seed=seed,
                                  controls=controls, progress=False)
                seconds = time.perf_counter() - start
                image = np.asarray(result.images[0])
                rows.append(_row(item, method, seed, image, phrases, segmenter, fidelity, seconds))
                if seed == seeds[0]:
                    images[(item.name, method)] = image
                if image_dir is not None:
                    path = image_path(image_dir, index, method, seed)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    result.images[0].save(path)
                bar.update()
    bar.close()
    return rows, images


def image_path(image_dir: str | Path, index: int, method: str, seed: int) -> Path:
    """Where ``evaluate`` saves the image of the suite's ``index``-th layout."""
    return Path(image_dir) / method / f"layout{index:02d}_seed{seed}.png"


def _row(item, method, seed, image, phrases, segmenter, fidelity, seconds) -> dict:
    masks = list(segmenter(image, phrases))
    if len(masks) != len(phrases):
        raise ValueError(f"the segmenter returned {len(masks)} masks for {len(phrases)} phrases {phrases}")
    ious = [mask_iou(np.asarray(m, bool), r.mask) for m, r in zip(masks, item.layout.regions)]
    row = {"method": method, "layout": item.name, "seed": seed, "regions": len(ious),
           "iou": float(np.mean(ious))}
    row.update({f"iou_{i + 1}": (ious[i] if i < len(ious) else "") for i in range(MAX_REGIONS)})
    scores = fidelity(image, item.layout.prompt) if fidelity else {}
    row.update({k: scores.get(k, "") for k in ("fidelity", "present", "shapes_ok", "extra_colors")})
    row["seconds"] = seconds
    return row


# ---------------------------------------------------------------------------- summary
def bootstrap_summary(rows: Sequence[dict], methods: Sequence[str], resamples: int = 2000,
                      seed: int = 0) -> list[dict]:
    """Mean IoU per method with a 95 % percentile-bootstrap interval, and its difference to "none".

    The unit resampled is the *layout* (the seeds of one layout are not independent draws),
    and every method is resampled with the same draws, so the differences are paired.
    """
    layouts = sorted({r["layout"] for r in rows})
    per_layout = {m: np.array([np.mean([r["iou"] for r in rows if r["method"] == m and r["layout"] == name])
                               for name in layouts]) for m in methods}
    draws = np.random.default_rng(seed).integers(0, len(layouts), size=(resamples, len(layouts)))
    summary = []
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        boot = per_layout[method][draws].mean(1)
        entry = {"method": method, "images": len(chosen), "mean_iou": float(per_layout[method].mean()),
                 "ci_low": float(np.percentile(boot, 2.5)), "ci_high": float(np.percentile(boot, 97.5)),
                 "seconds": float(np.mean([r["seconds"] for r in chosen]))}
        fid = [r["fidelity"] for r in chosen if r["fidelity"] != ""]
        entry["fidelity"] = float(np.mean(fid)) if fid else None
        if "none" in per_layout and method != "none":
            diff = per_layout[method] - per_layout["none"]
            boot_diff = diff[draws].mean(1)
            entry.update(gain=float(diff.mean()), gain_low=float(np.percentile(boot_diff, 2.5)),
                         gain_high=float(np.percentile(boot_diff, 97.5)))
        summary.append(entry)
    return summary


def format_summary(summary: Sequence[dict], title: str = "") -> str:
    """A Markdown table of ``bootstrap_summary``."""
    lines = [title, ""] if title else []
    lines += ["| method | images | mean IoU [95 % CI] | Δ vs none [95 % CI] | fidelity | s / image |",
              "|---|---:|---|---|---:|---:|"]
    for e in summary:
        gain = f"{e['gain']:+.3f} [{e['gain_low']:+.3f}, {e['gain_high']:+.3f}]" if "gain" in e else "—"
        fid = "—" if e["fidelity"] is None else f"{e['fidelity']:.2f}"
        lines.append(f"| {e['method']} | {e['images']} | {e['mean_iou']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}] "
                     f"| {gain} | {fid} | {e['seconds']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- files
def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path: str | Path) -> list[dict]:
    """Rows written by ``write_csv``, with numbers as numbers again (blank cells stay "")."""
    ints, strings = {"seed", "regions", "extra_colors"}, {"method", "layout"}
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            rows.append({k: v if k in strings or v == "" else (int(v) if k in ints else float(v))
                         for k, v in raw.items()})
    return rows


def plot_grid(suite: Sequence[SuiteLayout], methods: Sequence[str], images: dict, rows: Sequence[dict],
              path: Path, seed: int) -> None:
    """Rows: layouts; columns: the layout, then each method's image (first seed), titled with its IoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iou = {(r["layout"], r["method"]): r["iou"] for r in rows if r["seed"] == seed}
    cols = 1 + len(methods)
    fig, axes = plt.subplots(len(suite), cols, figsize=(1.35 * cols, 1.45 * len(suite)), squeeze=False)
    for ax_row, item in zip(axes, suite):
        ax_row[0].imshow(item.layout.color_image())
        ax_row[0].set_title(item.layout.prompt.replace(" and ", " &\n").replace(", ", ",\n"), fontsize=5)
        for ax, method in zip(ax_row[1:], methods):
            ax.imshow(images[(item.name, method)])
            ax.set_title(f"{method}  IoU {iou[(item.name, method)]:.2f}", fontsize=6)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_evaluation(model: str | None, suite_path: str | Path, methods: Sequence[str], seeds: int, out: str | Path,
                   *, steps: int | None = None, device: str | None = None, segmenter: str | None = None,
                   progress: bool = True) -> str:
    """What ``python -m mag_explore evaluate`` does; returns the summary table."""
    from .models import load_pipeline, model_defaults

    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: need at least 1")
    check_methods(methods)
    pipe = load_pipeline(model, device=device)
    defaults = model_defaults(pipe)
    suite = load_suite(suite_path, defaults["height"], defaults["width"])
    seed_list = list(range(seeds))
    rows, images = evaluate(pipe, suite, methods, seed_list, num_inference_steps=steps, progress=progress,
                            segmenter=load_segmenter(segmenter) if segmenter else None,
                            image_dir=Path(out) / "images")
    title = (f"{len(suite)} layouts × {seeds} seeds, model {model or 'default'}, "
             f"{steps or defaults['num_inference_steps']} steps; 95 % CI: bootstrap over layouts")
    return write_reports(suite, methods, rows, images, out, title)


def write_reports(suite: Sequence[SuiteLayout], methods: Sequence[str], rows: Sequence[dict], images: dict,
                  out: str | Path, title: str) -> str:
    """results.csv, summary.md, summary.json and grid.png in ``out``; returns the summary table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    summary = bootstrap_summary(rows, methods)
    table = format_summary(summary, title)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_grid(suite, methods, images, rows, out / "grid.png", min(r["seed"] for r in rows))
    return table + f"\n\nwrote {out / 'results.csv'}, {out / 'summary.md'}, {out / 'grid.png'}"


def merge_runs(suite: Sequence[SuiteLayout], run_dirs: Sequence[str | Path], out: str | Path, title: str) -> str:
    """Join runs of the same suite made with different ``--methods`` (e.g. in parallel processes).

    Each run folder needs its results.csv and images/ (the command writes both).
    """
    rows = [row for d in run_dirs for row in read_csv(Path(d) / "results.csv")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seed = min(r["seed"] for r in rows)
    images = {(item.name, method): _find_image(run_dirs, index, method, seed)
              for index, item in enumerate(suite) for method in methods}
    return write_reports(suite, methods, rows, images, out, title)


def _find_image(run_dirs: Sequence[str | Path], index: int, method: str, seed: int) -> np.ndarray:
    for folder in run_dirs:
        path = image_path(Path(folder) / "images", index, method, seed)
        if path.exists():
            return np.asarray(Image.open(path).convert("RGB"))
    raise FileNotFoundError(f"no image of layout {index}, method {method!r}, seed {seed} in {list(run_dirs)}")
