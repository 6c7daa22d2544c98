"""SD3.5 loads as SD3: its two differences, on tiny builds, against StableDiffusion3Pipeline and formulas here.

* SD3.5 Large: RMS norm on every query and key (``qk_norm="rms_norm"``: image and text projections).
* SD3.5 Medium: also an extra image-only self-attention (``attn2``) in the blocks listed in
  ``dual_attention_layers``; it has no text keys, so it is not hooked and keeps its processor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from mag_explore import families
from mag_explore.attention import AttentionHook
from mag_explore.attention.joint import joint_attention_hooks, joint_attention_layer_names
from mag_explore.layouts import Layout, rect
from mag_explore.methods import MaskedAttentionGuidance, MaskedAttentionSwap
from mag_explore.models import load_pipeline
from mag_explore.sampling import Hooks, generate
from mag_explore.testing.mmdit import tiny_sd3_pipeline

PROMPT = "a red circle and a blue square"
VARIANTS = {"large": {"qk_norm": "rms_norm"}, "medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    made = {}
    for name, options in VARIANTS.items():
        folder = tmp_path_factory.mktemp(f"tiny-sd35-{name}")
        tiny_sd3_pipeline(folder, seed=0, transformer_options=options)
        made[name] = load_pipeline(folder, device="cpu", dtype=torch.float32)
    return made


class Seen(AttentionHook):
    def __init__(self):
        self.seen = []

    def observe(self, probs, ctx):
        self.seen.append((probs.detach().clone(), ctx))


def rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def reference_image_to_text(attn, image, text):
    """softmax(QKᵀ/√d) of [image; text] with each projection RMS-normed per head, the image→text block."""
    split = lambda x: x.view(x.shape[0], x.shape[1], attn.heads, -1)  # noqa: E731
    q = torch.cat([rms(split(attn.to_q(image)), attn.norm_q), rms(split(attn.add_q_proj(text)), attn.norm_added_q)], 1)
    k = torch.cat([rms(split(attn.to_k(image)), attn.norm_k), rms(split(attn.add_k_proj(text)), attn.norm_added_k)], 1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return probs[..., : image.shape[1], image.shape[1]:]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_sd35_loads_as_sd3_and_generates_the_pipelines_pixels(pipes, name):
    pipe = pipes[name]
    assert isinstance(pipe, StableDiffusion3Pipeline) and families.family(pipe) == "sd3"
    assert pipe.transformer.transformer_blocks[0].attn.norm_q is not None  # q/k RMS norm really built
    ours = generate(pipe, PROMPT, height=32, width=32, num_inference_steps=3, max_sequence_length=32, seed=0,
                    progress=False)
    theirs = pipe(PROMPT, height=32, width=32, num_inference_steps=3, max_sequence_length=32,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert theirs.std() > 0.01 and np.array_equal(ours.pixels, theirs)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_captured_block_equals_a_softmax_of_rms_normed_queries_and_keys(pipes, name):
    pipe = pipes[name]
    module = pipe.transformer.transformer_blocks[0].attn
    inputs = {}
    handle = module.register_forward_pre_hook(lambda m, a, kw: inputs.update(kw), with_kwargs=True)
    cond = families.encode_prompt(pipe, PROMPT, 2, max_sequence_length=32)
    seen = Seen()
    try:
        with joint_attention_hooks(pipe.transformer, [seen]), torch.no_grad():
            families.denoise(pipe, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500.0, cond)
    finally:
        handle.remove()
    probs, ctx = seen.seen[0]
    with torch.no_grad():
        reference = reference_image_to_text(module, inputs["hidden_states"], inputs["encoder_hidden_states"])
    assert ctx.layer == "transformer_blocks.0.attn" and probs.shape == reference.shape == (2, 2, 16, 77 + 32)
    assert torch.allclose(probs, reference, atol=1e-5) and probs.std() > 1e-3


def test_medium_extra_image_attention_is_left_alone_and_runs_its_own_processor(pipes):
    pipe = pipes["medium"]
    transformer = pipe.transformer
    assert transformer.transformer_blocks[0].attn2 is not None and transformer.transformer_blocks[1].attn2 is None
    extra = "transformer_blocks.0.attn2.processor"
    before = transformer.attn_processors[extra]
    calls = []
    hooked = []
    with joint_attention_hooks(transformer, [Seen()]):
        hooked = list(transformer.attn_processors)
        assert transformer.attn_processors[extra] is before  # not ours: it has no text keys
        handle = transformer.transformer_blocks[0].attn2.register_forward_hook(lambda *a: calls.append(1))
        try:
            generate(pipe, PROMPT, num_inference_steps=2, progress=False)
        finally:
            handle.remove()
    assert calls and joint_attention_layer_names(transformer) == [f"transformer_blocks.{i}.attn" for i in range(2)]
    assert extra in hooked and transformer.attn_processors[extra] is before


def test_swap_and_mag_run_on_medium(pipes):
    pipe = pipes["medium"]
    layout = Layout.from_shapes(32, 32, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])
    plain = generate(pipe, PROMPT, seed=0, progress=False).pixels
    swapped = generate(pipe, PROMPT, seed=0, progress=False, controls=[MaskedAttentionSwap(layout, step_range=(0, 1))])
    mag = MaskedAttentionGuidance(layout, alpha=5.0, step_range=(0, 1))
    steered = generate(pipe, PROMPT, seed=0, progress=False, controls=[mag, Hooks(Seen())])
    assert np.abs(swapped.pixels - plain).max() > 1e-4 and np.abs(steered.pixels - plain).max() > 1e-4
    assert mag.diagnostics["step"] == [0] and np.isfinite(mag.diagnostics["loss"][0])
