"""Qwen-Image on a tiny random QwenImagePipeline (mag_explore.testing.joint), against diffusers' own
pipeline and against softmax(QKᵀ/√d) with rotary and q/k norms written out here."""
from __future__ import annotations

import pytest
import torch

from mag_explore.text import tokens
from mag_explore.attention import AttentionHook
from mag_explore.attention.joint import joint_attention_hooks
from mag_explore.families import mmdit, qwenimage
from mag_explore.testing.joint import tiny_qwenimage_pipeline

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwenimage_pipeline(seed=0)


def hooks(pipe, recorders):
    return joint_attention_hooks(pipe.transformer, recorders, qwenimage.QwenJointProcessor, qwenimage.qwen_place)


class Recorder(AttentionHook):
    def __init__(self):
        self.seen, self.joint = [], []

    def active(self, ctx):
        return True

    def observe(self, probs, ctx):
        self.seen.append((probs.detach().clone(), ctx))

    def observe_joint(self, probs, ctx):
        self.joint.append(probs.detach().clone())


def test_encoding_is_the_pipelines_and_keys_follow_the_template(pipe):
    ours = qwenimage.encode_prompt(pipe, PROMPT, 2)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=2)
    assert torch.equal(ours.embeddings, embeds) and mask is None and ours.mask is None
    keys = tokens.prompt_tokens(qwenimage.span_tokenizer(pipe), PROMPT)
    # the template's first 34 tokens are dropped: the prompt's 7 tokens are keys 0-6, then 5 closing ones
    assert keys == ["a", "Ġred", "Ġcircle", "Ġand", "Ġa", "Ġblue", "Ġsquare"] and embeds.shape[1] == 7 + 5
    full = pipe.tokenizer(qwenimage.TEMPLATE.format(PROMPT)).input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(full[34 + 7:]) == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert qwenimage.num_prompt_tokens(pipe, PROMPT) == 7 and qwenimage.encode_prompt(pipe, None) is None


def test_token_indices_through_the_template(pipe):
    keys = qwenimage.span_tokenizer(pipe)
    prompt = "a red circle and a purple bear, a red box"
    assert tokens.token_indices(keys, prompt, "red", occurrence=2) == [10]
    assert tokens.token_indices(keys, prompt, "purple bear") == [5, 6, 7]  # " pur" "ple" " bear"
    assert tokens.phrase_occurrences(keys, prompt, "a red") == [[0, 1], [9, 10]]
    with pytest.raises(ValueError, match="past what the text encoder reads.*cut off"):
        tokens.token_indices(qwenimage.span_tokenizer(pipe, max_sequence_length=5), prompt, "purple bear")


@pytest.mark.parametrize("negative", [None, "low quality"])
def test_sampling_with_the_family_functions_equals_the_pipeline(pipe, negative):
    from diffusers.utils.torch_utils import randn_tensor

    reference = pipe(PROMPT, negative_prompt=negative, height=32, width=32, num_inference_steps=3,
                     generator=torch.Generator().manual_seed(0), output_type="latent").images
    cond, uncond = qwenimage.encode_prompt(pipe, PROMPT), qwenimage.encode_prompt(pipe, negative)
    x = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    scheduler = mmdit.flow_scheduler(pipe, 3, (8, 8))
    for t in scheduler.timesteps:
        x = scheduler.step(qwenimage.predict(pipe, x, t, cond, uncond, 4.0), t, x, return_dict=False)[0]
    assert torch.equal(mmdit.pack(x), reference)


def rms_norm(x, module):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight


def rotate(x, freqs):
    """(a + ib)(c + id) on each pair of channels, freqs complex (sequence, dim/2)."""
    a, b = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    c, d = freqs.real[None, :, None], freqs.imag[None, :, None]
    return torch.stack([a * c - b * d, a * d + b * c], dim=-1).flatten(-2)


def reference_probs(attn, inputs):
    """softmax(QKᵀ/√d) over [txt, img]: own projections and RMS norms per stream, rotary, by hand."""
    split = lambda x: x.view(x.shape[0], x.shape[1], attn.heads, -1)  # noqa: E731
    img, txt = inputs["hidden_states"], inputs["encoder_hidden_states"]
    img_freqs, txt_freqs = inputs["image_rotary_emb"]
    q = torch.cat([rotate(rms_norm(split(attn.add_q_proj(txt)), attn.norm_added_q), txt_freqs),
                   rotate(rms_norm(split(attn.to_q(img)), attn.norm_q), img_freqs)], 1).transpose(1, 2)
    k = torch.cat([rotate(rms_norm(split(attn.add_k_proj(txt)), attn.norm_added_k), txt_freqs),
                   rotate(rms_norm(split(attn.to_k(img)), attn.norm_k), img_freqs)], 1).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def test_captured_block_equals_an_independent_softmax(pipe):
    layer = "transformer_blocks.1.attn"
    module = pipe.transformer.get_submodule(layer)
    inputs = {}
    handle = module.register_forward_pre_hook(lambda m, a, kw: inputs.update(kw), with_kwargs=True)
    cond = qwenimage.encode_prompt(pipe, PROMPT, 2)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    recorder = Recorder()
    try:
        with hooks(pipe, [recorder]), torch.no_grad():
            hooked = qwenimage.denoise(pipe, latents, 500.0, cond)
    finally:
        handle.remove()
    with torch.no_grad():
        fused = qwenimage.denoise(pipe, latents, 500.0, cond)
        reference = reference_probs(module, inputs)
    (probs, ctx), joint = recorder.seen[1], recorder.joint[1]
    assert probs.shape == (2, 2, 24, 12) and (ctx.height, ctx.width) == (4, 6) and ctx.text_first
    assert torch.allclose(probs, reference[..., 12:, :12], atol=1e-5) and probs.std() > 1e-3
    assert torch.allclose(joint, reference, atol=1e-5) and torch.allclose(hooked, fused, atol=1e-5)


def test_processors_are_restored_after_an_exception(pipe):
    before = dict(pipe.transformer.attn_processors)
    cond = qwenimage.encode_prompt(pipe, PROMPT)

    class Boom(Recorder):
        def observe(self, probs, ctx):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), hooks(pipe, [Boom()]):
        qwenimage.denoise(pipe, torch.zeros(1, 4, 8, 8), 500.0, cond)
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
