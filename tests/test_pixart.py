"""PixArt-Σ on a tiny random build (mag_explore.testing.dit), against diffusers' PixArtSigmaPipeline
and against formulas written out here (tests/dit_checks.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline
from dit_checks import Recorder, captured_and_reference, mag_gradient_and_finite_differences, store_megabytes
from PIL import Image

from mag_explore import families
from mag_explore.attention import AttentionStore
from mag_explore.cli import build_parser, main
from mag_explore.layouts import Layout, rect
from mag_explore.methods import MaskedAttentionGuidance, MaskedAttentionSwap
from mag_explore.models import UnsupportedModelError, load_pipeline, model_defaults
from mag_explore.sampling import Control, Hooks, generate
from mag_explore.testing.dit import tiny_pixart_pipeline
from mag_explore.text.tokens import token_indices

PROMPT = "a red circle and a blue square"
#: T5 keys (no BOS): ▁a ▁red ▁circle ▁and ▁a ▁blue ▁square </s>, then <pad> up to 300
KEYS = ((1, 2), (5, 6))
LAYERS = ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    made = tmp_path_factory.mktemp("tiny-pixart")
    tiny_pixart_pipeline(made, seed=0)
    return made


@pytest.fixture(scope="module")
def pipe(folder):
    return load_pipeline(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def layout():
    return Layout.from_shapes(256, 256, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])


def theirs(pipe, prompt=PROMPT, **options):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **options).images


# ---------------------------------------------------------------- loading
def test_load_pipeline_gives_pixart_sigma_with_its_own_defaults(pipe, folder):
    assert isinstance(pipe, PixArtSigmaPipeline) and families.family(pipe) == "pixart_sigma"
    defaults = model_defaults(pipe)
    assert (defaults["height"], defaults["width"], defaults["num_inference_steps"]) == (256, 256, 20)
    assert (defaults["guidance_scale"], defaults["negative_prompt"], defaults["max_sequence_length"]) == (4.5, "", 300)
    weights = [f.name for f in (folder / "transformer").iterdir() if not f.name.endswith(".json")]
    assert weights and all(name.endswith(".safetensors") for name in weights)


@pytest.mark.parametrize("class_name,change,reason", [
    ("PixArtSigmaPipeline", {"text_encoder": ["transformers", "CLIPTextModel"]}, "not T5EncoderModel"),
    ("PixArtSigmaPipeline", {"scheduler": ["my_code", "MyScheduler"]}, "not a diffusers scheduler"),
    ("FluxKontextPipeline", {}, "editing pipeline"),
    ("PixArtAlphaPipeline", {}, "PixArtTransformer2DModel"),
])
def test_wrong_or_unsupported_pipelines_are_refused_before_loading(tmp_path, class_name, change, reason):
    index = {"_class_name": class_name, "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"], **change}
    (tmp_path / "model_index.json").write_text(json.dumps(index))  # no weights at all: only the index can answer
    with pytest.raises(UnsupportedModelError) as info:
        load_pipeline(tmp_path, device="cpu")
    assert class_name in str(info.value) and reason in str(info.value) and "PixArt-Σ" in str(info.value)


# ---------------------------------------------------------------- sampling
def test_generate_equals_the_diffusers_pipeline_at_its_defaults(pipe):
    scheduler = pipe.scheduler
    ours = generate(pipe, PROMPT, seed=0, progress=False)  # 20 DPM-Solver++ steps, CFG 4.5, negative "", 256²
    reference = theirs(pipe)
    assert reference.std() > 0.01 and np.array_equal(ours.pixels, reference) and pipe.scheduler is scheduler


def test_a_size_off_the_bins_is_sampled_at_its_bin_and_resized_back_as_diffusers(pipe):
    ours = generate(pipe, PROMPT, seed=0, progress=False, height=192, width=256, num_inference_steps=3)
    reference = theirs(pipe, height=192, width=256, num_inference_steps=3)
    assert ours.pixels.shape == reference.shape == (1, 192, 256, 3) and np.array_equal(ours.pixels, reference)
    assert ours.settings["generation_size"] == (208, 288)  # ASPECT_RATIO_256_BIN["0.72"]
    assert ours.latents.shape == (1, 4, 26, 36)


def test_fp16_runs_on_the_cpu():
    pipe = tiny_pixart_pipeline().to(torch.float16)
    result = generate(pipe, PROMPT, seed=0, progress=False, num_inference_steps=2)
    assert np.isfinite(result.pixels).all() and result.pixels.std() > 0.01


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("layer", LAYERS)
def test_captured_cross_attention_equals_an_independent_masked_softmax(pipe, layer):
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    probs, ctx, reference, cond = captured_and_reference(pipe, layer, PROMPT, latents, torch.tensor(500))
    assert probs.shape == (2, 2, 256, 300) and (ctx.height, ctx.width, ctx.place) == (16, 16, "block")
    assert torch.allclose(probs, reference, atol=1e-5) and probs[1, ..., :8].std() > 1e-2
    assert int(cond.mask[1].sum()) == 8 and int(cond.mask[0].sum()) == 1  # the prompt's 8 keys; "" is </s> alone
    assert float(probs[1, ..., 8:].abs().max()) == 0.0  # padded keys get nothing
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


def test_token_indices_follow_the_t5_keys_and_the_pipelines_lower_casing(pipe):
    keys = families.span_tokenizer(pipe)
    tokenizer = pipe.tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer("a purple ball and a purple box").input_ids) == [
        "▁a", "▁pur", "ple", "▁ball", "▁and", "▁a", "▁pur", "ple", "▁box", "</s>"]
    assert token_indices(keys, "a purple ball and a purple box", "purple", occurrence=2) == [6, 7]
    assert token_indices(keys, "A Red Circle and a RED square", "red", occurrence=2) == [5]
    assert [token_indices(keys, PROMPT, p) for p in ("red circle", "blue square")] == [list(k) for k in KEYS]
    short = families.span_tokenizer(pipe, max_sequence_length=4)  # ▁a ▁red ▁circle </s>
    with pytest.raises(ValueError, match="'blue square' is in the prompt .* cut off"):
        token_indices(short, PROMPT, "blue square")


def test_processors_are_restored_after_an_exception(pipe, layout):
    class Boom(Control):
        def before_step(self, state):
            if state.step_index == 1:
                raise KeyboardInterrupt
            return state.latents

    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(KeyboardInterrupt):
        generate(pipe, PROMPT, progress=False, store=AttentionStore(),
                 controls=[MaskedAttentionSwap(layout, step_range=(0, 3)), Boom()])
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_the_store_is_as_large_as_its_formula(pipe):
    store = AttentionStore()
    generate(pipe, PROMPT, seed=0, progress=False, store=store)  # 20 steps at 256²
    assert store.nbytes == store_megabytes(len(LAYERS), 20, 16 * 16, 8) * 1e6
    # PixArt-Σ XL-2 1024: 28 blocks, 64×64 tokens, 20 steps: 36.7 MB for an 8-token prompt, 1376 MB for all 300 keys
    assert round(store_megabytes(28, 20, 64 * 64, 8), 1) == 36.7
    assert round(store_megabytes(28, 20, 64 * 64, 300)) == 1376


# ---------------------------------------------------------------- methods
def test_swap_sets_the_region_tokens_in_the_cond_half_only(pipe, layout):
    recorder = Recorder()
    generate(pipe, PROMPT, seed=0, progress=False, num_inference_steps=2,
             controls=[Hooks(recorder), MaskedAttentionSwap(layout, step_range=(0, 1))])
    masks = layout.masks_at(16, 16).flatten(1)
    for before, (after, ctx) in list(zip(recorder.before, recorder.seen))[:len(LAYERS)]:
        cond, uncond = ctx.rows("cond"), ctx.rows("uncond")
        for tokens, mask in zip(KEYS, masks):
            for t in tokens:
                assert torch.equal(after[cond][..., t], (mask / len(tokens)).expand(1, 2, 256))
        assert torch.equal(after[uncond], before[uncond])


def test_mag_changes_the_image_and_its_gradient_matches_finite_differences(pipe, layout):
    plain = generate(pipe, PROMPT, seed=0, progress=False, num_inference_steps=4).pixels
    mag = MaskedAttentionGuidance(layout, alpha=5.0, step_range=(0, 1))
    steered = generate(pipe, PROMPT, seed=0, progress=False, num_inference_steps=4, controls=[mag])
    assert np.abs(steered.pixels - plain).max() > 1e-3 and mag.diagnostics["step"] == [0]
    grad, differences = mag_gradient_and_finite_differences(
        pipe, PROMPT, MaskedAttentionGuidance(layout, alpha=5.0, step_range=(0, 1)), num_inference_steps=4)
    assert grad.abs().min() > 0 and torch.allclose(grad, differences.to(grad.dtype), rtol=0.05, atol=1e-6)


# ---------------------------------------------------------------- the command line
@pytest.mark.parametrize("method", ["mag", "swap"])
def test_cli_generate(folder, tmp_path, method):
    mask = np.zeros((256, 256, 3), np.uint8)
    mask[:, :128] = (255, 0, 0)
    mask[:, 128:] = (0, 0, 255)
    Image.fromarray(mask).save(tmp_path / "layout.png")
    out = tmp_path / f"{method}.png"
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--layout", str(tmp_path / "layout.png"),
                 "--regions", json.dumps({"#ff0000": "red circle", "#0000ff": "blue square"}), "--method", method,
                 "--steps", "4", "--out", str(out)])
    assert code == 0 and Image.open(out).size == (256, 256)


def test_cli_help_names_the_families():
    text = build_parser().format_help() + build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert all(name in text for name in ("SDXL", "Flux.1", "SD3", "PixArt-Σ", "Sana"))
