"""The learner's MAG (``exercises.LearnerMAG``) runs the engine's guidance pass, so it works on every
family and dtype the engine does, and gives ``MaskedAttentionGuidance``'s result.

The reference is the package's MAG, an independent implementation of the same math: its loss
(``MagLossHook`` with ``mag_loss_terms``) and its gradient step (``MaskedAttentionGuidance.before_step``), against the
learner's side, ``solutions.mag_step`` on ``GuidanceInputs``. The pipelines are the tiny random ones
saved (``python -m mag_explore.testing.folders``) and loaded in float16 on the CPU: the dtype a
user gets on Colab.
"""
from __future__ import annotations

import pytest
import torch

import mag_explore as mx
from mag_explore import families
from mag_explore.course import exercises, solutions
from mag_explore.testing import mmdit as testing_mmdit
from mag_explore.methods import MaskedAttentionGuidance
from mag_explore.testing.folders import write_tiny_folder

RUN = dict(num_inference_steps=4, height=64, width=64, seed=0, progress=False)


def layout():
    return mx.Layout.from_shapes(64, 64, [mx.rect("red circle", 0, 0, 0.5, 1), mx.rect("blue square", 0.5, 0, 1, 1)],
                                 prompt="a red circle and a blue square")


@pytest.fixture(scope="module", params=[("sd15", torch.float16), ("sd15", torch.float32), ("sdxl", torch.float16),
                                        ("flux", torch.float16), ("sd3", torch.float16)],
                ids=lambda p: f"{p[0]}-{str(p[1]).split('.')[-1]}")
def pipe(request, tmp_path_factory):
    # as a user loads a model (MAG_EXPLORE_MODEL=<folder>, MAG_EXPLORE_DTYPE=fp16): a folder, cast on loading
    kind, dtype = request.param
    folder = write_tiny_folder(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
    loaded = mx.load_pipeline(folder, device="cpu", dtype=dtype)
    assert families.denoiser(loaded).dtype == dtype
    return loaded


def test_learner_mag_equals_the_packages_mag_with_the_papers_settings(pipe):
    # the call, as notebook 04 makes it ("full MAG with your step")
    ctl = exercises.LearnerMAG(layout(), solutions.mag_step, alpha=0.08, lmbda=0.5, while_t_above=500)
    ours = mx.generate(pipe, layout().prompt, controls=[ctl], **RUN)
    ref = MaskedAttentionGuidance(layout(), alpha=0.08, lmbda=0.5, while_t_above=500, step_rule="official",
                                  loss_fn="official")
    want = mx.generate(pipe, layout().prompt, controls=[ref], **RUN)
    plain = mx.generate(pipe, layout().prompt, **RUN)
    assert ctl.guided_steps and ctl.guided_steps == ref.diagnostics["step"]
    assert torch.allclose(ours.latents, want.latents, atol=1e-5, rtol=1e-4), (ours.latents - want.latents).abs().max()
    assert not torch.allclose(want.latents, plain.latents, atol=1e-3)  # MAG moved x_t: the comparison means something
    assert torch.isfinite(ours.latents).all()


def test_check_full_mag_passes_with_the_solution(pipe):
    verdict = exercises.check_full_mag(pipe, layout(), solutions.mag_step, alpha=0.08, lmbda=0.5)
    assert verdict.passed, verdict.message


def test_the_learner_sees_every_layer_of_its_family_in_float32(pipe):
    seen = {}

    def step(inputs, alpha, lmbda):
        layers = inputs.attention_of(inputs.x_t.detach().requires_grad_(True), inputs.cond_embeddings)
        seen["layers"] = layers
        seen["x_t"] = inputs.x_t
        return inputs.x_t

    mx.generate(pipe, layout().prompt, controls=[exercises.LearnerMAG(layout(), step, 0.08, step_range=(0, 1))], **RUN)
    assert seen["layers"] and all(p.dtype == m.dtype == torch.float32 for p, m in seen["layers"])
    assert seen["x_t"].dtype == torch.float32  # the update is made in float32, as MAG's


def test_capture_qk_says_in_one_line_that_it_needs_a_unet():
    flux = testing_mmdit.tiny_flux_pipeline()
    with pytest.raises(ValueError, match=r"capture_qk reads a UNet's cross-attention; FluxPipeline .* capture_joint_qk"):
        exercises.capture_qk(flux, "a red circle")


def test_the_tiny_folder_command_names_the_kinds_it_accepts(tmp_path):
    with pytest.raises(ValueError, match=r"kind='sd9' is not a tiny model; kinds: sd15, sdxl, flux, sd3"):
        write_tiny_folder("sd9", tmp_path / "x")
