"""The embedded model's training module: the grounding loss, its data, and a tiny end-to-end run."""
import json

import numpy as np
import pytest
import torch

from mag_explore.shapes import train
from mag_explore.shapes.world import COLORS, SHAPES


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train.make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_grounded_batches_tie_each_color_and_shape_word_to_its_own_object(tokenizer):
    images, ids, masks, token_object = train.scene_batch_grounded(5, 24, tokenizer, grid=16)
    assert images.shape == (24, 3, 64, 64) and masks.shape == (24, 3, 16, 16)
    vocab = {v: k.removesuffix("</w>") for k, v in tokenizer.get_vocab().items()}
    rng = np.random.default_rng(5)  # the same scenes, drawn again to know the truth
    from mag_explore.shapes.world import make_scene
    scenes = [make_scene(rng, empty_caption_prob=0.0) for _ in range(24)]
    for i, scene in enumerate(scenes):
        words = [vocab[t] for t in ids[i].tolist()]
        named = [(words[p], int(k)) for p, k in enumerate(token_object[i].tolist()) if k >= 0]
        assert len(named) == 2 * len(scene.objects)  # one color and one shape word per object
        for word, k in named:
            assert word in (scene.objects[k].color, scene.objects[k].shape)
            assert word in COLORS or word in SHAPES
        for k, obj in enumerate(scene.objects):
            # A mask cell holds the share of its 4×4 pixels the object covers.
            assert masks[i, k].sum().item() == pytest.approx(obj.mask.sum() / 16, abs=1e-4)
        assert masks[i, len(scene.objects):].abs().sum() == 0


def _maps_for(attention_per_pixel: torch.Tensor, h: int, w: int):
    return [(attention_per_pixel, h, w)]


def test_grounding_loss_is_zero_when_a_word_attends_exactly_its_object():
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :2, :2] = 1  # object 0: top-left quarter
    token_object = torch.full((1, 6), -1, dtype=torch.int8)
    token_object[0, 2] = 0
    probs = torch.full((1, 16, 6), 1 / 6)
    probs[0, :, 2] = masks[0, 0].flatten() / 4  # spread evenly over the object, nothing outside
    loss = train.grounding_loss(_maps_for(probs, 4, 4), masks, token_object)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_grounding_loss_of_uniform_attention_matches_the_formula_by_hand():
    # A word attending every one of the 16 cells alike, its object 4 cells: the share inside is
    # 4/16 and the total-variation distance to the object's normalized mask is 1 − 4/16.
    masks = torch.zeros(2, 3, 4, 4)
    masks[:, 1, 1:3, 1:3] = 1
    token_object = torch.full((2, 5), -1, dtype=torch.int8)
    token_object[:, 3] = 1
    probs = torch.rand(2, 16, 5)
    probs[:, :, 3] = 0.05  # any constant: only the normalized map matters
    loss = train.grounding_loss(_maps_for(probs, 4, 4), masks, token_object)
    share = 4 / 16
    assert loss.item() == pytest.approx((1 - share) ** 2 + (1 - share), rel=1e-5)


def test_grounding_loss_ignores_unnamed_tokens_and_averages_layers_at_their_resolution():
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :, :2] = 1  # left half
    token_object = torch.tensor([[-1, 0, -1]], dtype=torch.int8)
    fine = torch.rand(1, 16, 3)
    coarse = torch.rand(1, 4, 3)
    coarse[0, :, 1] = torch.tensor([1.0, 0.0, 1.0, 0.0])  # 2×2 map on the left column only
    loss = train.grounding_loss([(fine, 4, 4), (coarse, 2, 2)], masks, token_object)
    changed = fine.clone()
    changed[0, :, [0, 2]] = torch.rand(16, 2)  # BOS-like and padding-like tokens: no effect
    assert train.grounding_loss([(changed, 4, 4), (coarse, 2, 2)], masks, token_object).item() == pytest.approx(loss.item())
    fine_only = train.grounding_loss([(fine, 4, 4)], masks, token_object)
    assert loss.item() == pytest.approx(fine_only.item() / 2)  # the 2×2 layer is perfect: loss 0
    assert train.grounding_loss(_maps_for(fine, 4, 4), masks, torch.full((1, 3), -1, dtype=torch.int8)).item() == 0


@pytest.mark.slow  # a subprocess, a training run or a long widget session
def test_a_tiny_training_run_exports_a_loadable_pipeline_with_its_record(tmp_path):
    from mag_explore.models import load_pipeline, model_defaults

    out = tmp_path / "model"
    train.main(["--out", str(out), "--workdir", str(tmp_path / "work"), "--vae-steps", "2", "--vae-batch", "2",
                "--unet-steps", "3", "--unet-batch", "4", "--pool", "8", "--threads", "1"])
    record = json.loads((out / "mag_explore.json").read_text())["training"]
    assert (record["unet_steps"], record["pool"], record["grounding"]) == (3, 8, 0.1)
    pipe = load_pipeline(str(out), device="cpu")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # The defaults file it writes is one the package accepts (it once wrote an unknown key).
    assert (model_defaults(pipe)["height"], model_defaults(pipe)["width"]) == (64, 64)
    # Continuing from the export keeps its VAE bit for bit and records what it continued.
    again = tmp_path / "again"
    train.main(["--out", str(again), "--workdir", str(tmp_path / "work2"), "--init-from", str(out),
                "--unet-steps", "2", "--unet-batch", "4", "--pool", "8", "--threads", "1"])
    second = json.loads((again / "mag_explore.json").read_text())["training"]
    assert "_name_or_path" not in (again / "unet" / "config.json").read_text()  # no local path shipped
    assert second["continued_from"]["unet_steps"] == 3 and second["unet_steps"] == 2
    vae_again = load_pipeline(str(again), device="cpu").vae
    for (name, a), b in zip(pipe.vae.state_dict().items(), vae_again.state_dict().values()):
        assert torch.equal(a, b), name
    # --vae-from keeps that VAE too, but starts the UNet from scratch (not from the export's).
    fresh = tmp_path / "fresh"
    train.main(["--out", str(fresh), "--workdir", str(tmp_path / "work3"), "--vae-from", str(out),
                "--unet-steps", "1", "--unet-batch", "4", "--pool", "8", "--threads", "1"])
    third = load_pipeline(str(fresh), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), third.vae.state_dict().values()))
    record = json.loads((fresh / "mag_explore.json").read_text())["training"]
    assert record["vae_steps"] == 2 and "continued_from" not in record and record["vae_from"]["vae_steps"] == 2
    with pytest.raises(SystemExit):
        train.main(["--out", str(fresh), "--init-from", str(out), "--vae-from", str(out)])


def test_the_recipe_chains_its_stages_into_the_output_folder(tmp_path):
    from mag_explore.shapes import train, train_decoder
    from mag_explore.shapes.recipe import stage_commands

    stages = stage_commands(tmp_path / "model", tmp_path / "work", threads=1, device="cpu", resume=False)
    assert [module for module, _ in stages] == ["train", "train_decoder", "train"]
    (_, vae), (_, decoder), (_, unet) = stages
    vae_args = train.build_parser().parse_args(vae)
    decoder_args = train_decoder.build_parser().parse_args(decoder)
    unet_args = train.build_parser().parse_args(unet)
    # 1: the VAE alone, into a folder of the work dir
    assert vae_args.unet_steps == 0 and vae_args.vae_from is None and vae_args.init_from is None
    assert vae_args.out.parent == tmp_path / "work"
    # 2: its decoder sharpened there, and in no other folder
    assert decoder_args.model == vae_args.out and decoder_args.also == [] and decoder_args.steps == 3000
    # 3: the UNet from scratch on that VAE, exported to the output folder
    assert unet_args.vae_from == vae_args.out and unet_args.out == tmp_path / "model"
    assert unet_args.init_from is None and unet_args.grounding > 0 and unet_args.unet_steps > 0
    assert unet_args.max_minutes is None  # a fixed length: the recipe never depends on wall time
    workdirs = [vae_args.workdir, decoder_args.workdir, unet_args.workdir]
    assert len(set(workdirs)) == 3  # no stage resumes another stage's checkpoint
    assert all("--resume" in argv for _, argv in
               stage_commands(tmp_path / "model", tmp_path / "work", threads=1, device="cpu", resume=True))


def test_checkpoint_now_saves_on_time_at_the_end_and_when_out_of_minutes(capsys):
    import time

    from mag_explore.shapes.train_loop import CHECKPOINT_SECONDS, checkpoint_now

    now = time.time()
    assert checkpoint_now(5, 10, last_save=now, stop_at=None) == (False, False)
    assert checkpoint_now(5, 10, last_save=now, stop_at=now + 60) == (False, False)
    assert checkpoint_now(5, 10, last_save=now - CHECKPOINT_SECONDS - 1, stop_at=None) == (True, False)
    assert checkpoint_now(10, 10, last_save=now, stop_at=None) == (True, False)  # the last step is always saved
    assert capsys.readouterr().out == ""
    assert checkpoint_now(5, 10, last_save=now, stop_at=now - 1) == (True, True)  # out of minutes: save, then stop
    assert "stopping at step 5: --max-minutes reached" in capsys.readouterr().out


def test_unet_learning_rate_schedules():
    import math

    from mag_explore.shapes.train_loop import learning_rate

    peak, steps = 1e-3, 1000
    # a 300-step linear warm-up in both schedules
    assert learning_rate(0, steps, peak, "constant") == pytest.approx(peak / 300)
    assert learning_rate(0, steps, peak, "cosine") == pytest.approx(peak / 300)
    # constant after it; cosine from the peak down to a tenth of it at the last step
    assert learning_rate(999, steps, peak, "constant") == pytest.approx(peak)
    assert learning_rate(299, steps, peak, "cosine") == pytest.approx(
        peak * (0.1 + 0.45 * (1 + math.cos(math.pi * 299 / 999))))
    assert learning_rate(999, steps, peak, "cosine") == pytest.approx(peak / 10)
    # the MMDiT trainer's: a 200-step warm-up
    assert learning_rate(99, steps, peak, "cosine", warmup=200) == pytest.approx(
        0.5 * peak * (0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 999))))
    with pytest.raises(ValueError, match="'cosin'.*'constant', 'cosine'"):
        learning_rate(0, steps, peak, "cosin")


def _tiny_model_folder(folder, vae):
    """A folder with a VAE and a defaults file, as write_decoder reads and writes them."""
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "mag_explore.json").write_text(json.dumps({"training": {"steps": 1}}))
    return folder


def test_decoder_finetune_trains_the_decoder_and_leaves_the_latent_space_alone(tmp_path):
    from mag_explore.shapes import train_decoder
    from mag_explore.shapes.architecture import make_vae

    with torch.random.fork_rng():  # the VAE's init draws from the global RNG: seeded here, then given back
        torch.manual_seed(0)
        vae = make_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    train_decoder.finetune_decoder(vae, steps=2, batch=2, lr=1e-3, workdir=tmp_path, resume=False)
    after = vae.state_dict()
    encoder_keys = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder_keys = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder_keys and decoder_keys and len(encoder_keys) + len(decoder_keys) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in encoder_keys)  # same latents for the same image
    assert any(not torch.equal(before[k], after[k]) for k in decoder_keys)
    # Resuming at the last step does nothing more: the checkpoint holds step 2.
    again = make_vae()
    train_decoder.finetune_decoder(again, steps=2, batch=2, lr=1e-3, workdir=tmp_path, resume=True)
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in after)


def test_write_decoder_keeps_each_folders_config_and_refuses_another_encoder(tmp_path):
    from mag_explore.shapes import train_decoder
    from mag_explore.shapes.architecture import make_vae

    with torch.random.fork_rng():  # the VAE's init draws from the global RNG: seeded here, then given back
        torch.manual_seed(0)
        source = make_vae()
        flux_like = make_vae()
    flux_like.load_state_dict(source.state_dict())
    flux_like.register_to_config(shift_factor=0.0)  # shapes_flux's VAE config differs in this
    target = _tiny_model_folder(tmp_path / "flux", flux_like)
    with torch.no_grad():
        source.decoder.conv_out.bias += 1.0
    train_decoder.write_decoder(source, target, {"steps": 7})
    from diffusers import AutoencoderKL
    written = AutoencoderKL.from_pretrained(target / "vae")
    assert written.config.shift_factor == 0.0
    for key, value in source.state_dict().items():
        assert torch.equal(written.state_dict()[key], value), key
    record = json.loads((target / "mag_explore.json").read_text())["training"]
    assert record == {"steps": 1, "decoder_finetune": {"steps": 7}}

    other = _tiny_model_folder(tmp_path / "other", make_vae())  # fresh weights: another encoder
    with pytest.raises(ValueError, match="another encoder"):
        train_decoder.write_decoder(source, other, {"steps": 7})
