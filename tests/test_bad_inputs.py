"""Every bad input is refused clearly: through the CLI as a subprocess, and through the Python API.

Each case is one bad value, given once on the command line (``python -m mag_explore ...``,
as a user types it) and, where the API takes the same value, once to the function. It
must end in a non-zero exit (2, no traceback, an "error:" message of at most three
lines) or an exception, name the bad value and what is accepted, write nothing, and
leave the pipeline's attention processors and requires_grad flags as they were.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import mag_explore as mx
from mag_explore.data import data_dir
from mag_explore.editing import edit_image
from mag_explore.evaluate import run_evaluation
from mag_explore.validation import NonFiniteError

ROOT = Path(__file__).resolve().parent.parent
DATA = data_dir()
LAYOUT_PNG = DATA / "layouts" / "left_right.png"
SUITE = DATA / "suites" / "shapes.json"
PROMPT = "a red circle and a blue square"
REGIONS = {"#ff0000": "red circle", "#0000ff": "blue square"}


@dataclass
class Env:
    pipe: object
    folder: Path
    inputs: Path  # files the cases read (a thin layout, an image, a text file)
    out: Path  # where a run would write; must stay empty

    def layout(self):
        return mx.Layout.from_color_png(LAYOUT_PNG, REGIONS, prompt=PROMPT)


@dataclass
class Case:
    name: str
    cli: list  # arguments after "python -m mag_explore"; {in} and {out} are the folders
    expect: list[str]  # fragments of the message: the bad value and what is accepted
    api: Callable[[Env], object] | None = None
    api_expect: list[str] = field(default_factory=list)  # if the API words it differently


def gen(*args, layout=True):
    base = ["generate", "--prompt", PROMPT, "--out", "{out}/x.png", "--steps", "6"]
    return base + (["--layout", str(LAYOUT_PNG), "--regions", json.dumps(REGIONS)] if layout else []) + list(args)


def edit(*args):
    return ["edit", "--image", "{in}/scene.png", "--prompt", PROMPT, "--layout", str(DATA / "layouts" / "left_right.json"),
            "--out", "{out}/edited.png", "--steps", "4", *args]


def evaluate(*args):
    return ["evaluate", "--suite", str(SUITE), "--methods", "none", "--seeds", "1", "--steps", "2",
            "--out", "{out}/eval", *args]


def mag(env, **kw):
    return mx.generate(env.pipe, PROMPT, num_inference_steps=6, progress=False,
                       controls=[mx.MaskedAttentionGuidance(env.layout(), **kw)])


CASES = [
    # ---- generate: counts and sizes
    Case("steps negative", gen("--steps", "-3"), ["--num-inference-steps=-3", ">= 1"],
         lambda e: mx.generate(e.pipe, PROMPT, num_inference_steps=-3), ["num_inference_steps=-3", "1..1000"]),
    Case("steps zero", gen("--steps", "0"), ["--num-inference-steps=0", ">= 1"],
         lambda e: mx.generate(e.pipe, PROMPT, num_inference_steps=0), ["num_inference_steps=0", "1..1000"]),
    Case("steps more than the schedule", gen("--steps", "5000", "--method", "none", layout=False), ["=5000", "1..1000"],
         lambda e: mx.generate(e.pipe, PROMPT, num_inference_steps=5000)),
    Case("width zero", gen("--width", "0"), ["--width=0", ">= 1"],
         lambda e: mx.generate(e.pipe, PROMPT, width=0), ["width=0", ">= 1"]),
    Case("height not a multiple of 8", gen("--height", "60"), ["height=60", "multiples of 8", "56 or 64"],
         lambda e: mx.generate(e.pipe, PROMPT, height=60)),
    Case("seed negative", gen("--seed", "-1"), ["seed=-1", "0..9223372036854775807"],
         lambda e: mx.generate(e.pipe, PROMPT, seed=-1)),
    # ---- generate: floats
    Case("cfg nan", gen("--cfg", "nan"), ["--cfg=nan", "finite number >= 0"],
         lambda e: mx.generate(e.pipe, PROMPT, guidance_scale=float("nan")), ["guidance_scale=nan", "finite"]),
    Case("cfg inf", gen("--cfg", "inf"), ["--cfg=inf", "finite number >= 0"],
         lambda e: mx.generate(e.pipe, PROMPT, guidance_scale=float("inf")), ["guidance_scale=inf", "finite"]),
    Case("alpha nan", gen("--alpha", "nan"), ["--alpha=nan", "finite number >= 0"],
         lambda e: mag(e, alpha=float("nan")), ["alpha=nan", "finite number >= 0"]),
    Case("alpha inf", gen("--alpha", "inf"), ["--alpha=inf", "finite number >= 0"],
         lambda e: mag(e, alpha=float("inf")), ["alpha=inf", "finite number >= 0"]),
    Case("alpha negative", gen("--alpha", "-1"), ["--alpha=-1.0", ">= 0"],
         lambda e: mag(e, alpha=-1), ["alpha=-1.0", ">= 0"]),
    Case("lambda negative", gen("--lmbda", "-1"), ["--lmbda=-1.0", ">= 0", "--allow-negative-lambda"],
         lambda e: mag(e, lmbda=-1), ["lmbda=-1.0", ">= 0", "allow_negative_lambda=True"]),
    # ---- generate: a run that blows up (finite settings, infinite latents)
    Case("cfg overflowing to inf", gen("--cfg", "1e38", "--method", "none", layout=False),
         ["not finite after step", "guidance_scale=1e+38"],
         lambda e: mx.generate(e.pipe, PROMPT, num_inference_steps=6, guidance_scale=1e38, progress=False)),
    Case("alpha overflowing", gen("--alpha", "1e30", "--guide-while-t-above", "100"), ["not finite", "alpha=1e+30"],
         lambda e: mag(e, alpha=1e30, while_t_above=100)),
    # ---- generate: step ranges
    Case("guide range selects no step", gen("--guide-while-t-above", "990"), ["t > 990", "selects no step", "831"],
         lambda e: mag(e, while_t_above=990)),
    Case("guide threshold negative", gen("--guide-while-t-above", "-5"), ["--guide-while-t-above=-5", "0..999"],
         lambda e: mag(e, while_t_above=-5), ["threshold -5", "0..999"]),
    Case("swap threshold beyond the schedule", gen("--swap-while-t-above", "2000", "--method", "swap"),
         ["--swap-while-t-above=2000", "0..999"],
         lambda e: mx.generate(e.pipe, PROMPT, num_inference_steps=6, controls=[mx.MaskedAttentionSwap(e.layout(), while_t_above=2000)]),
         ["threshold 2000", "0..999"]),
    # ---- generate: layouts and words
    Case("one word-id list for three colors", gen(layout=False) + ["--layout", str(LAYOUT_PNG), "--word-ids", "[[2]]"],
         ["1 list(s) of word ids", "3 colors", "one list per color", "[[],[],[1]]"],
         lambda e: mx.Layout.from_official(LAYOUT_PNG, "[[2]]")),
    Case("phrase not in the prompt", gen("--regions", json.dumps({"#ff0000": "dog", "#0000ff": "blue square"})),
         ["'dog' is not in the prompt", "Its words are"],
         lambda e: mx.generate(e.pipe, PROMPT, num_inference_steps=6, controls=[mx.MaskedAttentionGuidance(
             mx.Layout.from_color_png(LAYOUT_PNG, {"#ff0000": "dog", "#0000ff": "blue square"}))])),
    Case("region vanishing at every layer", gen(layout=False) + ["--layout", "{in}/thin.png", "--regions",
         json.dumps({"#ff0000": "red circle"})], ["'red circle'", "vanishes at every cross-attention layer", "larger"],
         lambda e: mx.generate(e.pipe, PROMPT, num_inference_steps=6, controls=[mx.MaskedAttentionGuidance(
             mx.Layout.from_color_png(e.inputs / "thin.png", {"#ff0000": "red circle"}))])),
    Case("layout file missing", gen(layout=False) + ["--layout", "{in}/missing.png", "--regions", json.dumps(REGIONS)],
         ["missing.png"], lambda e: mx.Layout.from_color_png(e.inputs / "missing.png", REGIONS)),
    Case("layout not an image", gen(layout=False) + ["--layout", "{in}/notes.png", "--regions", json.dumps(REGIONS)],
         ["notes.png"], lambda e: mx.Layout.from_color_png(e.inputs / "notes.png", REGIONS)),
    Case("unknown mask mode", gen(), [], lambda e: mag(e, mask_mode="bicubic"), ["mask_mode='bicubic'", "'nearest'"]),
    Case("MAG iterations zero", gen(), [], lambda e: mag(e, iterations=0), ["iterations=0", ">= 1"]),
    # ---- generate: outputs (checked before any model is loaded)
    Case("output of unknown type", gen("--out", "{out}/x.xyz"), ["x.xyz", ".png"]),
    Case("attention file not safetensors", gen("--save-attention", "{out}/maps.pt"), ["maps.pt", ".safetensors"]),
    # ---- evaluate
    Case("evaluate seeds zero", evaluate("--seeds", "0"), ["--seeds=0", ">= 1"],
         lambda e: run_evaluation(str(e.folder), SUITE, ["none"], 0, e.out / "eval", progress=False), ["--seeds 0"]),
    Case("evaluate unknown method", evaluate("--methods", "none,boxdiff"), ["boxdiff", "'mag'"],
         lambda e: run_evaluation(str(e.folder), SUITE, ["none", "boxdiff"], 1, e.out / "eval", progress=False)),
    Case("evaluate steps negative", evaluate("--steps", "-1"), ["--num-inference-steps=-1", ">= 1"],
         lambda e: run_evaluation(str(e.folder), SUITE, ["none"], 1, e.out / "eval", num_inference_steps=-1, progress=False),
         ["num_inference_steps=-1", "1..1000"]),
    Case("evaluate suite missing", evaluate("--suite", "{in}/nope.json"), ["nope.json", "no such file"]),
    Case("evaluate segmenter without a colon", evaluate("--segmenter", "mysegmenter"),
         ["mysegmenter", "package.module:function"]),
    # ---- edit
    Case("edit threshold nan", edit("--threshold", "nan"), ["--threshold=nan", "[0, 1]"],
         lambda e: edit_image(e.pipe, e.inputs / "scene.png", PROMPT, e.layout(), threshold=float("nan"), progress=False),
         ["threshold=nan", "[0, 1]"]),
    Case("edit unknown start", edit("--start", "sideways"), ["'sideways'", "'move'"],
         lambda e: edit_image(e.pipe, e.inputs / "scene.png", PROMPT, e.layout(), start="sideways", progress=False)),
    Case("edit unknown method", edit("--method", "boxdiff"), ["'boxdiff'", "'mag'"],
         lambda e: edit_image(e.pipe, e.inputs / "scene.png", PROMPT, e.layout(), method="boxdiff", progress=False)),
    Case("edit inject steps negative", edit("--inject-steps", "-2"), ["--inject-steps=-2", ">= 0"]),
    Case("edit image missing", edit("--image", "{in}/nothing.png"), ["nothing.png"],
         lambda e: edit_image(e.pipe, e.inputs / "nothing.png", PROMPT, e.layout(), progress=False)),
    Case("edit cfg negative", edit("--cfg", "-1"), ["--cfg=-1.0", ">= 0"],
         lambda e: edit_image(e.pipe, e.inputs / "scene.png", PROMPT, e.layout(), guidance_scale=-1, progress=False),
         ["guidance_scale=-1.0", ">= 0"]),
    Case("edit steps zero", edit("--steps", "0"), ["--num-inference-steps=0", ">= 1"],
         lambda e: edit_image(e.pipe, e.inputs / "scene.png", PROMPT, e.layout(), num_inference_steps=0, progress=False),
         ["num_inference_steps=0", "1..1000"]),
    # ---- devices: one line naming the device and what this machine has, before anything loads
    Case("device unknown", gen("--device", "quantum"), ["'quantum'", "cpu, cuda, mps", "this machine has"],
         lambda e: mx.load_pipeline(e.folder, device="quantum")),
    Case("evaluate device unknown", evaluate("--device", "quantum"), ["'quantum'", "cpu, cuda, mps"]),
    Case("edit device unknown", edit("--device", "quantum"), ["'quantum'", "cpu, cuda, mps"]),
    *([] if torch.cuda.is_available() else [  # the machine must lack it for the case to apply
        Case("device cuda without CUDA", gen("--device", "cuda"), ["'cuda'", "no CUDA GPU", "this machine has"],
             lambda e: mx.load_pipeline(e.folder, device="cuda"))]),
    *([] if torch.backends.mps.is_available() else [
        Case("device mps without MPS", gen("--device", "mps"), ["'mps'", "no Apple MPS GPU", "this machine has"],
             lambda e: mx.load_pipeline(e.folder, device="mps"))]),
]
assert len({c.name for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    thin = np.full((64, 64, 3), 255, np.uint8)
    thin[1, 1:4] = (255, 0, 0)  # 3 pixels in row 1: nearest at 8x8 and coarser reads rows 0, 8, ...
    Image.fromarray(thin).save(folder / "thin.png")
    scene = np.full((64, 64, 3), 230, np.uint8)
    scene[8:24, 8:24] = (255, 0, 0)
    Image.fromarray(scene).save(folder / "scene.png")
    (folder / "notes.png").write_text("not an image")
    return folder


def written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


CLI_CASES = [c for c in CASES if c.cli and c.expect]


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_the_cli_refuses_it_in_a_few_lines_with_exit_2_and_writes_nothing(case, sd15_folder, inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in case.cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MAG_EXPLORE_DEBUG", None)
    device = [] if "--device" in args else ["--device", "cpu"]  # the device cases name their own
    done = subprocess.run([sys.executable, "-m", "mag_explore", *args, "--model", str(sd15_folder), *device],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("error: "))  # progress bars may come first
    message = "\n".join(lines[start:])
    assert len(lines) - start <= 3, message
    for fragment in case.expect:
        assert fragment in message, (fragment, message)
    assert written(out) == []


API_CASES = [c for c in CASES if c.api is not None]


def snapshot(pipe) -> tuple[dict, list]:
    flags = [(name, p.requires_grad) for module in (pipe.unet, pipe.vae, pipe.text_encoder)
             for name, p in module.named_parameters()]
    return dict(pipe.unet.attn_processors), flags


@pytest.mark.parametrize("case", API_CASES, ids=[c.name for c in API_CASES])
def test_the_python_api_refuses_it_and_leaves_the_pipeline_as_it_was(case, sd15_pipe, sd15_folder, inputs, tmp_path):
    env = Env(sd15_pipe, sd15_folder, inputs, tmp_path / "out")
    processors, flags = snapshot(sd15_pipe)
    with pytest.raises((ValueError, OSError, NonFiniteError)) as info:
        case.api(env)
    message = str(info.value)
    for fragment in case.api_expect or case.expect:
        assert fragment in message, (fragment, message)
    after, after_flags = snapshot(sd15_pipe)
    assert after.keys() == processors.keys() and all(after[n] is processors[n] for n in processors)
    assert after_flags == flags
    assert written(env.out) == []


def test_the_matrix_is_large_enough():
    assert len(CLI_CASES) >= 25 and len(API_CASES) >= 25


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    # An unexpected error is not dressed up as a user mistake: it propagates (exit 1 with a
    # traceback from `python -m`), so it can be reported.
    from mag_explore import cli

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "run_demo", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["demo", "--out", "x.png"])


def test_a_region_that_vanishes_at_some_layers_is_a_warning_naming_region_and_layer(sd15_pipe):
    from mag_explore.validation import VanishingRegionWarning

    layout = mx.Layout.from_color_png(LAYOUT_PNG, REGIONS, prompt=PROMPT)  # gone at the 2x2 mid layer only
    with pytest.warns(VanishingRegionWarning, match=r"region 'red circle' .* vanishes at the 2x2 cross-attention"):
        mx.Sampler(sd15_pipe, PROMPT, num_inference_steps=6, controls=[mx.MaskedAttentionGuidance(layout)])
    # leaving that layer out (or soft masks) silences it
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", VanishingRegionWarning)
        mx.Sampler(sd15_pipe, PROMPT, num_inference_steps=6,
                   controls=[mx.MaskedAttentionGuidance(layout, layer_sizes=[8, 4])])
        mx.Sampler(sd15_pipe, PROMPT, num_inference_steps=6,
                   controls=[mx.MaskedAttentionGuidance(layout, mask_mode="area")])
