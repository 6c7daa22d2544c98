"""The embedded shapes model: a real, offline StableDiffusionPipeline with SD's conventions."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

MODEL = Path(__file__).resolve().parents[1] / "mag_explore" / "data" / "models" / "shapes"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this model runs fastest on one thread (README); put the setting back after
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


def test_files_are_safetensors_and_small():
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    assert not [f for f in files if f.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    defaults = json.loads((MODEL / "mag_explore.json").read_text())
    assert defaults["height"] == defaults["width"] == 64 and defaults["guidance_scale"] > 1


def test_sd_conventions(pipe):
    ids = pipe.tokenizer("a red circle", padding="max_length",
                         max_length=pipe.tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "circle</w>"]
    assert ids[4:] == [pipe.tokenizer.eos_token_id] * 73  # EOS, then padded with EOS
    s = pipe.scheduler.config
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps) == (
        "scaled_linear", 0.00085, 0.012, 1000)
    # Cross-attention at two resolutions or more, the finest at least 1/8 of the image
    # side: record the query length of every attn2 during one UNet call.
    sides = set()
    hooks = [m.register_forward_pre_hook(lambda m, args: sides.add(int(args[0].shape[1] ** 0.5)))
             for name, m in pipe.unet.named_modules() if name.endswith("attn2")]
    latent = pipe.unet.config.sample_size
    with torch.no_grad():
        pipe.unet(torch.zeros(1, 4, latent, latent), 500,
                  encoder_hidden_states=torch.zeros(1, 77, pipe.unet.config.cross_attention_dim))
    for h in hooks:
        h.remove()
    assert len(sides) >= 2 and max(sides) * 8 >= 64


@pytest.mark.slow
def test_draws_the_requested_colors(pipe):
    from mag_explore.shapes import score_image

    defaults = json.loads((MODEL / "mag_explore.json").read_text())
    hits = 0
    for i, prompt in enumerate(["a red circle", "a blue square", "a yellow triangle"]):
        out = pipe(prompt, num_inference_steps=25, guidance_scale=defaults["guidance_scale"],
                   height=64, width=64, generator=torch.Generator().manual_seed(i),
                   output_type="np")
        image = (out.images[0] * 255).round().astype(np.uint8)
        hits += score_image(image, prompt)["all_present"]
    assert hits >= 2
