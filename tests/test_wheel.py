"""The package as users install it: a wheel in a fresh venv, run from a folder outside the checkout.

Everything the defaults need (the embedded model, the example layouts, the evaluation suite)
must be inside the wheel. torch, diffusers and the rest are not installed again: a .pth file
points the fresh venv at this interpreter's site-packages, so only mag-explore comes from the wheel.
"""
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, **kw):
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_the_wheel_runs_the_demo_from_another_folder(tmp_path):
    wheels = tmp_path / "wheels"
    import setuptools

    # offline with this interpreter's setuptools when it is new enough (make install puts one in),
    # else pip fetches the build requirements of pyproject.toml
    offline = int(setuptools.__version__.split(".")[0]) >= 77
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, ROOT,
                *(["--no-build-isolation", "--no-index"] if offline else []))
    # make install builds the same way: a newcomer's first command must not print pages of warnings
    assert "BuildBackendWarning" not in built.stderr + built.stdout, built.stderr[-2000:]
    (wheel,) = wheels.glob("mag_explore-*.whl")

    # the fresh venv sees neither the checkout (PYTHONPATH) nor a data folder given elsewhere
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAG_EXPLORE_DATA", "MAG_EXPLORE_MODEL")}
    clean["OMP_NUM_THREADS"] = "1"
    env_dir = tmp_path / "venv"
    run(sys.executable, "-m", "venv", env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    inner = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", env=clean).stdout.strip())
    outer = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (inner / "outer_site_packages.pth").write_text("\n".join(outer) + "\n")  # torch & co., not mag_explore
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, env=clean)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(python, "-c", "import mag_explore; print(mag_explore.__file__)", cwd=elsewhere, env=clean)
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout  # the installed copy, not the checkout

    # 4 steps: the first (t = 751) is above the 700 threshold of swap and MAG
    done = run(python, "-m", "mag_explore", "demo", "--num-inference-steps", "4", "--out", "demo.png",
               "--device", "cpu", cwd=elsewhere, env=clean)
    assert (elsewhere / "demo.png").stat().st_size > 0 and "wrote demo.png" in done.stdout
    assert "torchvision" not in done.stderr and "Loading" not in done.stderr, done.stderr  # quiet by default
