"""Sana on a tiny random build (mag_explore.testing.dit), against diffusers' SanaPipeline and against
formulas written out here (tests/dit_checks.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline
from dit_checks import Recorder, captured_and_reference, mag_gradient_and_finite_differences, store_megabytes
from PIL import Image

from mag_explore import families
from mag_explore.attention import AttentionStore
from mag_explore.cli import main
from mag_explore.families.sana import default_instruction
from mag_explore.layouts import Layout, rect
from mag_explore.methods import MaskedAttentionGuidance, MaskedAttentionSwap
from mag_explore.models import UnsupportedModelError, load_pipeline, model_defaults
from mag_explore.sampling import Control, Hooks, generate
from mag_explore.testing.dit import tiny_sana_pipeline
from mag_explore.text.tokens import token_indices

PROMPT = "a red circle and a blue square"
#: keys: <bos>, then the prompt (its first word absorbs the instruction's trailing space): ▁a ▁red ▁circle ...
KEYS = ((2, 3), (6, 7))
LAYERS = ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    made = tmp_path_factory.mktemp("tiny-sana")
    tiny_sana_pipeline(made, seed=0)
    return made


@pytest.fixture(scope="module")
def pipe(folder):
    return load_pipeline(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def layout():
    return Layout.from_shapes(1024, 1024, [rect("red circle", 0, 0, 0.5, 1), rect("blue square", 0.5, 0, 1, 1)])


def test_load_pipeline_gives_sana_with_its_own_defaults(pipe, folder):
    assert isinstance(pipe, SanaPipeline) and families.family(pipe) == "sana"
    defaults = model_defaults(pipe)
    assert (defaults["height"], defaults["width"], defaults["num_inference_steps"]) == (1024, 1024, 20)
    assert (defaults["guidance_scale"], defaults["negative_prompt"], defaults["max_sequence_length"]) == (4.5, "", 300)
    weights = [f.name for f in (folder / "text_encoder").iterdir() if not f.name.endswith(".json")]
    assert weights and all(name.endswith(".safetensors") for name in weights)


def test_a_sana_index_with_a_foreign_text_encoder_is_refused_before_loading(tmp_path):
    index = {"_class_name": "SanaPipeline", "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "GemmaTokenizer"],
             "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="SanaPipeline.*not Gemma2Model.*Sana"):
        load_pipeline(tmp_path, device="cpu")


def test_generate_equals_the_diffusers_pipeline_at_its_defaults(pipe):
    ours = generate(pipe, PROMPT, seed=0, progress=False)  # 20 DPM-Solver++ flow steps, CFG 4.5, 1024²
    reference = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert reference.std() > 0.01 and np.array_equal(ours.pixels, reference)


def test_a_size_off_the_bins_is_sampled_at_its_bin_and_resized_back_as_diffusers(pipe):
    ours = generate(pipe, PROMPT, seed=0, progress=False, height=768, width=1024, num_inference_steps=3)
    reference = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", height=768, width=1024,
                     num_inference_steps=3).images
    assert ours.pixels.shape == reference.shape == (1, 768, 1024, 3) and np.array_equal(ours.pixels, reference)
    assert ours.settings["generation_size"] == (832, 1152)  # ASPECT_RATIO_1024_BIN["0.72"]


def test_fp16_runs_on_the_cpu():
    pipe = tiny_sana_pipeline().to(torch.float16)
    result = generate(pipe, PROMPT, seed=0, progress=False, num_inference_steps=2)
    assert np.isfinite(result.pixels).all() and result.pixels.std() > 0.01


def test_the_keys_are_bos_and_the_last_positions_of_instruction_plus_prompt(pipe):
    tokenizer, instruction = pipe.tokenizer, "\n".join(default_instruction())
    read = len(tokenizer.encode(instruction)) + 300 - 2  # what SanaPipeline pads to
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(instruction + PROMPT).input_ids)
    pieces += ["<pad>"] * (read - len(pieces))
    kept = [pieces[0]] + pieces[read - 299:]
    assert kept[:9] == ["<bos>", "▁a", "▁red", "▁circle", "▁and", "▁a", "▁blue", "▁square", "<pad>"]
    keys = families.span_tokenizer(pipe)
    assert [token_indices(keys, PROMPT, p) for p in ("red circle", "blue square")] == [list(k) for k in KEYS]
    # <bos> ▁a ▁pur ple ▁ball ▁and ▁a ▁pur ple ▁box: the second "purple" is two pieces, keys 7 and 8
    assert token_indices(keys, "A purple ball and a PURPLE box", "purple", occurrence=2) == [7, 8]
    assert families.num_prompt_tokens(pipe, PROMPT) == 8
    short = families.span_tokenizer(pipe, max_sequence_length=5)  # <bos> + the last 4 of the read tokens
    with pytest.raises(ValueError, match="'blue square' is in the prompt .* cut off"):
        token_indices(short, PROMPT, "blue square")


@pytest.mark.parametrize("layer", LAYERS)
def test_captured_cross_attention_equals_an_independent_masked_softmax(pipe, layer):
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    probs, ctx, reference, cond = captured_and_reference(pipe, layer, PROMPT, latents, torch.tensor(500.0))
    assert probs.shape == (2, 2, 1024, 300) and (ctx.height, ctx.width, ctx.place) == (32, 32, "block")
    assert torch.allclose(probs, reference, atol=1e-5) and probs[1, ..., :8].std() > 1e-2
    assert int(cond.mask[1].sum()) == 8 and int(cond.mask[0].sum()) == 1  # <bos> + 7 prompt keys; "": <bos>
    assert float(probs[1, ..., 8:].abs().max()) == 0.0 and torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


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
    generate(pipe, PROMPT, seed=0, progress=False, store=store)  # 20 steps at 1024²: 32×32 tokens
    assert store.nbytes == store_megabytes(len(LAYERS), 20, 32 * 32, 8) * 1e6
    # Sana 1600M at 1024²: 20 blocks, 32×32 tokens, 20 steps: 6.6 MB for 8 keys, 246 MB for all 300
    assert round(store_megabytes(20, 20, 32 * 32, 8), 1) == 6.6 and round(store_megabytes(20, 20, 1024, 300)) == 246


def test_swap_sets_the_region_tokens_in_the_cond_half_only(pipe, layout):
    recorder = Recorder()
    generate(pipe, PROMPT, seed=0, progress=False, num_inference_steps=2,
             controls=[Hooks(recorder), MaskedAttentionSwap(layout, step_range=(0, 1))])
    masks = layout.masks_at(32, 32).flatten(1)
    for before, (after, ctx) in list(zip(recorder.before, recorder.seen))[:len(LAYERS)]:
        cond, uncond = ctx.rows("cond"), ctx.rows("uncond")
        for tokens, mask in zip(KEYS, masks):
            for t in tokens:
                assert torch.equal(after[cond][..., t], (mask / len(tokens)).expand(1, 2, 1024))
        assert torch.equal(after[uncond], before[uncond])


def test_mag_changes_the_image_and_its_gradient_matches_finite_differences(pipe, layout):
    plain = generate(pipe, PROMPT, seed=0, progress=False, num_inference_steps=4).pixels
    mag = MaskedAttentionGuidance(layout, alpha=5.0, step_range=(0, 1))
    steered = generate(pipe, PROMPT, seed=0, progress=False, num_inference_steps=4, controls=[mag])
    assert np.abs(steered.pixels - plain).max() > 1e-3 and mag.diagnostics["step"] == [0]
    grad, differences = mag_gradient_and_finite_differences(
        pipe, PROMPT, MaskedAttentionGuidance(layout, alpha=5.0, step_range=(0, 1)), num_inference_steps=4)
    assert grad.abs().min() > 0 and torch.allclose(grad, differences.to(grad.dtype), rtol=0.05, atol=1e-6)


@pytest.mark.parametrize("method", ["mag", "swap"])
def test_cli_generate(folder, tmp_path, method):
    mask = np.zeros((1024, 1024, 3), np.uint8)
    mask[:, :512] = (255, 0, 0)
    mask[:, 512:] = (0, 0, 255)
    Image.fromarray(mask).save(tmp_path / "layout.png")
    out = tmp_path / f"{method}.png"
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--layout", str(tmp_path / "layout.png"),
                 "--regions", json.dumps({"#ff0000": "red circle", "#0000ff": "blue square"}), "--method", method,
                 "--steps", "4", "--out", str(out)])
    assert code == 0 and Image.open(out).size == (1024, 1024)


def test_q_k_norm_across_heads_is_applied_before_the_head_split():
    # Sana 1.5's cross-attention normalises q and k over all heads at once (RMSNorm of width heads × dim)
    pipe = tiny_sana_pipeline(transformer_options={"qk_norm": "rms_norm_across_heads"})
    attn = pipe.transformer.transformer_blocks[0].attn2
    assert attn.norm_q.weight.shape == (16,)  # 2 heads × 8
    with torch.no_grad():  # a non-trivial norm weight, so that a wrong placement shows
        attn.norm_q.weight.copy_(torch.linspace(0.5, 2.0, 16))
        attn.norm_k.weight.copy_(torch.linspace(2.0, 0.5, 16))
    inputs = {}
    attn.register_forward_pre_hook(lambda m, a, kw: inputs.update(hidden=a[0], text=kw["encoder_hidden_states"]),
                                   with_kwargs=True)
    cond = families.Conditioning.cat([families.encode_negative_prompt(pipe, "", 1), families.encode_prompt(pipe, PROMPT)])
    recorder = Recorder()
    with families.install_attention_hooks(pipe, [recorder]), torch.no_grad():
        ours = families.denoise(pipe, torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)),
                                torch.tensor(500.0), cond)
    with torch.no_grad():
        plain = families.denoise(pipe, torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)),
                                 torch.tensor(500.0), cond)  # SanaAttnProcessor2_0 itself
        q, k = attn.norm_q(attn.to_q(inputs["hidden"])), attn.norm_k(attn.to_k(inputs["text"]))  # whole width
        q, k = (x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2) for x in (q, k))
        scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(cond.mask[:, None, None, :] == 0, float("-inf"))
    assert torch.allclose(recorder.seen[0][0], scores.softmax(-1), atol=1e-5)
    assert torch.allclose(ours, plain, atol=1e-4)  # the explicit path computes what the fused processor does
