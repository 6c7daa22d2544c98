"""The mask-IoU benchmark: suites, reading images back, the bootstrap summary, the CLI."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mag_explore import cli
from mag_explore.evaluate import (bootstrap_summary, color_segmenter, load_segmenter, load_suite, merge_runs,
                                  read_csv, shapes_fidelity)
from mag_explore.shapes.world import COLORS, SHAPES, render

SUITE = Path(__file__).resolve().parent.parent / "mag_explore" / "data" / "suites" / "shapes.json"


def test_the_shapes_suite_is_varied_and_resolves(tiny_tokenizer):
    suite = load_suite(SUITE, 64, 64)
    raw = json.loads(SUITE.read_text())["layouts"]  # what the file holds, read without our loader
    assert [item.name for item in suite] == [entry["name"] for entry in raw] and len(suite) == 26
    assert [len(item.layout) for item in suite] == [len(entry["regions"]) for entry in raw]
    assert {len(item.layout) for item in suite} == {1, 2, 3}
    assert sum("contradicts" in item.tags for item in suite if len(item.layout) == 2) == 7
    centres = set()
    for item in suite:
        resolved = item.layout.resolve(tiny_tokenizer)  # every phrase is in its prompt
        for region in resolved.regions:
            color, shape = region.phrase.split()
            assert color in COLORS and shape in SHAPES
            assert 0.02 <= region.area <= 0.3
            ys, xs = np.nonzero(region.mask)
            centres.add((int(xs.mean() // 8), int(ys.mean() // 8)))  # cell of an 8×8 grid
        masks = item.layout.masks
        assert not (masks.sum(0) > 1).any(), f"{item.name}: regions overlap"
    assert len(centres) >= 20  # objects all over the image, not in a few spots


@pytest.mark.parametrize("region, message", [
    ({"phrase": "red circle", "rect": [0, 0, 1]}, "rect needs 4 relative coordinates"),
    ({"phrase": "red circle", "rect": [0, 0, 1, 1], "ellipse": [0.5, 0.5, 0.1, 0.1]}, "exactly one of"),
    ({"rect": [0, 0, 1, 1]}, "must be an object with a 'phrase'"),
])
def test_bad_suite_regions_are_named(tmp_path, region, message):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"layouts": [{"name": "x", "prompt": "a red circle", "regions": [region]}]}))
    with pytest.raises(ValueError, match=message):
        load_suite(path, 64, 64)


def test_color_segmenter_and_fidelity_read_a_drawn_scene_exactly():
    objects = [("red", "circle", 18.0, 20.0, 24.0), ("blue", "square", 46.0, 44.0, 22.0)]
    image, masks = render(objects, np.array([240.0, 240.0, 240.0]))
    found = color_segmenter(image, ["red circle", "blue square"])
    for got, truth in zip(found, masks):
        assert (got & truth).sum() / (got | truth).sum() > 0.9
    assert shapes_fidelity(image, "a red circle and a blue square") == {
        "fidelity": 1.0, "present": 1.0, "shapes_ok": 1.0, "extra_colors": 0}
    wrong = shapes_fidelity(image, "a red triangle")
    assert wrong["fidelity"] == 0.0 and wrong["extra_colors"] == 1 and wrong["shapes_ok"] == 0.0
    assert not color_segmenter(image, ["green circle"])[0].any()  # absent color: empty mask
    with pytest.raises(ValueError, match="'big circle' must name exactly one of the colors"):
        color_segmenter(image, ["big circle"])


def rows_for(values: dict) -> list[dict]:
    """Rows for {method: [[iou of seed 0, seed 1] per layout]}."""
    return [{"method": m, "layout": f"L{i}", "seed": s, "iou": v, "seconds": 1.0, "fidelity": ""}
            for m, per_layout in values.items() for i, seeds in enumerate(per_layout) for s, v in enumerate(seeds)]


def test_bootstrap_summary_means_intervals_and_paired_gain():
    none = [[0.1, 0.3], [0.0, 0.2], [0.5, 0.5], [0.2, 0.2]]
    mag = [[v + 0.25 for v in seeds] for seeds in none]  # the same layouts, all 0.25 better
    summary = {e["method"]: e for e in bootstrap_summary(rows_for({"none": none, "mag": mag}), ["none", "mag"])}
    assert summary["none"]["mean_iou"] == pytest.approx(np.mean(none))
    assert summary["none"]["ci_low"] < summary["none"]["mean_iou"] < summary["none"]["ci_high"]
    assert summary["none"]["ci_low"] >= 0.1 - 1e-9 and summary["none"]["ci_high"] <= 0.5 + 1e-9  # layout means
    # paired: the difference is 0.25 on every layout, so its interval has no width
    assert summary["mag"]["gain"] == pytest.approx(0.25)
    assert summary["mag"]["gain_low"] == pytest.approx(0.25) and summary["mag"]["gain_high"] == pytest.approx(0.25)
    assert "gain" not in summary["none"] and summary["mag"]["images"] == 8 and summary["mag"]["fidelity"] is None


def test_load_segmenter_imports_a_function_and_names_bad_specs():
    assert load_segmenter("mag_explore.evaluate:color_segmenter") is color_segmenter
    with pytest.raises(ValueError, match="package.module:function"):
        load_segmenter("color_segmenter")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_segmenter("mag_explore.evaluate:nope")


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_evaluate_command_writes_csv_summary_grid_and_runs_merge(sd15_folder, tmp_path, capsys):
    suite = {"layouts": [json.loads(SUITE.read_text())["layouts"][i] for i in (0, 6)]}  # 1 and 2 regions
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    runs = {"a": "none,swap,mag", "b": "pww,lg"}  # as two processes would split a long run
    for name, methods in runs.items():
        code = cli.main(["evaluate", "--model", str(sd15_folder), "--suite", str(tmp_path / "suite.json"),
                         "--methods", methods, "--seeds", "2", "--steps", "5", "--out", str(tmp_path / name)])
        printed = capsys.readouterr()
        assert code == 0, printed.err
    a = tmp_path / "a"
    rows = list(csv.DictReader(open(a / "results.csv")))
    assert len(rows) == 2 * 3 * 2
    assert {"method", "layout", "seed", "iou_1", "iou_2", "fidelity", "seconds"} <= set(rows[0])
    two = [r for r in rows if r["regions"] == "2"]
    assert two and all(float(r["seconds"]) > 0 for r in two)
    # each IoU again, from the saved image: the pixels of the phrase's color vs the region's mask
    from mag_explore.shapes.world import segment_by_color

    suite_layouts = {entry.name: (i, entry.layout) for i, entry in enumerate(load_suite(tmp_path / "suite.json", 64, 64))}
    for row in rows:
        index, layout = suite_layouts[row["layout"]]
        picture = np.asarray(Image.open(a / "images" / row["method"] / f"layout{index:02d}_seed{row['seed']}.png"))
        found = segment_by_color(picture)
        for k, region in enumerate(layout.regions, start=1):
            color = next(w for w in region.phrase.split() if w in COLORS)
            got, want = found.get(color, np.zeros((64, 64), bool)), region.mask
            union = np.logical_or(got, want).sum()
            iou = np.logical_and(got, want).sum() / union if union else 0.0
            assert row[f"iou_{k}"] == f"{iou:.4f}", (row["layout"], row["method"], k)  # the CSV keeps 4 decimals
    assert "| lg | 4 |" in printed.out  # the summary table of the last run (b) is printed
    assert "Δ vs none" in (a / "summary.md").read_text() and (a / "grid.png").stat().st_size > 10_000
    assert sorted(p.name for p in (a / "images" / "mag").iterdir()) == [
        "layout00_seed0.png", "layout00_seed1.png", "layout01_seed0.png", "layout01_seed1.png"]

    read = read_csv(a / "results.csv")
    assert read[0]["seed"] == 0 and isinstance(read[0]["iou"], float) and read[0]["iou_2"] == ""
    table = merge_runs(load_suite(tmp_path / "suite.json", 64, 64), [a, tmp_path / "b"], tmp_path / "all", "merged")
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "method" not in line
            ] == ["none", "swap", "mag", "pww", "lg"]
    assert len(read_csv(tmp_path / "all" / "results.csv")) == 20 and (tmp_path / "all" / "grid.png").exists()


def test_evaluate_command_refuses_an_unknown_method(sd15_folder, tmp_path, capsys):
    code = cli.main(["evaluate", "--model", str(sd15_folder), "--suite", str(SUITE), "--methods", "none,boxdiff",
                     "--seeds", "1", "--out", str(tmp_path)])
    assert code == 2
    assert "unknown methods ['boxdiff']" in capsys.readouterr().err


def test_settings_reach_the_controls_and_bad_options_are_named():
    from mag_explore import Layout, rect
    from mag_explore.evaluate import controls_for

    layout = Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1)])
    assert controls_for("mag", layout, {"alpha": 0.1})[0].alpha == 0.1
    assert controls_for("mag", layout, {})[0].alpha is None  # the model's, resolved when the run starts
    assert controls_for("swap", layout, {"step_range": (0, 5)})[0].step_range == (0, 5)
    with pytest.raises(ValueError, match=r"has no options \['alpha'\]"):
        controls_for("pww", layout, {"alpha": 0.1})
    with pytest.raises(ValueError, match=r"has no options \['steps'\]"):
        controls_for("swap", layout, {"steps": 700})


def test_first_seed_runs_held_out_seeds(sd15_folder, tmp_path, capsys):
    suite = {"layouts": [json.loads(SUITE.read_text())["layouts"][0]]}
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    code = cli.main(["evaluate", "--model", str(sd15_folder), "--suite", str(tmp_path / "suite.json"),
                     "--methods", "none", "--seeds", "2", "--first-seed", "4", "--steps", "2", "--out", str(tmp_path / "e")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert [r["seed"] for r in read_csv(tmp_path / "e" / "results.csv")] == [4, 5]
    assert "1 layouts × 2 seeds (4, 5)" in printed.out
    code = cli.main(["evaluate", "--model", str(sd15_folder), "--suite", str(tmp_path / "suite.json"),
                     "--methods", "none", "--seeds", "1", "--first-seed", "-1", "--out", str(tmp_path / "f")])
    assert code == 2 and "--first-seed=-1" in capsys.readouterr().err
