"""Flux.2 Klein on a tiny random Flux2KleinPipeline (mag_explore.testing.joint): the text keys, and
the image→text block against softmax(QKᵀ/√d) with rotary and q/k norms written out here."""
from __future__ import annotations

import pytest
import torch

from mag_explore.text import tokens
from mag_explore.attention import AttentionHook
from mag_explore.attention.joint import joint_attention_layer_names
from mag_explore.families import flux2
from mag_explore.testing.joint import tiny_flux2_klein_pipeline

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux2_klein_pipeline(seed=0)


class Recorder(AttentionHook):
    def __init__(self):
        self.seen, self.joint = [], []

    def active(self, ctx):
        return True

    def observe(self, probs, ctx):
        self.seen.append((probs.detach().clone(), ctx))

    def observe_joint(self, probs, ctx):
        self.joint.append(probs.detach().clone())


def test_keys_are_three_layers_joined_after_the_chat_template(pipe):
    ours = flux2.encode_prompt(pipe, PROMPT, 2, max_sequence_length=32)
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=2, max_sequence_length=32)
    assert torch.equal(ours.embeddings, embeds) and embeds.shape == (2, 32, 3 * 16)  # pads are keys: no mask
    assert text_ids[0, 5].tolist() == [0, 0, 0, 5]  # 4-axis ids, the position on the last axis
    keys = flux2.span_tokenizer(pipe, 32)
    text = flux2.chat(pipe.tokenizer, PROMPT)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking=False
    assert tokens.prompt_tokens(keys, PROMPT)[:4] == ["<|im_start|>", "user", "Ċ", "a"]  # the prompt starts at 3
    assert tokens.token_indices(keys, PROMPT, "red circle") == [4, 5]
    assert tokens.token_indices(keys, "a red box and a red purple box", "red", occurrence=2) == [8]
    assert tokens.token_indices(keys, "a purple box", "purple") == [4, 5]
    with pytest.raises(ValueError, match="cut off"):
        tokens.token_indices(flux2.span_tokenizer(pipe, 6), PROMPT, "blue square")


def rms_norm(x, module):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight


def rotate(x, cos, sin):
    """Rotary embedding on (batch, sequence, heads, dim): pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def reference_probs(attn, inputs):
    split = lambda x: x.view(x.shape[0], x.shape[1], attn.heads, -1)  # noqa: E731
    x = inputs["hidden_states"]
    if hasattr(attn, "to_qkv_mlp_proj"):  # single-stream: q and k are the first two thirds of the fused q k v
        weight = attn.to_qkv_mlp_proj.weight
        q, k = x @ weight[: attn.inner_dim].T, x @ weight[attn.inner_dim: 2 * attn.inner_dim].T
        q, k = rms_norm(split(q), attn.norm_q), rms_norm(split(k), attn.norm_k)
    else:  # double-stream: text first, own projections
        text = inputs["encoder_hidden_states"]
        q = torch.cat([rms_norm(split(attn.add_q_proj(text)), attn.norm_added_q),
                       rms_norm(split(attn.to_q(x)), attn.norm_q)], 1)
        k = torch.cat([rms_norm(split(attn.add_k_proj(text)), attn.norm_added_k),
                       rms_norm(split(attn.to_k(x)), attn.norm_k)], 1)
    cos, sin = inputs["image_rotary_emb"]
    q, k = rotate(q, cos, sin).transpose(1, 2), rotate(k, cos, sin).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


@pytest.mark.parametrize("layer", ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"])
def test_captured_block_equals_an_independent_softmax(pipe, layer):
    module = pipe.transformer.get_submodule(layer)
    inputs = {}
    handle = module.register_forward_pre_hook(lambda m, a, kw: inputs.update(kw), with_kwargs=True)
    cond = flux2.encode_prompt(pipe, PROMPT, 2, max_sequence_length=32)
    latents = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    recorder = Recorder()
    family = flux2.Flux2KleinFamily()
    try:
        with family.install_attention_hooks(pipe, [recorder]), torch.no_grad():
            hooked = flux2.denoise(pipe, latents, 500.0, cond)
    finally:
        handle.remove()
    with torch.no_grad():
        fused = flux2.denoise(pipe, latents, 500.0, cond)
        reference = reference_probs(module, inputs)
    index = joint_attention_layer_names(pipe.transformer).index(layer)
    (probs, ctx), joint = recorder.seen[index], recorder.joint[index]
    assert probs.shape == (2, 2, 24, 32) and (ctx.height, ctx.width) == (4, 6) and ctx.text_first
    assert torch.allclose(probs, reference[..., 32:, :32], atol=1e-5) and probs.std() > 1e-3
    assert torch.allclose(joint, reference, atol=1e-5) and torch.allclose(hooked, fused, atol=1e-5)
