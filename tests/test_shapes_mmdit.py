"""The embedded MMDiT model "shapes_flux": its T5 tokenizer, its training-time attention processor,
its training command, and the shipped FluxPipeline folder."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mag_explore.shapes import mmdit, train_mmdit
from mag_explore.shapes.check import check_prompts
from mag_explore.shapes.world import COLORS, SHAPES, make_scene, score_image

MODEL = Path(__file__).resolve().parents[1] / "mag_explore" / "data" / "models" / "shapes_flux"
PAD = ["<pad>"]


@pytest.fixture(scope="module")
def t5_tokenizer():
    return mmdit.build_t5_tokenizer()


def pieces(tokenizer, text, length=None):
    kwargs = dict(padding="max_length", max_length=length) if length else {}
    return tokenizer.convert_ids_to_tokens(tokenizer(text, **kwargs).input_ids)


# ---------------------------------------------------------------------------- tokenizer
def test_t5_pieces_of_training_captions_are_one_per_word_then_eos(t5_tokenizer):
    assert pieces(t5_tokenizer, "a red circle and a blue square") == [
        "▁a", "▁red", "▁circle", "▁and", "▁a", "▁blue", "▁square", "</s>"]
    # T5 attaches a comma to the word before it: "circle," -> "▁circle" ","
    assert pieces(t5_tokenizer, "a green triangle, a yellow circle and a purple square") == [
        "▁a", "▁green", "▁triangle", ",", "▁a", "▁yellow", "▁circle", "▁and", "▁a", "▁purple",
        "▁square", "</s>"]


def test_t5_splits_unknown_words_into_subword_pieces(t5_tokenizer):
    assert pieces(t5_tokenizer, "two reddish circles") == [
        "▁", "t", "w", "o", "▁red", "d", "ish", "▁circle", "s", "</s>"]
    assert pieces(t5_tokenizer, "the big triangles on the left") == [
        "▁the", "▁big", "▁triangle", "s", "▁on", "▁the", "▁left", "</s>"]
    assert pieces(t5_tokenizer, "A Red") == ["▁", "A", "▁", "R", "e", "d", "</s>"]  # case-sensitive, like T5


def test_t5_special_ids_and_padding_follow_t5(t5_tokenizer):
    tok = t5_tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token_id is None  # T5 has no BOS: the first word is token 0
    ids = tok("a red circle", padding="max_length", max_length=mmdit.MAX_SEQUENCE_LENGTH).input_ids
    assert ids[3:] == [1] + [0] * (mmdit.MAX_SEQUENCE_LENGTH - 4)
    assert pieces(tok, "", 6) == ["</s>"] + PAD * 5  # the CFG caption: EOS only
    assert pieces(tok, "a  red") == ["▁a", "▁red", "</s>"]  # runs of spaces collapse
    assert pieces(tok, "a red €") == ["▁a", "▁red", "▁", "<unk>", "</s>"]


def test_every_world_word_is_one_piece(t5_tokenizer):
    for word in [*COLORS, *SHAPES, "a", "and"]:
        assert pieces(t5_tokenizer, word) == ["▁" + word, "</s>"]


def test_saved_tokenizer_reads_back_the_same(t5_tokenizer, tmp_path):
    from transformers import T5TokenizerFast

    mmdit.build_t5_tokenizer(tmp_path)
    loaded = T5TokenizerFast.from_pretrained(tmp_path)
    for text in ["a red circle, a blue square and a green triangle", "two reddish circles", ""]:
        assert loaded(text).input_ids == t5_tokenizer(text).input_ids


def test_grounded_batches_tie_color_and_shape_pieces_to_their_object(t5_tokenizer):
    images, t5_ids, clip_ids, masks, token_object = train_mmdit.scene_batch(
        5, 12, t5_tokenizer, mmdit.clip_tokenizer())
    assert images.shape == (12, 3, 64, 64) and masks.shape == (12, 3, 8, 8) and clip_ids.shape == (12, 77)
    rng = np.random.default_rng(5)  # the same scenes again, to know the truth
    for i, scene in enumerate(make_scene(rng, empty_caption_prob=0.0) for _ in range(12)):
        words = t5_tokenizer.convert_ids_to_tokens(t5_ids[i].tolist())
        named = [(words[p].removeprefix("▁"), k) for p, k in enumerate(token_object[i].tolist()) if k >= 0]
        assert sorted(named) == sorted([(o.color, k) for k, o in enumerate(scene.objects)]
                                       + [(o.shape, k) for k, o in enumerate(scene.objects)])
        for k, obj in enumerate(scene.objects):  # a cell holds the share of its 8×8 pixels inside
            assert masks[i, k].sum().item() == pytest.approx(obj.mask.sum() / 64, abs=1e-4)


# ---------------------------------------------------------------------------- attention
def random_transformer():
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng():  # diffusers' own init draws from the global RNG: seeded here, then given back
        torch.manual_seed(0)  # diffusers' own init (not adaLN-Zero): every block does something
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                      pooled_projection_dim=12, axes_dims_rope=(4, 6, 6)).eval()


def run(model, text_len=7):
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(1)
    ids = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    txt_ids = torch.zeros(text_len, 3)
    txt_ids[:, 1] = torch.arange(text_len)  # non-zero text positions: the rotary embedding matters
    return model(hidden_states=torch.randn(2, 16, 16, generator=g), timestep=torch.tensor([0.3, 0.9]),
                 encoder_hidden_states=torch.randn(2, text_len, 24, generator=g),
                 pooled_projections=torch.randn(2, 12, generator=g), img_ids=ids, txt_ids=txt_ids,
                 return_dict=False)[0]


def test_grounding_processor_equals_the_default_and_is_restored():
    model = random_transformer()
    before = model.attn_processors
    with torch.no_grad():
        reference = run(model)
        with train_mmdit.grounding_processor(model, text_len=7, keep=False) as proc:
            ours = run(model)
        assert proc.maps == []
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert model.attn_processors == before  # the same processor objects, back in place


def test_grounding_processor_keeps_the_image_to_text_block_of_every_layer():
    model = random_transformer()
    with torch.no_grad(), train_mmdit.grounding_processor(model, text_len=7) as proc:
        run(model)
    assert len(proc.maps) == 4 and all(m.shape == (2, 16, 7) for m in proc.maps)  # 2 double + 2 single
    # The same block seen through the package's joint-attention processor (its own softmax of the
    # whole [text; image] row): the head mean of each layer's image→text probabilities.
    from dit_checks import Recorder
    from mag_explore.attention.joint import joint_attention_hooks

    recorder = Recorder()
    with torch.no_grad(), joint_attention_hooks(model, [recorder]):
        run(model)
    assert len(recorder.seen) == 4
    for mine, (theirs, _) in zip(proc.maps, recorder.seen):
        torch.testing.assert_close(mine, theirs.mean(1), atol=1e-6, rtol=1e-5)
        assert (mine.sum(-1) < 1).all()  # part of a joint softmax over 7 + 16 keys


def test_grounding_processor_restores_after_an_exception():
    model = random_transformer()
    before = model.attn_processors
    with pytest.raises(RuntimeError, match="boom"):
        with train_mmdit.grounding_processor(model, text_len=7):
            raise RuntimeError("boom")
    assert model.attn_processors == before


# ---------------------------------------------------------------------------- training
def test_sigmas_follow_fluxpipelines_shift():
    g = torch.Generator().manual_seed(0)
    sigma = train_mmdit.sample_sigmas(20000, g, mu=0.0)  # mu 0: no shift, logit-normal median 0.5
    assert 0.0 < sigma.min() and sigma.max() < 1.0 and sigma.median().item() == pytest.approx(0.5, abs=0.02)
    shifted = train_mmdit.sample_sigmas(20000, torch.Generator().manual_seed(0), mu=float(np.log(3)))
    assert shifted.median().item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=0.02)  # shift s: sσ/(1+(s−1)σ)
    assert mmdit.image_mu(64) == pytest.approx(0.5 + (64 - 256) * 0.65 / 3840)


def test_two_step_training_run_writes_a_loadable_flux_pipeline(tmp_path):
    from diffusers import FluxPipeline

    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--out", str(out), "--workdir", str(work), "--batch", "2", "--pool", "4",
              "--layers", "1", "--single-layers", "1"]
    train_mmdit.main(common + ["--steps", "2"])
    assert (work / "mmdit.pt").exists() and (work / "pool_4.pt").exists()
    train_mmdit.main(common + ["--steps", "3", "--resume"])  # continues from its checkpoint
    meta = json.loads((out / "mag_explore.json").read_text())
    assert meta["training"]["steps"] == 3 and meta["height"] == 64 and meta["negative_prompt"] == ""
    assert not [f for f in out.rglob("*") if f.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae_scale_factor == 4
    image = pipe("a red circle", height=64, width=64, num_inference_steps=2,
                 max_sequence_length=mmdit.MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


# ---------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def pipe():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_small_safetensors_with_flux_conventions(pipe):
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    assert not [f for f in files if f.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert pipe.transformer.config.in_channels == 16 and not pipe.transformer.config.guidance_embeds
    assert pipe.scheduler.config.use_dynamic_shifting
    ids = pipe.tokenizer_2("a red circle", padding="max_length", max_length=mmdit.MAX_SEQUENCE_LENGTH).input_ids
    assert pipe.tokenizer_2.convert_ids_to_tokens(ids[:4]) == ["▁a", "▁red", "▁circle", "</s>"]
    defaults = json.loads((MODEL / "mag_explore.json").read_text())
    assert defaults["training"]["max_sequence_length"] == mmdit.MAX_SEQUENCE_LENGTH
    assert defaults["measured"]["fidelity_cfg3_n32"]["all_colors_present"] >= 0.9


def test_shipped_model_generates_a_64px_image_in_a_few_steps(pipe):
    image = pipe("a blue square", height=64, width=64, num_inference_steps=3,
                 max_sequence_length=mmdit.MAX_SEQUENCE_LENGTH, negative_prompt="", true_cfg_scale=3.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and 0 <= image.min() and image.max() <= 1


@pytest.mark.slow
def test_shipped_model_draws_what_it_is_asked(pipe):
    # The first 8 of the 32 measured prompts and seeds (README: all 32 had every color and no other,
    # 98 % of the shapes right; these 8: 8/8 and 12 of 12 shapes), at the shipped defaults; floors set below.
    prompts = check_prompts(8, seed=100)
    colors_ok, shapes = 0, []
    for i, prompt in enumerate(prompts):
        image = pipe(prompt, height=64, width=64, num_inference_steps=28,
                     max_sequence_length=mmdit.MAX_SEQUENCE_LENGTH, negative_prompt="", true_cfg_scale=3.0,
                     generator=torch.Generator().manual_seed(100 + i), output_type="np").images[0]
        score = score_image((image * 255).round().astype(np.uint8), prompt)
        colors_ok += score["all_present"] and not score["unrequested"]
        shapes += [o["shape_ok"] for o in score["objects"] if o["present"]]
    assert colors_ok >= 7, f"{colors_ok}/8 images with every requested color and no other"
    assert np.mean(shapes) >= 0.8, f"{np.mean(shapes):.2f} of the present objects in the right shape"


# Six layouts of data/suites/shapes.json the model does not follow by itself (6 left-right,
# 7 right-left, 9 opposite corners, 11 both left, 15 both bottom, 19 three), seeds 0 and 1.
MAG_SAMPLE = (6, 7, 9, 11, 15, 19)


@pytest.mark.slow
def test_shipped_mag_defaults_place_the_objects_and_keep_the_prompt():
    # Measured on the shipped weights (python -m mag_explore evaluate, these 12 images): no control
    # IoU 0.09 with 8 of 12 images faithful; MAG at the shipped defaults (the paper's step, α 0.3,
    # area masks, our balanced loss at λ 1) IoU 0.58 with 12 of 12 faithful (every colour and
    # shape right, nothing else); the paper's loss at λ 0.5 places more here (0.78, also 12 of 12)
    # but keeps fewer prompts over the whole suite (README). Floors: 10 of 12, mean IoU >= 0.45.
    from mag_explore.evaluate import color_segmenter, load_suite, shapes_fidelity
    from mag_explore.methods import make_controls
    from mag_explore.models import load_pipeline, model_defaults
    from mag_explore.sampling import generate
    from mag_explore.layouts import mask_iou

    flux = load_pipeline("shapes_flux", device="cpu", dtype=torch.float32)
    d = model_defaults(flux)
    assert (d["mag_step_rule"], d["mag_alpha"], d["mag_mask_mode"], d["mag_loss"], d["mag_lmbda"]) == (
        "official", 0.3, "area", "balanced", 1.0)
    suite = load_suite(MODEL.parents[1] / "suites" / "shapes.json", 64, 64)
    ious, faithful = [], 0
    for index in MAG_SAMPLE:
        layout = suite[index].layout
        for seed in (0, 1):
            image = np.asarray(generate(flux, layout.prompt, seed=seed, controls=make_controls("mag", layout),
                                        progress=False).images[0])
            masks = color_segmenter(image, layout.labels)
            ious.append(np.mean([mask_iou(m, r.mask) for m, r in zip(masks, layout.regions)]))
            faithful += shapes_fidelity(image, layout.prompt)["fidelity"] == 1.0
    assert faithful >= 10 and np.mean(ious) >= 0.45, (faithful, ious)
