"""The engine on a chosen device and dtype: ``MAG_EXPLORE_TEST_DEVICE=cuda MAG_EXPLORE_TEST_DTYPE=fp16
python -m pytest -m device``.

Default: the CPU in float32 and in float16 (float16 on the CPU is what CI can check of the
Colab path). On a GPU the first session catches what the CPU cannot: a tensor a hook or control
made on the CPU (a mask, a schedule, a generator) that meets the model's on the GPU, and fp16
overflows. Every run is checked for finite latents, and a watcher hook checks that every
attention tensor the engine hands a hook is on the device in the model's dtype.

Covers: sampling (the engine), attention hooks and the store, every method (``METHOD_NAMES``),
MAG on SDXL, Flux.1 and SD3, inversion and editing, the playground widget's run, and the
exercises' engine hookups (``SwapHook``, ``LearnerMAG`` through ``check_full_mag``, ``capture_qk``,
``check_guidance_loss``).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mag_explore as mx
from mag_explore.course import exercises, solutions
from mag_explore.attention import AttentionHook
from mag_explore.sampling import Hooks
from mag_explore.testing.folders import write_tiny_folder

pytestmark = pytest.mark.device

DEVICE = os.environ.get("MAG_EXPLORE_TEST_DEVICE", "cpu")
DTYPES = [os.environ["MAG_EXPLORE_TEST_DTYPE"]] if os.environ.get("MAG_EXPLORE_TEST_DTYPE") else ["fp32", "fp16"]
PROMPT = "a red circle and a blue square"
RUN = dict(num_inference_steps=8, seed=0, progress=False)  # 8: layout guidance guides while t > 800


def layout(size: int = 64):
    return mx.Layout.from_shapes(size, size, [mx.rect("red circle", 0, 0, 0.5, 1), mx.rect("blue square", 0.5, 0, 1, 1)],
                                 prompt=PROMPT)


_folders: dict = {}


def load(kind: str, dtype: str, tmp_path_factory):
    if kind not in _folders:
        _folders[kind] = write_tiny_folder(kind, tmp_path_factory.mktemp(f"device-{kind}"))
    return mx.load_pipeline(_folders[kind], device=DEVICE, dtype=dtype)


@pytest.fixture(scope="module", params=DTYPES)
def sd(request, tmp_path_factory):
    return load("sd15", request.param, tmp_path_factory)


class Watcher(AttentionHook):
    """Records where the attention tensors the hooks get live, in every phase."""

    def __init__(self):
        self.seen = set()

    def active(self, ctx) -> bool:
        return True

    def observe(self, probs, ctx) -> None:
        self.seen.add((probs.device.type, probs.dtype))


def check_run(pipe, result, watcher=None):
    assert torch.isfinite(result.latents).all()
    if watcher is not None:
        device, dtype = torch.device(DEVICE).type, mx.families.denoiser(pipe).dtype
        assert watcher.seen and all(d == device for d, _ in watcher.seen), watcher.seen
        # probabilities in the model's dtype, or float32 where the engine upcasts them
        assert {t for _, t in watcher.seen} <= {dtype, torch.float32}, watcher.seen


@pytest.mark.parametrize("method", mx.methods.METHOD_NAMES)
def test_every_method_with_hooks_and_store(sd, method):
    watcher, store = Watcher(), mx.AttentionStore(device=DEVICE)  # a store kept on the device, too
    controls = mx.make_controls(method, layout()) + [Hooks(watcher)]
    result = mx.generate(sd, PROMPT, controls=controls, store=store, keep_latents=True, **RUN)
    check_run(sd, result, watcher)
    maps = store.aggregate(tokens=[2, 6])
    assert torch.isfinite(maps).all() and maps.shape[0] == 2


@pytest.mark.parametrize("kind", ["sdxl", "flux", "sd3"])
def test_mag_on_the_other_families(kind, tmp_path_factory):
    for dtype in DTYPES:
        pipe = load(kind, dtype, tmp_path_factory)
        size = mx.model_defaults(pipe)["height"]
        watcher = Watcher()
        mag = mx.MaskedAttentionGuidance(layout(size), step_range=(0, 2))
        result = mx.generate(pipe, PROMPT, controls=[mag, Hooks(watcher)], store=mx.AttentionStore(), **RUN)
        check_run(pipe, result, watcher)
        assert all(np.isfinite(v) for v in mag.diagnostics["loss"])
        learner = exercises.LearnerMAG(layout(size), solutions.mag_step, alpha=0.08, lmbda=0.5, step_range=(0, 2))
        check_run(pipe, mx.generate(pipe, PROMPT, controls=[learner], **RUN))


def test_inversion_and_editing(sd):
    image = np.full((64, 64, 3), 230, np.uint8)
    image[8:32, 8:32] = (255, 0, 0)
    image[32:56, 36:60] = (0, 0, 255)
    target = mx.Layout.from_shapes(64, 64, [mx.rect("red circle", 0.5, 0, 1, 0.5)], prompt=PROMPT)
    edited = mx.edit_image(sd, image, PROMPT, target, keep=["blue square"], start="inverted", num_inference_steps=4,
                           progress=False)
    assert np.isfinite(np.asarray(edited.image, dtype=float)).all()


def test_the_playground_runs(sd):
    from mag_explore.widgets import MagPlayground

    playground = MagPlayground(sd, layout(), num_inference_steps=4, seed=0)
    check_run(sd, playground.run())


def test_the_exercises_engine_hookups(sd):
    captured = exercises.capture_qk(sd, PROMPT, num_inference_steps=4)
    assert captured["q"].device.type == torch.device(DEVICE).type
    assert exercises.check_attention_probs(solutions.attention_probs, captured).passed
    for verdict in (exercises.check_swap_edit(solutions.swap_edit, sd, layout()),
                    exercises.check_full_mag(sd, layout(), solutions.mag_step, alpha=0.08, lmbda=0.5),
                    exercises.check_guidance_loss(solutions.share_loss, sd, layout())):
        assert verdict.passed, verdict.message
