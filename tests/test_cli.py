"""The command line, run as a user runs it: a subprocess, exit codes, files, one-line errors."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mag_explore.attention import AttentionStore
from mag_explore.cli import main

ROOT = Path(__file__).resolve().parent.parent
LAYOUT_PNG = ROOT / "mag_explore" / "data" / "layouts" / "left_right.png"
REGIONS = json.dumps({"#ff0000": "red circle", "#0000ff": "blue square"})
PROMPT = "a red circle and a blue square"


def cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mag_explore", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def mag_run(sd15_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    done = cli("generate", "--model", sd15_folder, "--prompt", PROMPT, "--layout", LAYOUT_PNG, "--regions", REGIONS,
               "--method", "mag", "--alpha", "5", "--steps", "4", "--guide-while-t-above", "500", "--out", out / "mag.png",
               "--save-attention", out / "maps.safetensors", "--device", "cpu")
    return done, out


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_generate_writes_the_image_and_the_maps(mag_run):
    done, out = mag_run
    assert done.returncode == 0, done.stderr
    assert f"wrote {out / 'mag.png'}" in done.stdout
    assert Image.open(out / "mag.png").size == (64, 64)
    store = AttentionStore.load(out / "maps.safetensors")
    assert store.step_indices == [0, 1, 2, 3] and len(store.layers) == 7
    assert store.map(0, store.layers[0], token=2).shape == (8, 8)


@pytest.mark.slow  # a subprocess, a whole evaluation or a long inversion
def test_generate_writes_what_the_python_api_makes(mag_run, sd15_pipe):
    # The CLI's PNG is the API's image with the same settings, pixel for pixel (8-bit), and
    # MAG at alpha 5 moved it away from the uncontrolled image.
    from mag_explore.layouts import Layout
    from mag_explore.methods import make_controls
    from mag_explore.sampling import generate

    done, out = mag_run
    # quiet by default: no third-party warnings or loading bars, only our denoising bar
    assert "torchvision" not in done.stderr and "Loading" not in done.stderr, done.stderr
    assert "denoising" in done.stderr
    layout = Layout.from_color_png(LAYOUT_PNG, json.loads(REGIONS), prompt=PROMPT)
    kwargs = dict(num_inference_steps=4, seed=42, progress=False)
    api = generate(sd15_pipe, PROMPT, controls=make_controls("mag", layout, alpha=5, while_t_above=500),
                   store=AttentionStore(), **kwargs)  # --save-attention: the store is on in the CLI run too
    plain = generate(sd15_pipe, PROMPT, **kwargs)
    written = np.asarray(Image.open(out / "mag.png"), dtype=int)
    assert np.array_equal(written, np.asarray(api.images[0], dtype=int))
    assert np.abs(written - np.asarray(plain.images[0], dtype=int)).max() >= 3


@pytest.mark.parametrize("args, message", [
    (["--method", "mag"], "needs --layout"),
    (["--layout", str(LAYOUT_PNG), "--regions", '{"#00ff00": "red circle"}'], "#00ff00"),
    (["--layout", str(LAYOUT_PNG), "--regions", "{not json"], "not valid JSON"),
    (["--layout", str(LAYOUT_PNG), "--regions", '{"#ff0000": "dog", "#0000ff": "blue square"}'],
     "'dog' is not in the prompt"),
    (["--layout", str(LAYOUT_PNG), "--word-ids", "__import__('os').system('echo hacked')"], "word"),
    (["--method", "none", "--height", "60"], "multiples of 8"),
    (["--method", "none", "--true-cfg", "2"], "--true-cfg 2.0 is a setting of Flux pipelines"),
    (["--method", "none", "--true-cfg", "nan"], "--true-cfg"),
])
def test_bad_input_is_one_line_and_non_zero(sd15_folder, tmp_path, capfd, args, message):
    # in-process (the same main() as `python -m mag_explore`), to keep the suite fast
    code = main(["generate", "--model", str(sd15_folder), "--prompt", PROMPT, "--steps", "2",
                 "--out", str(tmp_path / "x.png"), "--device", "cpu", *args])
    out, err = capfd.readouterr()
    assert code == 2
    lines = err.strip().splitlines()  # loading progress bars may come first
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err
    assert "hacked" not in out
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_verbose_shows_the_libraries_loading_output(sd15_folder, tmp_path):
    done = cli("generate", "--model", sd15_folder, "--prompt", PROMPT, "--method", "none", "--steps", "1",
               "--out", tmp_path / "x.png", "--device", "cpu", "--verbose")
    assert done.returncode == 0, done.stderr
    assert "Loading pipeline components" in done.stderr


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_unknown_model_folder_is_a_clear_error(tmp_path):
    done = cli("generate", "--model", tmp_path / "nope", "--prompt", PROMPT, "--method", "none", "--out",
               tmp_path / "x.png")
    assert done.returncode == 2 and "nope" in done.stderr.splitlines()[-1]


def test_help_names_every_option_with_its_default():
    import argparse

    from mag_explore.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    generate = {flag: action for action in commands.choices["generate"]._actions for flag in action.option_strings}
    for option in ["--alpha", "--lmbda", "--step-rule", "--guide-while-t-above", "--swap-while-t-above", "--word-ids",
                   "--save-attention", "--cfg", "--num-inference-steps", "--verbose"]:
        assert option in generate and generate[option].help, option
    # a default that depends on the model says so, with no number that holds for one model only
    for option in ["--alpha", "--lmbda", "--step-rule", "--guide-while-t-above", "--swap-while-t-above", "--cfg",
                   "--true-cfg", "--negative-prompt", "--num-inference-steps"]:
        help_text = generate[option].help
        assert "default: the model's" in help_text and not re.search(r"\d\.\d|\b700\b|\b50\b", help_text), help_text
    assert "default 42" in generate["--seed"].help  # a fixed default says its value


@pytest.mark.slow  # a subprocess, a whole evaluation or a long inversion
def test_demo_writes_one_row_per_method_and_a_column_per_region(sd15_folder, tmp_path, capsys):
    # The README's main command on a tiny pipeline: layout, image and one attention map per
    # region, for none / swap / MAG, so 3 rows × (2 + 2) panels of 3.4 × 3.4 inches at 110 dpi.
    out = tmp_path / "demo.png"
    assert main(["demo", "--model", str(sd15_folder), "--steps", "4", "--out", str(out), "--device", "cpu"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == (round(4 * 3.4 * 110), round(3 * 3.4 * 110))


def test_help_lists_every_registered_family():
    """--help names the families without importing torch; the registry is the truth it must match."""
    from mag_explore import cli
    from mag_explore.families.base import registered_families

    for family in registered_families():
        assert family.title.split(" (")[0] in cli.FAMILIES_IN_HELP, family.title
