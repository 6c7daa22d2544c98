"""The attention store: what it keeps, how much memory that takes, and its queries."""
import pytest
import torch
import torch.nn.functional as F

from mag_explore.attention import AttentionStore, cross_attention_layer_names
from mag_explore.sampling import generate

PROMPT = "a red circle and a blue square"  # BOS + 7 words + EOS = 9 tokens with the tiny tokenizer


def run(pipe, store, steps=3, **kw):
    return generate(pipe, PROMPT, num_inference_steps=steps, seed=0, store=store, progress=False, **kw)


def test_default_reduction_and_size(sd15_pipe):
    store = AttentionStore()
    run(sd15_pipe, store, height=64, width=96)
    n_tokens = len(sd15_pipe.tokenizer(PROMPT).input_ids)
    assert store.token_indices == list(range(n_tokens))
    layers = cross_attention_layer_names(sd15_pipe.unet)
    assert sorted(store.layers) == sorted(layers)
    pixels = sum(h * w for h, w in (store.grid(layer) for layer in layers))
    for (step, layer), maps in store.maps.items():
        h, w = store.grid(layer)
        assert maps.shape == (1, 1, h, w, n_tokens) and maps.dtype == torch.float16 and maps.device.type == "cpu"
    # independent count: steps × Σ pixels × tokens × 2 bytes
    assert store.nbytes == 3 * pixels * n_tokens * 2


def test_store_keeps_the_conditional_half_head_mean(sd15_pipe):
    full = AttentionStore(tokens="all", heads="all", roles=("uncond", "cond"), dtype=torch.float32)
    reduced = AttentionStore(dtype=torch.float32)
    run(sd15_pipe, full, steps=2)
    run(sd15_pipe, reduced, steps=2)
    layer = full.layers[0]
    everything = full.get(1, layer)  # (2 rows, heads, h, w, 77)
    assert everything.shape[0] == 2 and everything.shape[-1] == 77
    expected = everything[1:, :, :, :, : len(reduced.token_indices)].mean(1, keepdim=True)
    assert torch.allclose(reduced.get(1, layer), expected, atol=1e-6)
    # bytes, known exactly: 2 steps x each layer's (rows x heads x pixels x tokens) float32 values
    modules = dict(sd15_pipe.unet.named_modules())
    per_step = [(modules[l].heads, full.grid(l)[0] * full.grid(l)[1]) for l in full.layers]
    assert full.nbytes == 2 * sum(2 * heads * pixels * 77 * 4 for heads, pixels in per_step)
    assert reduced.nbytes == 2 * sum(1 * 1 * pixels * len(reduced.token_indices) * 4 for _, pixels in per_step)


def test_step_and_resolution_filters(sd15_pipe):
    store = AttentionStore(steps=[0, 2], layer_sizes=[4])
    run(sd15_pipe, store)
    assert store.step_indices == [0, 2]
    assert {store.grid(layer) for layer in store.layers} == {(4, 4)}


def test_map_and_aggregate(sd15_pipe):
    store = AttentionStore(dtype=torch.float32)
    run(sd15_pipe, store)
    layer = store.layers[0]
    h, w = store.grid(layer)
    one = store.map(1, layer, token=2)
    assert one.shape == (h, w)
    assert torch.allclose(one, store.get(1, layer)[0, 0, :, :, 2])
    # aggregate over two layers of different sizes, computed by hand
    small = next(l for l in store.layers if store.grid(l) != (h, w))
    expected = torch.stack([
        F.interpolate(store.map(s, l, 2)[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        for s in (0, 1) for l in (layer, small)
    ]).mean(0)
    got = store.aggregate(tokens=[2], steps=[0, 1], layers=[layer, small], size=(h, w))
    assert torch.allclose(got[0], expected, atol=1e-6)
    normed = store.aggregate(tokens=[2, 3], normalize="sum")
    assert torch.allclose(normed.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    assert torch.allclose(store.aggregate(tokens=[3], normalize="max").amax(), torch.tensor(1.0))


def test_queries_explain_what_is_missing(sd15_pipe):
    store = AttentionStore(tokens=[2, 3])
    run(sd15_pipe, store, steps=2)
    with pytest.raises(KeyError, match=r"stored token indices: \[2, 3\]"):
        store.map(0, store.layers[0], token=5)
    with pytest.raises(KeyError, match="no map for step 9"):
        store.get(9, store.layers[0])
    with pytest.raises(ValueError, match="no stored maps match"):
        store.aggregate(layer_sizes=[1024])
    with pytest.raises(ValueError, match="heads="):
        AttentionStore(heads="max")
