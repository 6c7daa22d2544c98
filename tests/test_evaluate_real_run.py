"""``evaluate --segmenter grounded-sam`` end to end: tiny SD + tiny detector / SAM / CLIP from local folders,
the shipped real-world suite, two torchrun processes on the CPU, then a resumed run in this process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mag_explore import cli
from mag_explore.evaluate import load_suite, read_csv
from mag_explore.testing.vision import tiny_vision_folders

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "mag_explore" / "data" / "suites" / "real.json"


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    return tiny_vision_folders(tmp_path_factory.mktemp("tiny-vision-run"))


def command(sd15_folder, vision, out, seeds: int, *extra) -> list[str]:
    return ["evaluate", "--model", str(sd15_folder), "--suite", str(REAL), "--methods", "none", "--seeds", str(seeds),
            "--steps", "2", "--device", "cpu", "--segmenter", "grounded-sam", "--detector", str(vision["grounding-dino"]),
            "--sam", str(vision["sam"]), "--clip", str(vision["clip"]), "--box-threshold", "0.2", "--out", str(out),
            *extra]


@pytest.mark.slow
def test_grounded_sam_runs_sharded_over_two_processes_and_resumes(sd15_folder, vision, tmp_path, capsys, free_port):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port), "-m", "mag_explore"] +
                         command(sd15_folder, vision, out, 1), env=env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "generated 36 in 2 processes" in two.stdout and "instance success" in two.stdout
    rows = read_csv(out / "results.csv")
    suite = load_suite(REAL, 64, 64)
    assert [r["layout"] for r in rows] == [s.name for s in suite]  # every layout once, in the suite's order
    for row, item in zip(rows, suite):
        regions = len(item.layout)
        assert row["regions"] == regions and all(row[f"iou_{k + 1}"] != "" for k in range(regions))
        assert 0 <= row["instances"] <= 1 and row["success"] in (0.0, 1.0) and 0 <= row["box_iou"] <= 1
        assert 0 <= row["clip_score"] <= 100 and 0 <= row["clip_regions"] <= 100 and row["peak_mib"] == ""
    info = json.loads((out / "run.json").read_text())["segmenter"]
    assert info["name"] == "grounded-sam" and info["clip"] == str(vision["clip"]) and info["box_threshold"] == 0.2
    assert info["detector"] == str(vision["grounding-dino"]) and info["text_threshold"] == 0.25

    # resumed in one process with a second seed: only seed 1 is generated, seed 0's rows stay as they were
    assert cli.main(command(sd15_folder, vision, out, 2)) == 0
    assert "36 of 72 images were already" in capsys.readouterr().out
    again = read_csv(out / "results.csv")
    assert [r for r in again if r["seed"] == 0] == rows and sum(r["seed"] == 1 for r in again) == 36
    # another threshold would mix two measures in one file: refused, named, no traceback
    assert cli.main(command(sd15_folder, vision, out, 2, "--box-threshold", "0.3")) == 2
    err = capsys.readouterr().err
    assert "refusing to mix them" in err and "box_threshold" in err and "Traceback" not in err


def test_segmenter_mistakes_are_named_without_a_traceback(sd15_folder, vision, tmp_path, capsys):
    args = command(sd15_folder, vision, tmp_path / "o", 1)
    cases = [
        (["--detector", str(tmp_path)], "--detector"),  # a folder with no model in it
        (["--box-threshold", "2"], "--box-threshold=2.0"),
        (["--segmenter", "mag_explore.evaluate:color_segmenter"], "--box-threshold, --clip, --detector, --sam: only for the built-in"),
        (["--segmenter-dtype", "float8"], "dtype 'float8': use one of"),
    ]
    for extra, message in cases:
        assert cli.main(args + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
