"""The family interface: the registry, and a toy family added the way a user adds one.

The toy family is Stable Diffusion with a prompt template ("a photo of {prompt}"), on its own
pipeline class: it is registered with the public ``register_family``, and then the sampler,
the token positions and the attention hooks must all follow it without any other change.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from mag_explore import families
from mag_explore.attention import AttentionStore
from mag_explore.families import Family, SDFamily, family_of, register_family, unregister_family
from mag_explore.sampling import generate
from mag_explore.text.keys import TextKeys
from mag_explore.text.tokens import token_indices

TEMPLATE = "a photo of "
PROMPT = "a red circle and a red square"


class TemplatedPipeline(StableDiffusionPipeline):
    """A user's pipeline class: SD whose prompts always go through TEMPLATE."""


class TemplatedSD(SDFamily):
    """The toy family: everything as SD, but the text encoder reads TEMPLATE + prompt."""

    name, title, pipeline_class = "templated_sd", "SD with a template (TemplatedPipeline)", "TemplatedPipeline"

    def matches(self, pipe) -> bool:
        return Family.matches(self, pipe)  # by pipeline class, not SD's catch-all

    def encode_prompt(self, pipe, text, batch=1, size=None, **options):
        return super().encode_prompt(pipe, None if text is None else TEMPLATE + text, batch, size)

    def span_tokenizer(self, pipe, max_sequence_length=None):
        return TextKeys(pipe.tokenizer, pipe.tokenizer.model_max_length, prefix=TEMPLATE)

    def num_prompt_tokens(self, pipe, prompt, max_sequence_length=None) -> int:
        return super().num_prompt_tokens(pipe, TEMPLATE + prompt)


@pytest.fixture
def toy(sd15_pipe):
    family = register_family(TemplatedSD())
    try:
        yield family, TemplatedPipeline(**sd15_pipe.components)
    finally:
        unregister_family("templated_sd")


def test_the_registry_refuses_what_it_cannot_use():
    with pytest.raises(TypeError, match="Family subclass"):
        register_family(object())
    with pytest.raises(ValueError, match="'sd' is already registered"):
        register_family(SDFamily())
    with pytest.raises(ValueError, match="no family named 'nope'.*'sd', 'sdxl', 'flux', 'sd3'"):
        unregister_family("nope")
    with pytest.raises(ValueError, match="short identifier"):
        register_family(type("Bad", (Family,), {"name": "has space"})())


def test_built_in_families_are_found_for_their_pipelines(sd15_pipe):
    assert family_of(sd15_pipe).name == families.family(sd15_pipe) == "sd"
    assert [f.name for f in families.registered_families()][:4] == ["sd", "sdxl", "flux", "sd3"]


def test_a_registered_toy_family_drives_the_sampler(toy, sd15_pipe):
    family, pipe = toy
    assert family_of(pipe) is family and family_of(sd15_pipe).name == "sd"  # the newest match wins, only for its class
    ours = generate(pipe, PROMPT, num_inference_steps=3, guidance_scale=7.0, negative_prompt="", seed=0,
                    progress=False)
    # the reference: diffusers' own pipeline, given the templated prompt written out
    theirs = sd15_pipe(TEMPLATE + PROMPT, negative_prompt=TEMPLATE, num_inference_steps=3, guidance_scale=7.0,
                       generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(ours.pixels - theirs).max() <= 1e-4


def test_the_toy_familys_token_positions_follow_its_template(toy):
    family, pipe = toy
    keys = family.span_tokenizer(pipe)
    # tokens of the full text: <bos> a photo of | a red circle and a red square <eos>; the prompt starts at key 4
    full = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(TEMPLATE + PROMPT).input_ids)
    assert full[4:10] == ["a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "red</w>"]
    assert token_indices(keys, PROMPT, "red") == [5] and token_indices(keys, PROMPT, "red", occurrence=2) == [9]
    assert token_indices(keys, PROMPT, "red square") == [9, 10]
    assert token_indices(keys, PROMPT, "a") == [4]  # the template's own "a" (key 1) belongs to no word of the prompt


def test_a_phrase_cut_off_by_the_length_limit_is_a_clear_error(toy):
    family, pipe = toy
    keys = TextKeys(pipe.tokenizer, 8, prefix=TEMPLATE)  # <bos> a photo of a red circle <eos>: room for 3 words
    assert token_indices(keys, PROMPT, "circle") == [6]
    with pytest.raises(ValueError, match="'square' is in the prompt .* cut off"):
        token_indices(keys, PROMPT, "square")


def test_hooks_see_the_toy_familys_cross_attention_and_are_restored(toy):
    family, pipe = toy
    before = dict(pipe.unet.attn_processors)
    store = AttentionStore()
    generate(pipe, PROMPT, num_inference_steps=2, guidance_scale=7.0, seed=0, store=store, progress=False)
    assert set(store.layers) == set(family.attention_layer_names(pipe))
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_text_keys_with_a_template_around_the_prompt_and_kept_positions(toy):
    _, pipe = toy
    # a chat-like template: prefix and suffix; keys = every position from 3 on (the first three dropped)
    keys = TextKeys(pipe.tokenizer, 77, prefix="a photo of ", suffix=", a red box", keep=range(3, 77))
    full = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a photo of a red circle, a red box").input_ids)
    assert full[:8] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "circle</w>", ",</w>"]
    # position 5 ("red" of the prompt) is key 2; the suffix's "red" (position 9) is no word of the prompt
    assert token_indices(keys, "a red circle", "red") == [2]
    with pytest.raises(ValueError, match="occurs 1 time"):
        token_indices(keys, "a red circle", "red", occurrence=2)
