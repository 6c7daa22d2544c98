"""Chroma and Qwen-Image through the family interface: load_pipeline, generate (pixel for pixel
against diffusers' own pipelines at their defaults), swap, MAG (its gradient against a finite
difference), the store, restoring the processors, and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mag_explore import families
from mag_explore.attention import AttentionStore
from mag_explore.layouts import Layout, rect
from mag_explore.methods import MaskedAttentionGuidance, MaskedAttentionSwap
from mag_explore.methods.guidance import guidance_pass
from mag_explore.models import load_pipeline, model_defaults
from mag_explore.sampling import Control, Sampler, generate
from mag_explore.testing.joint import (tiny_chroma_pipeline, tiny_flux2_klein_pipeline, tiny_qwenimage_pipeline,
                                      tiny_zimage_pipeline)

PROMPT = "a red circle and a blue square"
ROOT = Path(__file__).resolve().parents[1]
BUILDS = {"chroma": tiny_chroma_pipeline, "qwenimage": tiny_qwenimage_pipeline, "zimage": tiny_zimage_pipeline,
          "flux2_klein": tiny_flux2_klein_pipeline}
#: keys of "red circle" / "blue square": T5 ▁a ▁red ▁circle ...; Qwen-Image: the prompt's tokens after the
#: 34 dropped; Z-Image, Flux.2: the chat template from <|im_start|> user \n on, so the prompt starts at key 3
KEYS = {"chroma": ((1, 2), (5, 6)), "qwenimage": ((1, 2), (5, 6)), "zimage": ((4, 5), (8, 9)),
        "flux2_klein": ((4, 5), (8, 9))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for name, build in BUILDS.items():
        made[name] = tmp_path_factory.mktemp(f"tiny-{name}")
        build(made[name], seed=0)
    return made


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: load_pipeline(folder, device="cpu", dtype=torch.float32) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def layout():
    return Layout.from_shapes(32, 32, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])


def theirs(pipe, **options):
    return pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=3, max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), output_type="np", **options).images


def test_load_pipeline_finds_the_families_and_their_defaults(pipes):
    assert {name: families.family(pipe) for name, pipe in pipes.items()} == {n: n for n in BUILDS}
    chroma, qwen, z = (model_defaults(pipes[n]) for n in ("chroma", "qwenimage", "zimage"))
    assert (z["guidance_scale"], z["negative_prompt"]) == (5.0, "")  # ZImagePipeline.__call__'s
    assert (chroma["guidance_scale"], chroma["negative_prompt"]) == (5.0, "")  # ChromaPipeline.__call__'s
    assert (qwen["true_cfg_scale"], qwen["negative_prompt"]) == (4.0, None)  # QwenImagePipeline.__call__'s
    assert families.native_size(pipes["chroma"]) == families.native_size(pipes["qwenimage"]) == (512, 512)


@pytest.mark.parametrize("case", ["chroma", "qwenimage", "qwenimage + negative", "zimage", "flux2_klein"])
def test_generate_at_the_defaults_equals_the_diffusers_pipeline(pipes, case):
    pipe = pipes[case.split()[0]]
    options = {"negative_prompt": "low quality"} if "negative" in case else {}
    ours = generate(pipe, PROMPT, seed=0, progress=False, **options)  # 32², 3 steps, 32 keys: mag_explore.json
    reference = theirs(pipe, **options)
    assert reference.std() > 0.01 and np.array_equal(ours.pixels, reference)
    if case == "qwenimage + negative":  # the second pass counts
        assert not np.array_equal(ours.pixels, theirs(pipe))


def test_processors_are_restored_after_an_exception(pipes, layout):
    class Boom(Control):
        def before_step(self, state):
            if state.step_index == 1:
                raise KeyboardInterrupt
            return state.latents

    for name in ("chroma", "qwenimage", "flux2_klein"):  # Z-Image: tests/test_zimage.py (no attn_processors)
        pipe = pipes[name]
        before = dict(pipe.transformer.attn_processors)
        with pytest.raises(KeyboardInterrupt):
            generate(pipe, PROMPT, progress=False, store=AttentionStore(),
                     controls=[MaskedAttentionSwap(layout, step_range=(0, 3)), Boom()])
        after = pipe.transformer.attn_processors
        assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


@pytest.mark.parametrize("name", list(BUILDS))
def test_swap_sets_the_region_keys_in_the_cond_pass(pipes, layout, name):
    store = AttentionStore(heads="all", dtype=torch.float32)
    generate(pipes[name], PROMPT, seed=0, progress=False, store=store,
             controls=[MaskedAttentionSwap(layout, step_range=(0, 1))])
    masks = layout.masks_at(4, 4).flatten(1)
    for layer in store.layers:
        maps = store.get(0, layer).flatten(2, 3)  # (1, heads, 16, tokens): what the layer used, after the swap
        for tokens, mask in zip(KEYS[name], masks):
            for t in tokens:
                assert torch.equal(maps[..., t], (mask / len(tokens)).expand_as(maps[..., t]))


@pytest.mark.parametrize("name", list(BUILDS))
def test_mag_changes_the_image(pipes, layout, name):
    plain = generate(pipes[name], PROMPT, seed=0, progress=False).pixels
    mag = MaskedAttentionGuidance(layout, alpha=5.0, step_range=(0, 1))
    steered = generate(pipes[name], PROMPT, seed=0, progress=False, controls=[mag])
    assert np.abs(steered.pixels - plain).max() > 1e-3 and mag.diagnostics["step"] == [0]


@pytest.mark.parametrize("name", list(BUILDS))
def test_mag_gradient_matches_a_finite_difference(pipes, layout, name):
    pipe = pipes[name]
    mag = MaskedAttentionGuidance(layout, alpha=1.0, step_range=(0, 1))
    sampler = Sampler(pipe, PROMPT, seed=0, controls=[mag])
    t, x = sampler.timesteps[0], sampler.latents.double().float()
    with families.install_attention_hooks(pipe, [mag.hook]) as attention:
        state = SimpleNamespace(pipe=pipe, attention_controller=attention, scheduler=sampler.scheduler, timestep=t,
                                cond=sampler.cond)
        loss, grad = guidance_pass(state, x, mag.hook)

        def loss_at(latents):
            mag.hook.reset()
            with torch.no_grad(), attention.phase_as("guidance", ("cond",)):
                families.denoise(pipe, latents, t, sampler.cond)
            return float(mag.hook.loss)

        assert loss_at(x) == pytest.approx(float(loss), rel=1e-6)
        eps = 1e-2
        for cell in [(0, 0, 0, 0), (0, 1, 3, 2), (0, 3, 2, 3)]:
            step = torch.zeros_like(x)
            step[cell] = eps
            numeric = (loss_at(x + step) - loss_at(x - step)) / (2 * eps)
            assert numeric == pytest.approx(float(grad[cell]), rel=0.05, abs=1e-4 * float(grad.abs().max()))
    assert grad.abs().max() > 0


@pytest.mark.parametrize("name", list(BUILDS))
def test_store_keeps_one_map_per_step_and_layer_of_the_prompts_keys(pipes, name):
    pipe = pipes[name]
    store = AttentionStore()
    generate(pipe, PROMPT, seed=0, progress=False, store=store)
    layers = families.family_of(pipe).attention_layer_names(pipe)
    prompt_keys = families.num_prompt_tokens(pipe, PROMPT, 32)
    assert len(store.layers) == len(layers) and store.step_indices == [0, 1, 2]
    assert store.nbytes == 3 * len(layers) * 16 * prompt_keys * 2  # steps x layers x 4x4 pixels x keys x fp16


@pytest.mark.parametrize("name,method", [("chroma", "mag"), ("qwenimage", "swap"), ("zimage", "mag"),
                                         ("flux2_klein", "swap")])
@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_cli_generate(folders, tmp_path, name, method):
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[:, :16] = (255, 0, 0)
    mask[:, 16:] = (0, 0, 255)
    Image.fromarray(mask).save(tmp_path / "layout.png")
    out = tmp_path / "out.png"
    command = [sys.executable, "-m", "mag_explore", "generate", "--model", str(folders[name]), "--prompt", PROMPT,
               "--layout", str(tmp_path / "layout.png"), "--regions",
               json.dumps({"#ff0000": "red circle", "#0000ff": "blue square"}), "--method", method,
               "--out", str(out), "--save-attention", str(tmp_path / "maps.safetensors")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and Image.open(out).size == (32, 32)
    assert len(AttentionStore.load(tmp_path / "maps.safetensors").layers) == {"chroma": 3, "qwenimage": 2, "zimage": 2, "flux2_klein": 3}[name]
