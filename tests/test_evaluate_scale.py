"""Sweeps, the frontier figure, resuming and sharding of the evaluation (tiny SD1.5-like model, 5 steps)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mag_explore import cli
from mag_explore.evaluate import (bootstrap_summary, evaluate, load_suite, parse_sweeps, plot_frontier, read_csv,
                                  run_evaluation, setting_label, work_items)

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "mag_explore" / "data" / "suites" / "shapes.json"
SWEEP = ["swap.step_range=0:1", "pww.weight=0.4,2", "lg.loss_scale=5", "mag.alpha=0.5", "mag.lmbda=1.0"]


@pytest.fixture
def small_suite(tmp_path):
    suite = {"layouts": [json.loads(SUITE.read_text())["layouts"][i] for i in (0, 6)]}  # 1 and 2 regions
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite))
    return path


def test_parse_sweeps_reads_values_combines_options_and_names_bad_specs():
    sweeps = parse_sweeps(["mag.alpha=0.02,0.1", "mag.lmbda=1", "swap.step_range=0:10,5:", "pww.weight=.4",
                           "mag.mask_mode=area", "lg.while_t_above=600"])
    assert sweeps["swap"] == [{}, {"step_range": (0, 10)}, {"step_range": (5, None)}]
    assert sweeps["lg"] == [{}, {"while_t_above": 600}]
    assert sweeps["pww"] == [{}, {"weight": 0.4}]
    # one method's options combine as a grid; the default comes first
    assert sweeps["mag"] == [{}, {"alpha": 0.02, "lmbda": 1, "mask_mode": "area"},
                             {"alpha": 0.1, "lmbda": 1, "mask_mode": "area"}]
    assert setting_label({"lmbda": 1.0, "alpha": 0.05}) == "alpha=0.05 lmbda=1"  # sorted: one label per setting
    assert setting_label({"step_range": (0, 10)}) == "step_range=0:10" and setting_label({}) == "default"
    for spec, message in [("mag.alpha", "method.option=v1,v2"), ("alpha=0.1", "method.option=v1,v2"),
                          ("mag.alpha=1;2", "cannot read the value '1;2'"), ("none.x=1", "'none' has no settings"),
                          ("lg.loss_scale=__import__('os')", "cannot read the value")]:
        with pytest.raises(ValueError, match=message):
            parse_sweeps([spec])
    with pytest.raises(ValueError, match="'mag' is not among the evaluated methods"):
        parse_sweeps(["mag.alpha=1"], methods=["none", "swap"])


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_a_sweep_writes_one_row_per_setting_and_image(sd15_pipe, small_suite, tmp_path):
    suite = load_suite(small_suite, 64, 64)
    settings = parse_sweeps(SWEEP)
    methods = ["none", "swap", "pww", "lg", "mag"]
    rows, images = evaluate(sd15_pipe, suite, methods, [0, 1], settings=settings, num_inference_steps=5,
                            image_dir=tmp_path / "images", progress=False)
    # per layout and seed: none 1, swap 2, pww 3, lg 2, mag 2 settings
    assert len(rows) == 2 * 2 * (1 + 2 + 3 + 2 + 2)
    keys = [(r["layout"], r["method"], r["setting"], r["seed"]) for r in rows]
    assert len(set(keys)) == len(keys)
    assert {r["setting"] for r in rows if r["method"] == "pww"} == {"default", "weight=0.4", "weight=2"}
    assert {r["setting"] for r in rows if r["method"] == "mag"} == {"default", "alpha=0.5 lmbda=1"}
    assert sorted(images) == sorted((item.name, m) for item in suite for m in methods)  # default setting only
    # a setting really reaches the control: paint-with-words at w=2 draws another image than at w=0.4
    pww = {p.name: np.asarray(__import__("PIL.Image").Image.open(p)) for p in (tmp_path / "images" / "pww").rglob("*")
           if p.is_file() and p.name == "layout01_seed0.png" and p.parent.name.startswith("weight")}
    assert len(pww) == 1 and (tmp_path / "images" / "pww" / "weight=2" / "layout01_seed0.png").exists()
    weak = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "images" / "pww" / "weight=0.4" / "layout01_seed0.png"))
    strong = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "images" / "pww" / "weight=2" / "layout01_seed0.png"))
    assert np.abs(weak.astype(int) - strong.astype(int)).max() > 0
    summary = bootstrap_summary(rows, methods)
    assert [(e["method"], e["setting"]) for e in summary][:4] == [
        ("none", "default"), ("swap", "default"), ("swap", "step_range=0:1"), ("pww", "default")]
    for entry in summary:
        chosen = [r for r in rows if (r["method"], r["setting"]) == (entry["method"], entry["setting"])]
        # two layouts with two seeds each: the mean of layout means is the mean of all four
        assert entry["mean_iou"] == pytest.approx(np.mean([r["iou"] for r in chosen]))
        assert entry["no_extra_color"] == pytest.approx(np.mean([r["extra_colors"] == 0 for r in chosen]))


def frontier_rows() -> list[dict]:
    """Rows of two layouts × 2 seeds for a made-up frontier: more alpha, more IoU, less fidelity."""
    rows = []
    points = {("none", "default"): (0.1, 1), ("swap", "default"): (0.2, 1), ("swap", "step_range=0:25"): (0.3, 0),
              ("mag", "default"): (0.4, 1), ("mag", "alpha=0.1"): (0.3, 1), ("mag", "alpha=1"): (0.6, 0),
              ("pww", "default"): (0.12, 1), ("lg", "default"): (0.25, 0)}
    for (method, setting), (iou, fid) in points.items():
        for layout in ("A", "B"):
            for seed in (0, 1):
                rows.append({"method": method, "setting": setting, "layout": layout, "seed": seed, "iou": iou,
                             "fidelity": float(fid if seed == 0 else 1), "present": 1.0,
                             "shapes_ok": float(fid if seed == 0 else 1), "extra_colors": 0, "seconds": 1.0})
    return rows


def test_the_frontier_figure_has_one_line_per_method_through_its_settings(tmp_path):
    summary = bootstrap_summary(frontier_rows(), ["none", "swap", "mag", "pww", "lg"])
    figure = plot_frontier(summary, tmp_path / "frontier.png")
    ax = figure.axes[0]
    lines = {c.get_label(): c for c in ax.containers}
    assert sorted(lines) == ["lg", "mag", "none (no control)", "pww", "swap"]
    x, y = lines["mag"].lines[0].get_data()  # through its settings, from the most faithful to the least
    assert list(x) == pytest.approx([1.0, 1.0, 0.5]) and list(y) == pytest.approx([0.3, 0.4, 0.6])
    stars = [line for line in ax.get_lines() if line.get_marker() == "*" and len(line.get_xdata())]
    assert len(stars) == 4  # the default of each controlled method
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


def comparable(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


class StopAfter:
    """A color segmenter that raises KeyboardInterrupt on its n-th call (Ctrl-C in the middle of a run)."""

    def __init__(self, n: int | None):
        from mag_explore.evaluate import color_segmenter

        self.n, self.calls, self.segment = n, 0, color_segmenter
        self.__name__ = "color_segmenter"

    def __call__(self, image, phrases):
        self.calls += 1
        if self.n is not None and self.calls == self.n:
            raise KeyboardInterrupt
        return self.segment(image, phrases)


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_an_interrupted_run_resumes_with_only_the_missing_images(sd15_folder, small_suite, tmp_path):
    run = lambda out, segmenter, **kw: run_evaluation(str(sd15_folder), small_suite, ["none", "mag"], 2, out,
                                                       num_inference_steps=5, segmenter=segmenter,
                                                       sweeps=["mag.alpha=0.5"],
                                                       progress=False, **kw)
    whole = StopAfter(None)
    run(tmp_path / "whole", whole)
    assert whole.calls == 2 * 2 * 3  # layouts × seeds × (none, mag default, mag alpha 0.5)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", StopAfter(5))
    assert len(read_csv(tmp_path / "cut" / "parts" / "rank0.csv")) == 4  # the rows before the interruption
    resumed = StopAfter(None)
    text = run(tmp_path / "cut", resumed)
    assert resumed.calls == 12 - 4 and "4 of 12 images were already" in text
    assert comparable(read_csv(tmp_path / "cut" / "results.csv")) == comparable(
        read_csv(tmp_path / "whole" / "results.csv"))
    assert not (tmp_path / "cut" / "parts").exists() and (tmp_path / "cut" / "summary.md").exists()
    again = StopAfter(None)
    run(tmp_path / "cut", again)  # everything is there: nothing to generate
    assert again.calls == 0
    fresh = StopAfter(None)
    run(tmp_path / "cut", fresh, fresh=True)
    assert fresh.calls == 12


@pytest.mark.slow  # a subprocess, a whole evaluation or a long inversion
def test_a_run_with_other_settings_is_refused(sd15_folder, small_suite, tmp_path, capsys):
    args = ["evaluate", "--model", str(sd15_folder), "--suite", str(small_suite), "--methods", "none",
            "--seeds", "1", "--out", str(tmp_path / "out")]
    assert cli.main(args + ["--steps", "5"]) == 0
    capsys.readouterr()
    assert cli.main(args + ["--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "refusing to mix them" in err and "num_inference_steps: 5 there, 6 now" in err and "Traceback" not in err
    assert len(read_csv(tmp_path / "out" / "results.csv")) == 2  # untouched
    assert cli.main(args + ["--steps", "6", "--fresh"]) == 0


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_two_torchrun_processes_give_the_rows_of_one(sd15_folder, small_suite, tmp_path, free_port):
    common = ["-m", "mag_explore", "evaluate", "--model", str(sd15_folder), "--suite", str(small_suite),
              "--methods", "none,swap,mag", "--seeds", "2", "--steps", "5", "--sweep", "mag.alpha=0.5",
              "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    assert cli.main(common[2:] + ["--out", str(tmp_path / "one")]) == 0  # one process: this one
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port)] + common +
                         ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "in 2 processes" in two.stdout
    rows_one, rows_two = read_csv(tmp_path / "one" / "results.csv"), read_csv(tmp_path / "two" / "results.csv")
    assert len(rows_one) == 2 * 2 * 4
    assert comparable(rows_two) == comparable(rows_one)
    suite = load_suite(small_suite, 64, 64)
    assert [(r["layout"], r["method"], r["setting"], r["seed"]) for r in rows_two] == [
        i.key for i in work_items(suite, ["none", "swap", "mag"], [0, 1], parse_sweeps(["mag.alpha=0.5"]))]
    assert all((tmp_path / "two" / name).exists() for name in ("grid.png", "summary.md", "frontier.png"))
