"""The cross-attention processor: exact probabilities, only cross-attention, always restored."""
import math

import pytest
import torch

from mag_explore.attention import (
    AttentionHook,
    AttentionStore,
    CrossAttentionProcessor,
    attention_grid,
    cross_attention_hooks,
    cross_attention_layer_names,
    remove_cross_attention_hooks,
)
from mag_explore.sampling import Control, generate

PROMPT = "a red circle and a blue square"


def unet_inputs(pipe, height=64, width=96, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = pipe.vae_scale_factor
    latents = torch.randn(batch, 4, height // f, width // f, generator=g)
    ids = pipe.tokenizer([PROMPT] * batch, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
    return latents, text


class Recorder(AttentionHook):
    """Keeps every probability tensor and context it sees."""

    def __init__(self):
        self.seen = []

    def active(self, ctx):
        return True

    def observe(self, probs, ctx):
        self.seen.append((probs.detach().clone(), ctx))


@pytest.mark.parametrize("pipe_name", ["sd15_pipe", "sd21_pipe"])
def test_probabilities_equal_reference_softmax(request, pipe_name):
    pipe = request.getfixturevalue(pipe_name)
    unet = pipe.unet
    latents, text = unet_inputs(pipe)
    inputs = {}  # what each attn2 module received, captured independently of our processor
    handles = [
        unet.get_submodule(name).register_forward_pre_hook(
            lambda m, a, kw, name=name: inputs.__setitem__(name, (a[0] if a else kw["hidden_states"], kw["encoder_hidden_states"])),
            with_kwargs=True,
        )
        for name in cross_attention_layer_names(unet)
    ]
    recorder = Recorder()
    try:
        with torch.no_grad(), cross_attention_hooks(unet, [recorder]):
            unet(latents, 500, encoder_hidden_states=text)
    finally:
        for h in handles:
            h.remove()
    assert len(recorder.seen) == len(cross_attention_layer_names(unet))
    for probs, ctx in recorder.seen:
        attn = unet.get_submodule(ctx.layer)
        hidden, context = inputs[ctx.layer]
        q, k = attn.to_q(hidden), attn.to_k(context)
        d = q.shape[-1] // attn.heads
        q = q.view(q.shape[0], -1, attn.heads, d).transpose(1, 2)
        k = k.view(k.shape[0], -1, attn.heads, d).transpose(1, 2)
        reference = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        assert probs.shape == reference.shape == (2, attn.heads, ctx.height * ctx.width, 77)
        assert torch.allclose(probs, reference, atol=1e-6)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        assert probs.std() > 1e-4  # not flat: a wrong token order would show


def test_resolutions_from_the_latent_shape(sd15_pipe):
    latents, text = unet_inputs(sd15_pipe, height=64, width=96)
    recorder = Recorder()
    with torch.no_grad(), cross_attention_hooks(sd15_pipe.unet, [recorder]):
        sd15_pipe.unet(latents, 500, encoder_hidden_states=text)
    sizes = {ctx.layer: (ctx.height, ctx.width) for _, ctx in recorder.seen}
    assert set(sizes.values()) == {(8, 12), (4, 6), (2, 3)}
    assert {ctx.place for _, ctx in recorder.seen} == {"down", "mid", "up"}
    assert all(ctx.batch_roles == ("uncond", "cond") for _, ctx in recorder.seen)


def test_attention_resolution_rounds_like_the_unet():
    assert attention_grid((64, 96), 64 * 96) == (64, 96)
    assert attention_grid((64, 96), 16 * 24) == (16, 24)
    assert attention_grid((9, 13), 5 * 7) == (5, 7)  # odd sizes round up, as stride-2 convs do
    assert attention_grid((9, 13), 3 * 4) == (3, 4)
    with pytest.raises(ValueError, match="cannot place 50"):
        attention_grid((64, 64), 50)


def test_attention_mask_is_applied(sd15_pipe):
    latents, text = unet_inputs(sd15_pipe, batch=1)
    keep = torch.ones(1, 77)
    keep[0, 5:] = 0  # only the first five tokens may be attended to
    recorder = Recorder()
    with torch.no_grad(), cross_attention_hooks(sd15_pipe.unet, [recorder]):
        sd15_pipe.unet(latents, 500, encoder_hidden_states=text, encoder_attention_mask=keep)
    for probs, _ in recorder.seen:
        assert probs[..., 5:].abs().max() < 1e-6
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


def test_only_cross_attention_is_replaced(sd15_pipe):
    unet = sd15_pipe.unet
    before = unet.attn_processors
    with cross_attention_hooks(unet, []):
        during = unet.attn_processors
    for name, processor in during.items():
        if name.endswith("attn2.processor"):
            assert isinstance(processor, CrossAttentionProcessor) and processor.original is before[name]
        else:
            assert processor is before[name]  # self-attention keeps its fused kernel


class CustomProcessor:
    """A user's own processor that we must put back as the same object."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class Boom(AttentionHook):
    def __init__(self, error):
        self.error = error

    def observe(self, probs, ctx):
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_processors_restored_after_errors(sd15_pipe, error):
    unet = sd15_pipe.unet
    names = cross_attention_layer_names(unet)
    custom_name = names[0] + ".processor"
    original = unet.attn_processors
    custom = CustomProcessor(original[custom_name])
    unet.set_attn_processor({**original, custom_name: custom})
    try:
        before = unet.attn_processors
        with pytest.raises(type(error)):
            generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, store=Boom(error), progress=False)
        after = unet.attn_processors
        assert after.keys() == before.keys()
        assert all(after[n] is before[n] for n in before)
        assert after[custom_name] is custom
    finally:
        unet.set_attn_processor(dict(original))


def test_nested_and_stale_installs_never_stack(sd15_pipe):
    unet = sd15_pipe.unet
    before = unet.attn_processors
    outer, inner = Recorder(), Recorder()
    with cross_attention_hooks(unet, [outer]) as ctl_outer:
        with cross_attention_hooks(unet, [inner]) as ctl_inner:
            assert ctl_inner is ctl_outer and ctl_outer.hooks == [outer, inner]
            for p in unet.attn_processors.values():
                assert not isinstance(getattr(p, "original", None), CrossAttentionProcessor)
        assert ctl_outer.hooks == [outer]
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)
    # a block entered by hand and never left: joining it does not stack, and it can be removed
    stale = cross_attention_hooks(unet, [Recorder()])
    stale.__enter__()
    with cross_attention_hooks(unet, []):
        for p in unet.attn_processors.values():
            assert not isinstance(getattr(p, "original", None), CrossAttentionProcessor)
    assert remove_cross_attention_hooks(unet) == len(cross_attention_layer_names(unet))
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)
    assert remove_cross_attention_hooks(unet) == 0


class Uniform(AttentionHook):
    """An edit hook: every token gets the same attention."""

    def edit_probs(self, probs, ctx):
        return torch.full_like(probs, 1 / probs.shape[-1])


def test_edit_hooks_change_what_the_layer_uses(sd15_pipe):
    store = AttentionStore(tokens="all", dtype=torch.float32)
    plain = generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, progress=False)

    class UniformControl(Control):
        def attention_hooks(self):
            return [Uniform()]

    # With every key weighted 1/77 the layer's output is knowable: the mean of its values, projected
    # out, the same at every pixel: to_out(mean_k to_v(text_k)).
    module = sd15_pipe.unet.get_submodule(store_layer := cross_attention_layer_names(sd15_pipe.unet)[0])
    seen = []
    handle = module.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs, out)), with_kwargs=True)
    try:
        result = generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, controls=[UniformControl()], store=store,
                          progress=False)
    finally:
        handle.remove()
    kwargs, out = seen[0]  # the first step's call: (uncond, cond) rows
    with torch.no_grad():
        want = module.to_out[0](module.to_v(kwargs["encoder_hidden_states"]).mean(1))  # (rows, features)
    torch.testing.assert_close(out, want[:, None, :].expand_as(out), atol=1e-5, rtol=1e-4)
    assert abs(result.pixels - plain.pixels).max() > 1e-4 and store_layer in store.layers
    stored = store.get(0, store.layers[0]).float()
    assert torch.allclose(stored, torch.full_like(stored, 1 / 77), atol=1e-4)  # the store saw the edited maps


def test_fp16_model_gives_fp32_probabilities(sd15_folder):
    from mag_explore.models import load_pipeline

    pipe = load_pipeline(sd15_folder, device="cpu", dtype=torch.float16)
    latents, text = unet_inputs(pipe)
    recorder = Recorder()
    with torch.no_grad(), cross_attention_hooks(pipe.unet, [recorder]):
        out = pipe.unet(latents.half(), 500, encoder_hidden_states=text.half()).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    for probs, _ in recorder.seen:
        assert probs.dtype == torch.float32
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


class CountingProcessor:
    """Wraps a processor and counts the calls that reach it (cross-attention ones apart)."""

    def __init__(self, inner):
        self.inner, self.cross_calls = inner, 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.cross_calls += encoder_hidden_states is not None
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def test_layers_and_steps_without_an_active_hook_run_the_replaced_processor(sd15_pipe):
    """Swap acts in steps 0-1 of 4: the other steps take the user's own (fused) processor."""
    from mag_explore import Layout, MaskedAttentionSwap, rect

    unet = sd15_pipe.unet
    before = unet.attn_processors
    counters = {name: CountingProcessor(p) for name, p in before.items()}
    unet.set_attn_processor(dict(counters))
    try:
        layout = Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1)])
        store = AttentionStore(steps=[3])  # captures step 3 only
        generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, height=64, width=64, progress=False,
                 controls=[MaskedAttentionSwap(layout, step_range=(0, 2))], store=store)
        cross = [c for name, c in counters.items() if name.endswith("attn2.processor")]
        # one UNet call per step; steps 0, 1 (swap) and 3 (store) are explicit, step 2 is not
        assert [c.cross_calls for c in cross] == [1] * len(cross)
        assert store.contexts and {step for step, _ in store.contexts} == {3}
    finally:
        unet.set_attn_processor(dict(before))
