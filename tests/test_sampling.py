"""The explicit sampler against diffusers' own pipeline, and its step-by-step form."""
import numpy as np
import pytest
import torch

from mag_explore.attention import AttentionStore
from mag_explore.sampling import Sampler, generate

PROMPT = "a red circle and a blue square"


@pytest.mark.parametrize("pipe_name", ["sd15_pipe", "sd21_pipe"])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_generate_matches_diffusers_pipeline(request, pipe_name, size):
    pipe = request.getfixturevalue(pipe_name)
    height, width = size
    scheduler_before = pipe.scheduler
    config_before = dict(pipe.scheduler.config)
    ours = generate(pipe, PROMPT, negative_prompt="low quality", num_inference_steps=6, guidance_scale=7.0,
                    seed=3, height=height, width=width, progress=False)
    theirs = pipe(PROMPT, negative_prompt="low quality", num_inference_steps=6, guidance_scale=7.0,
                  generator=torch.Generator().manual_seed(3), height=height, width=width, output_type="np").images
    assert ours.pixels.shape == theirs.shape == (1, height, width, 3)
    assert np.abs(ours.pixels - theirs).max() <= 1e-4
    assert ours.images[0].size == (width, height)
    # the pipeline is left as it was: same scheduler object, same settings
    assert pipe.scheduler is scheduler_before and dict(pipe.scheduler.config) == config_before


def test_eta_one_and_another_seed_match_diffusers(sd15_pipe):
    # eta = 1 draws fresh noise at every step from the same generator, in diffusers' order.
    for seed, eta in ((1, 0.0), (0, 1.0)):
        ours = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=seed, eta=eta, guidance_scale=7.0,
                        negative_prompt="", progress=False).pixels
        theirs = sd15_pipe(PROMPT, num_inference_steps=4, eta=eta, guidance_scale=7.0, negative_prompt="",
                           generator=torch.Generator().manual_seed(seed), output_type="np").images
        assert np.abs(ours - theirs).max() <= 1e-4, (seed, eta)


def test_each_step_matches_diffusers_step_latents(sd15_pipe):
    # The stepped sampler's x_t after every step, against diffusers' own loop (callback_on_step_end).
    sampler = Sampler(sd15_pipe, PROMPT, num_inference_steps=5, seed=7, guidance_scale=7.0, negative_prompt="",
                      keep_latents=True, keep_x0=True)
    seen = []
    sampler.callbacks.append(lambda s: seen.append(s.step_index))
    while not sampler.done:
        sampler.step()
    stepped = sampler.result()
    theirs = []

    def record(pipe, i, t, kwargs):
        theirs.append(kwargs["latents"].detach().clone())
        return kwargs

    sd15_pipe(PROMPT, num_inference_steps=5, guidance_scale=7.0, negative_prompt="", output_type="latent",
              generator=torch.Generator().manual_seed(7), callback_on_step_end=record)
    assert len(stepped.step_latents) == len(theirs) == len(stepped.step_x0) == 5
    for ours, reference in zip(stepped.step_latents, theirs):
        assert torch.allclose(ours, reference, atol=1e-5)
    assert seen == [1, 2, 3, 4, 5]
    assert torch.equal(stepped.step_latents[-1], stepped.latents)
    with pytest.raises(RuntimeError, match="all 5 steps are done"):
        sampler.step()


def test_x0_preview_is_an_image_of_the_right_size(sd15_pipe):
    sampler = Sampler(sd15_pipe, PROMPT, num_inference_steps=3, seed=0, height=64, width=96)
    with pytest.raises(RuntimeError, match="call step"):
        sampler.x0_image()
    sampler.step()
    assert sampler.x0_image().size == (96, 64)


def test_bad_size_is_rejected(sd15_pipe):
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(sd15_pipe, PROMPT, num_inference_steps=2, height=60, width=64, progress=False)


def test_store_does_not_change_the_image(sd15_pipe):
    plain = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, progress=False)
    store = AttentionStore()
    captured = generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, store=store, progress=False)
    # explicit softmax instead of the fused kernel: equal up to float rounding
    assert np.abs(plain.pixels - captured.pixels).max() <= 1e-4
    assert captured.store is store and store.step_indices == [0, 1, 2, 3]


def test_several_images_per_prompt(sd15_pipe):
    store = AttentionStore()
    result = generate(sd15_pipe, PROMPT, num_inference_steps=3, seed=0, num_images=2, store=store,
                      guidance_scale=7.0, negative_prompt="", progress=False)
    theirs = sd15_pipe(PROMPT, num_inference_steps=3, num_images_per_prompt=2, guidance_scale=7.0, negative_prompt="",
                       generator=torch.Generator().manual_seed(0), output_type="np").images
    assert len(result.images) == 2 and theirs.shape[0] == 2
    assert np.abs(result.pixels - theirs).max() <= 1e-4
    step0 = store.get(0, store.layers[0])
    assert step0.shape[0] == 2  # both conditional rows kept
    assert not torch.equal(step0[0], step0[1])
