"""Flux.1 and SD3 on tiny random pipelines (mag_explore.testing.mmdit), against diffusers' own
FluxPipeline / StableDiffusion3Pipeline and against formulas written out here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from mag_explore import families
from mag_explore.attention import AttentionHook, AttentionStore
from mag_explore.attention.joint import joint_attention_hooks, joint_attention_layer_names
from mag_explore.layouts import Layout, rect
from mag_explore.methods import LayoutGuidance, MaskedAttentionGuidance, MaskedAttentionSwap, PaintWithWords
from mag_explore.models import load_pipeline, model_defaults
from mag_explore.sampling import Control, Hooks, Sampler, generate
from mag_explore.schedule import sigma_as_timestep
from mag_explore.testing.mmdit import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPT = "a red circle and a blue square"
ROOT = Path(__file__).resolve().parents[1]
#: Token indices of "red circle" and "blue square" in the text keys. T5 pieces: ▁a ▁red ▁circle ▁and ▁a ▁blue
#: ▁square </s> (no BOS). SD3: CLIP's <|startoftext|> a red circle ... at 0-8, then T5 at 77 + j.
KEYS = {"flux": ((1, 2), (5, 6)), "sd3": ((2, 3, 78, 79), (6, 7, 82, 83))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for name, build in (("flux", tiny_flux_pipeline), ("sd3", tiny_sd3_pipeline)):
        made[name] = tmp_path_factory.mktemp(f"tiny-{name}")
        build(made[name], seed=0)
    return made


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: load_pipeline(folder, device="cpu", dtype=torch.float32) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def layout():
    return Layout.from_shapes(32, 32, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])


class Recorder(AttentionHook):
    """Keeps the image→text block each layer saw before any edit, the block it used, and the whole joint matrix."""

    def __init__(self, phases=("denoise",)):
        self.before, self.seen, self.joint, self.phases = [], [], [], phases

    def active(self, ctx):
        return ctx.phase in self.phases

    def edit_probs(self, probs, ctx):
        self.before.append(probs.detach().clone())

    def observe(self, probs, ctx):
        self.seen.append((probs.detach().clone(), ctx))

    def observe_joint(self, probs, ctx):
        self.joint.append(probs.detach().clone())


def theirs(pipe, **options):
    return pipe(PROMPT, height=32, width=32, num_inference_steps=3, max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), output_type="np", **options).images


# ---------------------------------------------------------------- loading, sampling
def test_load_pipeline_gives_flux_and_sd3_with_their_defaults(pipes):
    assert isinstance(pipes["flux"], FluxPipeline) and isinstance(pipes["sd3"], StableDiffusion3Pipeline)
    assert [families.family(pipes[n]) for n in ("flux", "sd3")] == ["flux", "sd3"]
    flux, sd3 = model_defaults(pipes["flux"]), model_defaults(pipes["sd3"])
    assert (flux["guidance_scale"], flux["true_cfg_scale"], flux["negative_prompt"]) == (3.5, 1.0, None)
    assert (sd3["guidance_scale"], sd3["negative_prompt"], sd3["max_sequence_length"]) == (7.0, None, 32)


@pytest.mark.parametrize("case", ["flux", "flux true cfg", "sd3", "sd3 cfg 5 + negative", "sd3 without t5"])
def test_generate_equals_the_diffusers_pipeline(pipes, case):
    pipe = tiny_sd3_pipeline(with_t5=False) if case == "sd3 without t5" else pipes[case.split()[0]]
    options = {"flux true cfg": dict(negative_prompt="low quality", true_cfg_scale=4.0),
               "sd3 cfg 5 + negative": dict(guidance_scale=5.0, negative_prompt="low quality")}.get(case, {})
    scheduler = pipe.scheduler
    ours = generate(pipe, PROMPT, height=32, width=32, num_inference_steps=3, max_sequence_length=32, seed=0,
                    progress=False, **options)
    reference = theirs(pipe, **options)
    assert reference.std() > 0.01 and np.array_equal(ours.pixels, reference)
    assert pipe.scheduler is scheduler and ours.latents.shape == (1, 4, 8, 8)  # unpacked, also for Flux
    if case == "flux true cfg":  # the second pass counts
        assert not np.array_equal(ours.pixels, theirs(pipe))


def test_flux_schedule_is_shifted_by_mu_as_in_flux_pipeline(pipes):
    sampler = Sampler(pipes["flux"], PROMPT, num_inference_steps=4, seed=0)
    # calculate_shift for 4x4 = 16 image tokens, written out; sigmas 1, 3/4, 1/2, 1/4 shifted by exp(mu)
    mu = 16 * (1.15 - 0.5) / (4096 - 256) + 0.5 - (1.15 - 0.5) / (4096 - 256) * 256
    base = np.linspace(1.0, 1 / 4, 4)
    shifted = np.exp(mu) / (np.exp(mu) + (1 / base - 1))
    assert np.allclose(sampler.scheduler.sigmas[:-1].numpy(), shifted, atol=1e-6)
    assert sampler.timesteps == [int(t) for t in shifted * 1000]


# ---------------------------------------------------------------- the joint-attention processor
def rms_norm(x, module):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight


def rotate(x, cos, sin):
    """Rotary embedding on (batch, sequence, heads, dim): pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def reference_probs(name, attn, inputs, text_len):
    """softmax(QKᵀ/√d) of the whole joint sequence, from the layer's inputs, by hand."""
    heads = attn.heads
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, -1)  # noqa: E731
    x = inputs["hidden_states"]
    q, k = split(attn.to_q(x)), split(attn.to_k(x))
    if name == "sd3":
        text = inputs["encoder_hidden_states"]
        q, k = torch.cat([q, split(attn.add_q_proj(text))], 1), torch.cat([k, split(attn.add_k_proj(text))], 1)
    else:
        q, k = rms_norm(q, attn.norm_q), rms_norm(k, attn.norm_k)
        if inputs.get("encoder_hidden_states") is not None:  # double-stream: text first, own projections
            text = inputs["encoder_hidden_states"]
            q = torch.cat([rms_norm(split(attn.add_q_proj(text)), attn.norm_added_q), q], 1)
            k = torch.cat([rms_norm(split(attn.add_k_proj(text)), attn.norm_added_k), k], 1)
        cos, sin = inputs["image_rotary_emb"]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


@pytest.mark.parametrize("name,layer", [("flux", "transformer_blocks.0.attn"), ("flux", "single_transformer_blocks.1.attn"),
                                        ("sd3", "transformer_blocks.1.attn")])
def test_captured_image_text_block_equals_an_independent_softmax(pipes, name, layer):
    pipe = pipes[name]
    module = pipe.transformer.get_submodule(layer)
    inputs = {}
    handle = module.register_forward_pre_hook(lambda m, a, kw: inputs.update(kw), with_kwargs=True)
    cond = families.encode_prompt(pipe, PROMPT, 2, max_sequence_length=32, guidance_scale=3.5)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    recorder = Recorder()
    try:
        with joint_attention_hooks(pipe.transformer, [recorder]), torch.no_grad():
            families.denoise(pipe, latents, 500.0, cond)
    finally:
        handle.remove()
    layers = joint_attention_layer_names(pipe.transformer)
    index = layers.index(layer)
    (probs, ctx), joint = recorder.seen[index], recorder.joint[index]
    with torch.no_grad():
        reference = reference_probs(name, module, inputs, 32)
    text = 32 if name == "flux" else 77 + 32
    rows, cols = (slice(text, None), slice(0, text)) if name == "flux" else (slice(0, 24), slice(24, None))
    assert probs.shape == (2, 2, 24, text) and (ctx.height, ctx.width) == (4, 6)
    assert ctx.place == {"transformer_blocks.0.attn": "double", "single_transformer_blocks.1.attn": "single"}.get(
        layer, "joint") and ctx.text_first == (name == "flux") and ctx.num_text_tokens == text
    assert torch.allclose(probs, reference[..., rows, cols], atol=1e-5) and probs.std() > 1e-3
    assert torch.allclose(joint, reference, atol=1e-5)
    assert torch.allclose(joint.sum(-1), torch.ones(()), atol=1e-5)  # every query row of the joint softmax


def test_processors_are_restored_after_an_exception(pipes, layout):
    class Boom(Control):
        def before_step(self, state):
            if state.step_index == 1:
                raise KeyboardInterrupt
            return state.latents

    for pipe in pipes.values():
        before = dict(pipe.transformer.attn_processors)
        with pytest.raises(KeyboardInterrupt):
            generate(pipe, PROMPT, progress=False, store=AttentionStore(),
                     controls=[MaskedAttentionSwap(layout, step_range=(0, 3)), Boom()])
        after = pipe.transformer.attn_processors
        assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_layers_without_an_active_hook_keep_the_fused_kernel(pipes):
    pipe = pipes["flux"]
    plain = generate(pipe, PROMPT, seed=0, progress=False).pixels
    idle = type("Idle", (AttentionHook,), {"active": lambda self, ctx: False})()
    assert np.array_equal(generate(pipe, PROMPT, seed=0, progress=False, controls=[Hooks(idle)]).pixels, plain)


# ---------------------------------------------------------------- methods
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_swap_sets_the_region_tokens_and_leaves_the_rest_of_the_row(pipes, layout, name):
    recorder = Recorder()
    generate(pipes[name], PROMPT, seed=0, progress=False,
             controls=[Hooks(recorder), MaskedAttentionSwap(layout, step_range=(0, 1))])
    layers = len(joint_attention_layer_names(pipes[name].transformer))
    calls = 2 if name == "sd3" else 1  # SD3: one batch [uncond, cond]; Flux: the cond pass only (no true CFG)
    assert len(recorder.seen) == 3 * layers
    for before, (after, ctx), joint in list(zip(recorder.before, recorder.seen, recorder.joint))[:layers]:
        cond = ctx.rows("cond")
        assert len(ctx.batch_roles) == calls
        masks = layout.masks_at(4, 4).flatten(1)
        swapped = [t for tokens in KEYS[name] for t in tokens]
        for tokens, mask in zip(KEYS[name], masks):
            for t in tokens:
                assert torch.equal(after[cond][..., t], (mask / len(tokens)).expand(1, 2, 16))
        others = [t for t in range(after.shape[-1]) if t not in swapped]
        assert torch.equal(after[cond][..., others], before[cond][..., others])  # the other text keys: untouched
        # the image keys too: each row's sum moved by exactly the swapped tokens' change
        change = after[cond][..., swapped].sum(-1) - before[cond][..., swapped].sum(-1)
        rows = slice(-16, None) if ctx.text_first else slice(0, 16)
        assert torch.allclose(joint[cond][..., rows, :].sum(-1), 1 + change, atol=1e-5)
        if calls == 2:
            assert torch.equal(after[ctx.rows("uncond")], before[ctx.rows("uncond")])
    with pytest.raises(ValueError, match="renormalize=True.*joint attention"):
        generate(pipes[name], PROMPT, progress=False, controls=[MaskedAttentionSwap(layout, renormalize=True)])


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_mag_changes_the_image_and_its_loss_is_the_sum_written_out(pipes, layout, name):
    pipe = pipes[name]
    plain = generate(pipe, PROMPT, seed=0, progress=False).pixels
    recorder = Recorder(phases=("guidance",))
    mag = MaskedAttentionGuidance(layout, alpha=5.0, step_range=(0, 1))
    steered = generate(pipe, PROMPT, seed=0, progress=False, controls=[Hooks(recorder), mag])
    assert np.abs(steered.pixels - plain).max() > 1e-3 and mag.diagnostics["step"] == [0]
    layers = len(joint_attention_layer_names(pipe.transformer))
    assert len(recorder.seen) == layers and all(c.batch_roles == ("cond",) for _, c in recorder.seen)
    expected = 0.0
    for probs, ctx in recorder.seen:
        for tokens, mask in zip(KEYS[name], layout.masks_at(ctx.height, ctx.width).flatten(1)):
            attention = probs[..., list(tokens)].sum(-1)
            expected += float(-(attention * mask).sum() + 0.5 * (attention * (1 - mask)).sum())
    assert mag.diagnostics["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_while_t_above_700_is_sigma_above_0_7(pipes, layout):
    mag = MaskedAttentionGuidance(layout, alpha=1.0, while_t_above=700)
    sampler = Sampler(pipes["sd3"], PROMPT, num_inference_steps=8, seed=0, controls=[mag])
    sampler.run(progress=False)
    sigmas = sampler.scheduler.sigmas[:-1]
    assert mag.diagnostics["step"] == [i for i, s in enumerate(sigmas) if s > 0.7] != []
    assert 0 < len(mag.diagnostics["step"]) < 8
    assert sigma_as_timestep(0.7) == 700 and mag.settings["while_t_above"] == 700
    with pytest.raises(ValueError, match="sigma=1.5"):
        sigma_as_timestep(1.5)


def test_baselines_say_they_are_not_defined_on_joint_attention(pipes, layout):
    for control in (PaintWithWords(layout), LayoutGuidance(layout)):
        with pytest.raises(NotImplementedError, match="UNet cross-attention.*flux"):
            generate(pipes["flux"], PROMPT, progress=False, controls=[control])


def test_flux_only_options_are_refused_elsewhere(pipes):
    with pytest.raises(ValueError, match="true_cfg_scale=2.0 is a setting of flux"):
        Sampler(pipes["sd3"], PROMPT, true_cfg_scale=2.0)


# ---------------------------------------------------------------- the command line
@pytest.mark.parametrize("name", ["flux", "sd3"])
@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_cli_generate_with_mag(folders, tmp_path, name):
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[:, :16] = (255, 0, 0)
    mask[:, 16:] = (0, 0, 255)
    Image.fromarray(mask).save(tmp_path / "layout.png")
    out = tmp_path / "mag.png"
    command = [sys.executable, "-m", "mag_explore", "generate", "--model", str(folders[name]), "--prompt", PROMPT,
               "--layout", str(tmp_path / "layout.png"), "--regions",
               json.dumps({"#ff0000": "red circle", "#0000ff": "blue square"}), "--method", "mag",
               "--out", str(out), "--save-attention", str(tmp_path / "maps.safetensors")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and Image.open(out).size == (32, 32)
    layers = {"flux": 3, "sd3": 2}[name]
    assert len(AttentionStore.load(tmp_path / "maps.safetensors").layers) == layers


def test_cli_true_cfg_is_fluxpipelines_true_cfg_scale(folders, pipes, tmp_path):
    from mag_explore.cli import main

    out = tmp_path / "true_cfg.png"
    code = main(["generate", "--model", str(folders["flux"]), "--prompt", PROMPT, "--method", "none", "--seed", "0",
                 "--negative-prompt", "low quality", "--true-cfg", "4", "--out", str(out)])
    assert code == 0
    reference = theirs(pipes["flux"], negative_prompt="low quality", true_cfg_scale=4.0)[0]
    assert np.array_equal(np.asarray(Image.open(out)), (reference * 255).round().astype(np.uint8))
    assert not np.array_equal(reference, theirs(pipes["flux"], negative_prompt="low quality")[0])
