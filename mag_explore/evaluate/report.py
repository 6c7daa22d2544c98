"""What an evaluation writes: the CSV, the bootstrap summary, the image grid, the frontier figure."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .metrics import bootstrap_draws, bootstrap_interval
from ..plots import FONT
from ..layouts.suite import SuiteLayout
from .run import ROW_FIELDS
from .settings import DEFAULT

# summary name: how a row scores it (None: the row has no fidelity scores)
FIDELITY_MEASURES = {
    "fidelity": lambda r: float(r["fidelity"]),
    "colors_present": lambda r: float(float(r["present"]) == 1.0),
    "no_extra_color": lambda r: float(int(r["extra_colors"]) == 0),
    "right_shape": lambda r: float(float(r["shapes_ok"]) == 1.0),
}
# summary name -> (column of a real-image segmenter's rows, table heading); see instances.py
REAL_MEASURES = {"instance_success": ("instances", "instance success"), "image_success": ("success", "image success"),
                 "box_iou": ("box_iou", "box mIoU"), "clip_score": ("clip_score", "CLIP score"),
                 "clip_regions": ("clip_regions", "CLIP in boxes")}


# ---------------------------------------------------------------------------- summary
def groups_of(rows: Sequence[dict], methods: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(method, setting) pairs in the order of ``methods``, then of first appearance."""
    seen = list(dict.fromkeys((r["method"], r.get("setting", DEFAULT)) for r in rows))
    order = {m: i for i, m in enumerate(methods or [])}
    return sorted(seen, key=lambda g: order.get(g[0], len(order)))  # stable: settings keep their order


def bootstrap_summary(rows: Sequence[dict], methods: Sequence[str] | None = None, resamples: int = 2000,
                      seed: int = 0) -> list[dict]:
    """Per method and setting: mean IoU and fidelity scores with 95 % bootstrap intervals.

    The unit resampled is the *layout* (the seeds of one layout are not independent draws),
    and every group is resampled with the same draws, so the difference to "none" (its
    default setting) is paired. Fidelity is reported as a whole and as each of its parts:
    every requested color present, no unrequested color, every shape right.
    """
    layouts = sorted({r["layout"] for r in rows})
    draws = bootstrap_draws(len(layouts), resamples, seed)
    groups = groups_of(rows, methods)
    members = {g: [r for r in rows if (r["method"], r.get("setting", DEFAULT)) == g] for g in groups}

    def per_layout(group, score) -> np.ndarray:
        values = []
        for name in layouts:
            scores = [score(r) for r in members[group] if r["layout"] == name]
            if not scores:
                raise ValueError(f"{group[0]} ({group[1]}) has no row for layout {name!r}: the run is incomplete")
            values.append(np.mean(scores))
        return np.array(values)

    iou = {g: per_layout(g, lambda r: r["iou"]) for g in groups}
    summary = []
    for group in groups:
        chosen = members[group]
        mean, low, high = bootstrap_interval(iou[group], draws)
        entry = {"method": group[0], "setting": group[1], "images": len(chosen), "mean_iou": mean,
                 "ci_low": low, "ci_high": high, "seconds": float(np.mean([r["seconds"] for r in chosen]))}
        scored = all(r.get("fidelity", "") != "" for r in chosen)
        for name, score in FIDELITY_MEASURES.items():
            entry[name] = None
            if scored:
                entry[name], entry[f"{name}_low"], entry[f"{name}_high"] = bootstrap_interval(
                    per_layout(group, score), draws)
        for name, (column, _) in REAL_MEASURES.items():  # only where every row has the column
            entry[name] = None
            if all(r.get(column, "") != "" for r in chosen):
                entry[name], entry[f"{name}_low"], entry[f"{name}_high"] = bootstrap_interval(
                    per_layout(group, lambda r, c=column: float(r[c])), draws)
        peaks = [float(r["peak_mib"]) for r in chosen if r.get("peak_mib", "") != ""]
        entry["peak_mib"] = max(peaks) if peaks else None  # the most one image needed: what a GPU must hold
        if ("none", DEFAULT) in iou and group[0] != "none":
            entry["gain"], entry["gain_low"], entry["gain_high"] = bootstrap_interval(
                iou[group] - iou[("none", DEFAULT)], draws)
        summary.append(entry)
    return summary


def format_summary(summary: Sequence[dict], title: str = "") -> str:
    """A Markdown table of ``bootstrap_summary`` (a setting column when any setting is swept)."""
    swept = any(e.get("setting", DEFAULT) != DEFAULT for e in summary)
    real = any(e.get("instance_success") is not None for e in summary)  # a real-image segmenter's columns
    memory = any(e.get("peak_mib") is not None for e in summary)  # only runs on a GPU measure it
    lines = [title, ""] if title else []
    quality = ([f"{h} [95 % CI]" if n == "instance_success" else h for n, (_, h) in REAL_MEASURES.items()] if real
               else ["fidelity [95 % CI]", "colors present", "no extra color", "right shape"])
    head = ["method"] + (["setting"] if swept else []) + [
        "images", "mean IoU [95 % CI]", "Δ vs none [95 % CI]"] + quality + ["s / image"] + (
        ["peak GPU MiB"] if memory else [])
    lines += ["| " + " | ".join(head) + " |",
              "|" + "|".join("---:" if h in ("images", "s / image", "peak GPU MiB") else "---" for h in head) + "|"]
    for e in summary:
        gain = f"{e['gain']:+.3f} [{e['gain_low']:+.3f}, {e['gain_high']:+.3f}]" if "gain" in e else "—"
        cells = [e["method"]] + ([e.get("setting", DEFAULT)] if swept else []) + [
            str(e["images"]), f"{e['mean_iou']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]", gain]
        interval = "instance_success" if real else "fidelity"  # the one measure shown with its interval
        for name in (REAL_MEASURES if real else FIDELITY_MEASURES):
            if e.get(name) is None:
                cells.append("—")
            elif name == interval:
                cells.append(f"{e[name]:.2f} [{e[name + '_low']:.2f}, {e[name + '_high']:.2f}]")
            else:
                cells.append(f"{e[name]:.3g}" if name.startswith("clip") else f"{e[name]:.2f}")
        cells.append(f"{e['seconds']:.2f}")
        if memory:
            cells.append("—" if e.get("peak_mib") is None else f"{e['peak_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CSV
def _cell(value):
    return f"{value:.4f}" if isinstance(value, float) else value


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(row.get(k, DEFAULT if k == "setting" else "")) for k in ROW_FIELDS}
                         for row in rows)


class RowJournal:
    """Appends rows to a CSV as they come, flushed at once: an interrupted run loses none."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=ROW_FIELDS).writeheader()

    def __call__(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore").writerow(
                {k: _cell(row.get(k, "")) for k in ROW_FIELDS})
            f.flush()


def read_csv(path: str | Path) -> list[dict]:
    """Rows written by ``write_csv`` or a ``RowJournal``, with numbers as numbers again.

    Blank cells stay ""; a last line cut short by a killed process is left out; files
    from before sweeps existed (no "setting" column) read as the default setting.
    """
    ints, strings = {"seed", "regions", "extra_colors"}, {"method", "layout", "setting"}
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            if None in raw.values() or None in raw:  # a line cut short, or one with extra cells
                continue
            row = {k: v if k in strings or v == "" else (int(v) if k in ints else float(v)) for k, v in raw.items()}
            row.setdefault("setting", DEFAULT)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------- figures
def _figure(**kwargs):
    """A figure outside pyplot, for a file only: no global state and no backend switch
    (``matplotlib.use`` here would stop a notebook from showing any later figure)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def plot_grid(suite: Sequence[SuiteLayout], methods: Sequence[str], images: dict, rows: Sequence[dict],
              path: Path, seed: int) -> None:
    """Rows: layouts; columns: the layout, then each method's image (first seed, default setting)."""
    iou = {(r["layout"], r["method"]): r["iou"] for r in rows if r["seed"] == seed
           and r.get("setting", DEFAULT) == DEFAULT}
    cols = 1 + len(methods)
    fig = _figure(figsize=(2.6 * cols, 2.8 * len(suite)))
    axes = fig.subplots(len(suite), cols, squeeze=False)  # legible at FONT pt
    for ax_row, item in zip(axes, suite):
        ax_row[0].imshow(item.layout.color_image())
        ax_row[0].set_title(item.layout.prompt.replace(" and ", " &\n").replace(", ", ",\n"), fontsize=FONT)
        for ax, method in zip(ax_row[1:], methods):
            if (item.name, method) in images:
                ax.imshow(images[(item.name, method)])
                ax.set_title(f"{method}  IoU {iou[(item.name, method)]:.2f}", fontsize=FONT)
            else:  # an image that is not on this machine (a multi-node run without a shared --out)
                ax.set_title(f"{method}: no image here", fontsize=FONT)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_frontier(summary: Sequence[dict], path: Path | None = None, title: str = ""):
    """Mean mask IoU against prompt fidelity: one line per method through its settings
    (ordered from the most faithful to the least, so each line reads as a trade-off).

    The default setting of each method is a star, "none" (no control) a black cross;
    error bars are the 95 % bootstrap intervals. Returns the figure (None without fidelity).
    """
    if not summary or any(e["fidelity"] is None for e in summary):
        return None
    import matplotlib.pyplot as plt  # a pyplot figure, so that a notebook shows it like every other plot

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    by_method: dict[str, list[dict]] = {}
    for entry in summary:
        by_method.setdefault(entry["method"], []).append(entry)
    for method, entries in by_method.items():
        # along the trade-off: from the most faithful setting to the least (then by IoU)
        entries = sorted(entries, key=lambda e: (-e["fidelity"], e["mean_iou"]))
        x = [e["fidelity"] for e in entries]
        y = [e["mean_iou"] for e in entries]
        xerr = _error_bars(entries, "fidelity")
        yerr = np.array([[e["mean_iou"] - e["ci_low"], e["ci_high"] - e["mean_iou"]] for e in entries]).T
        if method == "none":
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="X", color="black", markersize=11, capsize=2,
                        label="none (no control)")
            continue
        line = ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o-", markersize=5, capsize=2, alpha=0.9, label=method)
        color = line.lines[0].get_color()
        for e in entries:
            if e["setting"] == DEFAULT:
                ax.plot([e["fidelity"]], [e["mean_iou"]], "*", color=color, markersize=17,
                        markeredgecolor="black", zorder=5)
            else:
                ax.annotate(e["setting"], (e["fidelity"], e["mean_iou"]), fontsize=FONT, color=color,
                            xytext=(4, 3), textcoords="offset points")
    ax.plot([], [], "*", color="gray", markeredgecolor="black", markersize=14, label="★ default setting")
    ax.set_xlabel("prompt fidelity (every color present, no extra color, shapes right)", fontsize=11)
    ax.set_ylabel("mean mask IoU with the layout", fontsize=11)
    ax.set_title(title or "The price of control: placement against prompt fidelity, per method and setting",
                 fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=FONT, loc="best")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _error_bars(entries: Iterable[dict], name: str) -> np.ndarray:
    return np.array([[e[name] - e[f"{name}_low"], e[f"{name}_high"] - e[name]] for e in entries]).T
