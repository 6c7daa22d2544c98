"""Z-Image on a tiny random ZImagePipeline (mag_explore.testing.joint): the caption keys, and the
image→caption block against softmax(QKᵀ/√d) with rotary and q/k norms written out here."""
from __future__ import annotations

import pytest
import torch

from mag_explore.text import tokens
from mag_explore.attention import AttentionHook
from mag_explore.families import zimage
from mag_explore.testing.joint import tiny_zimage_pipeline

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipe():
    return tiny_zimage_pipeline(seed=0)


class Recorder(AttentionHook):
    def __init__(self):
        self.seen, self.joint = [], []

    def active(self, ctx):
        return True

    def observe(self, probs, ctx):
        self.seen.append((probs.detach().clone(), ctx))

    def observe_joint(self, probs, ctx):
        self.joint.append(probs.detach().clone())


def test_caption_is_the_pipelines_and_keys_follow_the_chat_template(pipe):
    ours = zimage.encode_prompt(pipe, PROMPT, 2, max_sequence_length=64)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=64)
    assert torch.equal(ours.embeddings[0], embeds[0]) and torch.equal(ours.embeddings[1], embeds[0])
    assert torch.equal(zimage.encode_prompt(pipe, None, 1, 64).embeddings[0], negative[0])  # "" when CFG
    keys = zimage.span_tokenizer(pipe)
    # <|im_start|> user \n, then the prompt: "red" is key 4; the caption keeps real tokens only
    assert tokens.prompt_tokens(keys, PROMPT)[:5] == ["<|im_start|>", "user", "Ċ", "a", "Ġred"]
    assert tokens.token_indices(keys, PROMPT, "blue square") == [8, 9]
    assert tokens.token_indices(keys, "a red box and a red purple box", "red", occurrence=2) == [8]
    assert tokens.token_indices(keys, "a purple box", "purple") == [4, 5]  # " pur" "ple"
    assert ours.embeddings.shape[1] == len(pipe.tokenizer(zimage.chat(pipe.tokenizer, PROMPT)).input_ids)
    with pytest.raises(ValueError, match="cut off"):
        tokens.token_indices(zimage.span_tokenizer(pipe, max_sequence_length=6), PROMPT, "blue square")


def rms_norm(x, module):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight


def rotate(x, freqs):
    """(a + ib)(c + id) on each pair of channels; freqs complex (batch, sequence, dim/2)."""
    a, b = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    c, d = freqs.real[:, :, None], freqs.imag[:, :, None]
    return torch.stack([a * c - b * d, a * d + b * c], dim=-1).flatten(-2)


def test_captured_block_equals_an_independent_softmax(pipe):
    module = pipe.transformer.get_submodule("layers.1.attention")
    inputs = {}
    handle = module.register_forward_pre_hook(lambda m, a, kw: inputs.update(x=a[0], **kw), with_kwargs=True)
    cond = zimage.encode_prompt(pipe, PROMPT, 2)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    recorder = Recorder()
    try:
        with zimage.zimage_attention_hooks(pipe.transformer, [recorder]), torch.no_grad():
            hooked = zimage.denoise(pipe, latents, 500.0, cond)
    finally:
        handle.remove()
    with torch.no_grad():
        fused = zimage.denoise(pipe, latents, 500.0, cond)
        split = lambda y: y.view(y.shape[0], y.shape[1], module.heads, -1)  # noqa: E731
        q = rotate(rms_norm(split(module.to_q(inputs["x"])), module.norm_q), inputs["freqs_cis"]).transpose(1, 2)
        k = rotate(rms_norm(split(module.to_k(inputs["x"])), module.norm_k), inputs["freqs_cis"]).transpose(1, 2)
        reference = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    (probs, ctx), joint = recorder.seen[1], recorder.joint[1]
    # 4x6 = 24 image tokens padded to 32, then the caption (10 keys here) padded to 32: [img, pads, cap, pads]
    assert inputs["x"].shape[1] == 64 and inputs["attention_mask"] is None
    assert probs.shape == (2, 2, 24, 32) and (ctx.height, ctx.width) == (4, 6) and not ctx.text_first
    assert torch.allclose(probs, reference[..., :24, 32:], atol=1e-5) and probs.std() > 1e-3
    assert torch.allclose(joint, reference, atol=1e-5) and torch.allclose(hooked, fused, atol=1e-5)


def test_modules_get_their_processors_back_after_an_exception(pipe):
    names = zimage.attention_layer_names(pipe.transformer)
    before = {n: pipe.transformer.get_submodule(n).processor for n in names}

    class Boom(Recorder):
        def observe(self, probs, ctx):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), zimage.zimage_attention_hooks(pipe.transformer, [Boom()]):
        zimage.denoise(pipe, torch.zeros(1, 4, 8, 8), 500.0, zimage.encode_prompt(pipe, PROMPT))
    assert all(pipe.transformer.get_submodule(n).processor is before[n] for n in names)
