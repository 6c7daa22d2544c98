"""The shipped real-world suite, the MIG_Bench reader, and the summary of real-image rows."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mag_explore.evaluate import COLOR_WORDS, bootstrap_summary, format_summary, load_suite, mig_bench_suite
from mag_explore.evaluate.real_suite import main as mig_main

SUITES = Path(__file__).resolve().parent.parent / "mag_explore" / "data" / "suites"


def generator():
    spec = importlib.util.spec_from_file_location("make_real_suite", SUITES / "make_real_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_suite_is_what_its_seeded_script_writes():
    script = generator()
    assert json.loads((SUITES / "real.json").read_text()) == script.make_real_suite(seed=0)
    assert tuple(script.COLOR_WORDS) == COLOR_WORDS  # the colors instance success checks are the suite's


def test_the_real_suite_has_two_to_four_colored_objects_in_boxes_of_their_own(tiny_tokenizer):
    raw = json.loads((SUITES / "real.json").read_text())["layouts"]
    suite = load_suite(SUITES / "real.json", 512, 512)
    assert len(suite) == 36 and [len(s.layout) for s in suite] == [len(r["regions"]) for r in raw]
    assert {n: sum(len(s.layout) == n for s in suite) for n in (2, 3, 4)} == {2: 12, 3: 12, 4: 12}
    for item, entry in zip(suite, raw):
        colors = [r["phrase"].split()[0] for r in entry["regions"]]
        nouns = [r["phrase"].split()[1] for r in entry["regions"]]
        assert set(colors) <= set(COLOR_WORDS) and len(set(colors)) == len(colors) == len(set(nouns))
        assert all(r["phrase"] in entry["prompt"] for r in entry["regions"])
        assert not (item.layout.masks.sum(0) > 1).any(), f"{item.name}: boxes overlap"
        assert all(0.03 <= r.area <= 0.31 for r in item.layout.regions)  # sides 0.2-0.55
        item.layout.resolve(tiny_tokenizer)  # every phrase found among the prompt's tokens


MIG_YAML = """\
a red car and a blue dog:
  coco_id: 7
  red car:
  - [0.1, 0.2, 0.5, 0.6]
  blue dog:
  - [0.6, 0.5, 0.9, 0.95]
two green cups:
  coco_id: 8
  green cup:
  - [0.0, 0.0, 0.3, 0.3]
  - [0.5, 0.5, 0.8, 0.8]
a cat:
  coco_id: 9
  white horse:
  - [0.1, 0.1, 0.2, 0.2]
five things:
  coco_id: 10
  thing:
  - [0.0, 0.0, 0.1, 0.1]
  - [0.1, 0.1, 0.2, 0.2]
  - [0.2, 0.2, 0.3, 0.3]
  - [0.3, 0.3, 0.4, 0.4]
  - [0.4, 0.4, 0.5, 0.5]
"""


def test_mig_bench_boxes_become_a_suite(tmp_path):
    path = tmp_path / "mig_bench_anno.yaml"
    path.write_text(MIG_YAML)
    suite, skipped = mig_bench_suite(path)
    assert suite["layouts"][0] == {"name": "a red car and a blue dog (coco 7)", "prompt": "a red car and a blue dog",
                                   "tags": ["2 instances"],
                                   "regions": [{"phrase": "red car", "rect": [0.1, 0.2, 0.5, 0.6]},
                                               {"phrase": "blue dog", "rect": [0.6, 0.5, 0.9, 0.95]}]}
    assert [r["rect"] for r in suite["layouts"][1]["regions"]] == [[0.0, 0.0, 0.3, 0.3], [0.5, 0.5, 0.8, 0.8]]
    assert len(suite["layouts"]) == 2 and len(skipped) == 2
    assert "'a cat': phrases ['white horse'] are not in the prompt" in skipped[0]
    assert "'five things': 5 boxes (at most 4)" in skipped[1]
    out = tmp_path / "suite.json"
    out.write_text(json.dumps(suite))
    loaded = load_suite(out, 100, 100)
    assert loaded[0].layout.regions[0].mask[20:60, 10:50].all() and loaded[0].layout.regions[0].mask.sum() == 1600


def test_the_mig_bench_command_names_a_bad_box_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("a red car:\n  red car:\n  - [0.5, 0.2, 0.1, 0.6]\n")
    assert mig_main([str(path), "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "box [0.5, 0.2, 0.1, 0.6] must be [x0, y0, x1, y1]" in err and "Traceback" not in err
    path.write_text(MIG_YAML)
    assert mig_main([str(path), "--out", str(tmp_path / "s.json")]) == 0
    assert "2 layouts; left out 2" in capsys.readouterr().out


def real_rows() -> list[dict]:
    """Two layouts x two seeds of a method "none" with real-image columns written out."""
    rows = []
    for layout, (instances, clip) in {"A": ([1.0, 0.5], [30.0, 20.0]), "B": ([0.0, 0.5], [10.0, 20.0])}.items():
        for seed in (0, 1):
            rows.append({"method": "none", "setting": "default", "layout": layout, "seed": seed, "iou": 0.5,
                         "seconds": 2.0, "fidelity": "", "peak_mib": 1000.0 + 10 * seed,
                         "instances": instances[seed], "success": float(instances[seed] == 1.0),
                         "box_iou": 0.25, "clip_score": clip[seed], "clip_regions": 25.0})
    return rows


def test_the_summary_reports_instance_success_clip_and_peak_memory():
    (entry,) = bootstrap_summary(real_rows(), ["none"])
    # means of layout means: instances (0.75 + 0.25) / 2, image success (0.5 + 0) / 2, CLIP (25 + 15) / 2
    assert entry["instance_success"] == pytest.approx(0.5) and entry["image_success"] == pytest.approx(0.25)
    assert entry["clip_score"] == pytest.approx(20.0) and entry["box_iou"] == pytest.approx(0.25)
    assert entry["peak_mib"] == 1010.0 and entry["fidelity"] is None
    table = format_summary([entry])
    assert "instance success [95 % CI]" in table and "CLIP score" in table and "peak GPU MiB" in table
    assert "| 1010 |" in table and "colors present" not in table


def test_the_shapes_summary_keeps_its_columns():
    rows = [{**r, "instances": "", "success": "", "box_iou": "", "clip_score": "", "clip_regions": "", "peak_mib": "",
             "fidelity": 1.0, "present": 1.0, "shapes_ok": 1.0, "extra_colors": 0} for r in real_rows()]
    table = format_summary(bootstrap_summary(rows, ["none"]))
    assert "colors present" in table and "instance success" not in table and "peak GPU MiB" not in table
    assert np.isclose(bootstrap_summary(rows, ["none"])[0]["fidelity"], 1.0)
