"""bench/gpu.py, the one GPU command, checked on the CPU with the tests' tiny SD1.5-like pipeline."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a subprocess, a whole evaluation or a long inversion
def test_gpu_script_writes_json_and_markdown_with_device_and_date(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    stem = gpu.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--steps", "5", "--size", "64",
                     "--out", str(tmp_path)])
    runs = json.loads(stem.with_suffix(".json").read_text())["runs"]
    assert [r["model"] for r in runs] == ["SD1.5-like tiny (tests)", "SDXL base-like tiny (tests)"]
    assert [r["variant"] for r in runs[1]["rows"]][0] == "diffusers StableDiffusionXLPipeline"
    result = runs[0]
    assert [r["variant"] for r in result["rows"]] == [
        "diffusers StableDiffusionPipeline", "ours, no controls", "ours + store (all steps)", "ours + swap (t > 700)",
        "ours + MAG (t > 700)", "ours + MAG, gradient checkpointing"]
    assert result["device"].startswith("CPU") and result["date"][:4].isdigit() and result["steps"] == 5
    assert all(r["seconds"] > 0 and r["peak_gib"] is None for r in result["rows"])  # no GPU memory on a CPU
    assert result["rows"][0]["ratio"] == 1.0
    analytical = result["mag_analytical"]
    assert analytical["guided_steps"] == 1  # of 5 DDIM steps (801, 601, ...), only t = 801 is above 700
    table = stem.with_suffix(".md").read_text()
    assert result["device"] in table and "| ours + MAG, gradient checkpointing |" in table


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_gpu_train_script_trains_measures_and_packs_both_models(tmp_path):
    """bench/gpu_train.py --smoke: the retraining run prepared for a lent GPU, same code, a few CPU steps."""
    import subprocess
    import sys
    import tarfile

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names[:2] == ["logs.txt", "shapes.tar.0"] and "summary.md" in names and "shapes_flux.tar.1" in names
    assert len(names) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())  # what a device call brings back
    summary = (out / "summary.md").read_text()
    # each model's reproducing command, its steps and its suite rows
    assert "python -m mag_explore.shapes.train --out" in summary and "--unet-steps 2" in summary
    assert "python -m mag_explore.shapes.train_mmdit --out" in summary and summary.count("steps reached: 2 (asked 2)") == 2
    assert summary.count("| none | 2 |") == 2 and summary.count("| mag | 2 |") == 2
    for name, weights in (("shapes", "unet"), ("shapes_flux", "transformer")):
        whole = tmp_path / f"{name}.tar"
        whole.write_bytes(b"".join(p.read_bytes() for p in sorted(out.glob(f"{name}.tar.*"), key=lambda p: int(p.suffix[1:]))))
        with tarfile.open(whole) as tar:
            members = tar.getnames()
        assert f"{name}/mag_explore.json" in members and f"{name}/{weights}/diffusion_pytorch_model.safetensors" in members
