"""bench/gpu.py, the one GPU command, checked on the CPU with the tests' tiny SD1.5-like pipeline."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
