"""Chroma on a tiny random ChromaPipeline (mag_explore.testing.joint), against diffusers' own
pipeline and against softmax(QKᵀ/√d + mask) written out here."""
from __future__ import annotations

import pytest
import torch

from mag_explore.attention import AttentionHook
from mag_explore.attention.joint import joint_attention_hooks, joint_attention_layer_names
from mag_explore.families import chroma, mmdit
from mag_explore.testing.joint import tiny_chroma_pipeline

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipe():
    return tiny_chroma_pipeline(seed=0)


class Recorder(AttentionHook):
    """Keeps the image→text block and the whole joint matrix of every layer."""

    def __init__(self):
        self.seen, self.joint = [], []

    def active(self, ctx):
        return True

    def observe(self, probs, ctx):
        self.seen.append((probs.detach().clone(), ctx))

    def observe_joint(self, probs, ctx):
        self.joint.append(probs.detach().clone())


def test_encoding_equals_the_pipelines_and_keeps_one_pad(pipe):
    ours = chroma.encode_prompt(pipe, PROMPT, 2, max_sequence_length=16)
    with torch.no_grad():  # as in the pipeline's __call__ (grad mode picks other kernels)
        embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=16,
                                                                          num_images_per_prompt=2)
    assert torch.equal(ours.embeddings, embeds) and torch.equal(ours.mask, mask)
    # ▁a ▁red ▁circle ▁and ▁a ▁blue ▁square </s>: 8 tokens, then the one kept pad
    assert ours.mask[0].tolist() == [1.0] * 9 + [0.0] * 7
    assert chroma.num_prompt_tokens(pipe, PROMPT, 16) == 8
    empty = chroma.encode_prompt(pipe, None, 2, max_sequence_length=16)
    assert torch.equal(empty.embeddings, negative) and torch.equal(empty.mask, negative_mask)


def test_sampling_with_the_family_functions_equals_the_pipeline(pipe):
    from diffusers.utils.torch_utils import randn_tensor

    reference = pipe(PROMPT, height=32, width=32, num_inference_steps=3, max_sequence_length=16,
                     generator=torch.Generator().manual_seed(0), output_type="latent").images
    cond, uncond = (chroma.encode_prompt(pipe, text, 1, 16) for text in (PROMPT, None))
    x = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    scheduler = mmdit.flow_scheduler(pipe, 3, (8, 8))
    for t in scheduler.timesteps:
        x = scheduler.step(chroma.predict(pipe, x, t, cond, uncond, 5.0), t, x, return_dict=False)[0]
    assert torch.equal(mmdit.pack(x), reference)


def rms_norm(x, module):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight


def rotate(x, cos, sin):
    """Rotary embedding on (batch, sequence, heads, dim): pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def reference_probs(attn, inputs):
    """softmax(QKᵀ/√d + mask) of the whole [txt, img] sequence, from the layer's inputs, by hand."""
    split = lambda x: x.view(x.shape[0], x.shape[1], attn.heads, -1)  # noqa: E731
    x = inputs["hidden_states"]
    q, k = rms_norm(split(attn.to_q(x)), attn.norm_q), rms_norm(split(attn.to_k(x)), attn.norm_k)
    if inputs.get("encoder_hidden_states") is not None:  # double-stream: text first, own projections
        text = inputs["encoder_hidden_states"]
        q = torch.cat([rms_norm(split(attn.add_q_proj(text)), attn.norm_added_q), q], 1)
        k = torch.cat([rms_norm(split(attn.add_k_proj(text)), attn.norm_added_k), k], 1)
    cos, sin = inputs["image_rotary_emb"]
    q, k = rotate(q, cos, sin).transpose(1, 2), rotate(k, cos, sin).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + inputs["attention_mask"], dim=-1)


@pytest.mark.parametrize("layer", ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"])
def test_captured_block_equals_an_independent_softmax_with_the_mask_added(pipe, layer):
    module = pipe.transformer.get_submodule(layer)
    inputs = {}
    handle = module.register_forward_pre_hook(lambda m, a, kw: inputs.update(kw), with_kwargs=True)
    cond = chroma.encode_prompt(pipe, PROMPT, 2, max_sequence_length=16)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    recorder = Recorder()
    try:
        with joint_attention_hooks(pipe.transformer, [recorder]), torch.no_grad():
            hooked = chroma.denoise(pipe, latents, 500.0, cond)
    finally:
        handle.remove()
    with torch.no_grad():
        fused = chroma.denoise(pipe, latents, 500.0, cond)
        reference = reference_probs(module, inputs)
    index = joint_attention_layer_names(pipe.transformer).index(layer)
    (probs, ctx), joint = recorder.seen[index], recorder.joint[index]
    assert inputs["attention_mask"].shape == (2, 1, 16 + 24, 16 + 24)  # the outer product, float 0/1
    assert probs.shape == (2, 2, 24, 16) and (ctx.height, ctx.width) == (4, 6) and ctx.text_first
    assert torch.allclose(probs, reference[..., 16:, :16], atol=1e-5) and probs.std() > 1e-3
    assert torch.allclose(joint, reference, atol=1e-5)
    # the float mask is added (diffusers' SDPA semantics): pads keep some mass, e⁻¹ of a kept key's weight
    assert probs[..., 9:].sum() > 0
    assert torch.allclose(hooked, fused, atol=1e-5)  # explicit probabilities give the fused kernel's output


def test_processors_are_restored_after_an_exception(pipe):
    before = dict(pipe.transformer.attn_processors)
    cond = chroma.encode_prompt(pipe, PROMPT, 1, max_sequence_length=16)

    class Boom(Recorder):
        def observe(self, probs, ctx):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), joint_attention_hooks(pipe.transformer, [Boom()]):
        chroma.denoise(pipe, torch.zeros(1, 4, 8, 8), 500.0, cond)
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
