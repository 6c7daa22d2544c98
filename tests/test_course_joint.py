"""Notebook 08's helpers (mag_explore.course.joint) on tiny random Flux and SD3 pipelines and a tiny SD."""
from __future__ import annotations

import matplotlib
import pytest
import torch

from mag_explore.course import joint as course_joint
from mag_explore.attention import AttentionStore
from mag_explore.sampling import generate
from mag_explore.testing.mmdit import tiny_flux_pipeline, tiny_sd3_pipeline

matplotlib.use("Agg")
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipes():
    return {"flux": tiny_flux_pipeline(seed=0), "sd3": tiny_sd3_pipeline(seed=0)}


@pytest.mark.parametrize("name,layer,place", [("flux", "transformer_blocks.0.attn", "double"),
                                              ("flux", "single_transformer_blocks.1.attn", "single"),
                                              ("sd3", "transformer_blocks.0.attn", "joint")])
def test_capture_joint_keeps_the_whole_softmax_whose_block_the_store_sees(pipes, name, layer, place):
    pipe = pipes[name]
    captured = course_joint.capture_joint(pipe, PROMPT, layer=layer, step=1, num_inference_steps=3, height=32, width=32,
                                          max_sequence_length=12)
    probs, text, image = captured["probs"], captured["text"], captured["image"]
    n_text = 12 if name == "flux" else 77 + 12
    assert probs.shape == (n_text + 16, n_text + 16) and captured["place"] == place
    assert (text, image) == ((slice(0, n_text), slice(n_text, n_text + 16)) if name == "flux" else
                             (slice(16, n_text + 16), slice(0, 16)))  # Flux: text first; SD3: image first
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)  # every query row of the joint softmax
    assert abs(captured["timestep"] - 1000 * captured["sigma"]) <= 1  # flow matching: t = 1000·σ
    store = AttentionStore(tokens="all", dtype=torch.float32)
    generate(pipe, PROMPT, seed=0, num_inference_steps=3, max_sequence_length=12, height=32, width=32, store=store,
             progress=False)
    block = store.get(1, layer)[0, 0].reshape(16, n_text)  # head mean, (image tokens, text tokens)
    assert torch.allclose(probs[image, text], block, atol=1e-5)
    fig = course_joint.plot_joint_matrix(captured)
    title = fig.axes[0].get_title()
    assert f"{place} " in title and "step 1" in title and f"t={captured['timestep']}" in title
    assert len(captured["tokens"]) == n_text and captured["tokens"][-1] == "pad"


def test_capture_joint_refuses_a_unet_and_unknown_layers(pipes, sd15_pipe):
    with pytest.raises(ValueError, match="Flux or SD3"):
        course_joint.capture_joint(sd15_pipe, PROMPT)
    with pytest.raises(ValueError, match="not a joint-attention layer.*single_transformer_blocks.0.attn"):
        course_joint.capture_joint(pipes["flux"], PROMPT, layer="transformer_blocks.7.attn")


def test_attention_budget_adds_up_and_names_the_image_tokens(pipes, sd15_pipe):
    runs = {name: generate(pipe, PROMPT, seed=0, num_inference_steps=2, height=32, width=32,
                           store=AttentionStore(tokens="all"),
                           progress=False) for name, pipe in {**pipes, "sd": sd15_pipe}.items()}
    budgets = {name: course_joint.attention_budget(run) for name, run in runs.items()}
    for name, budget in budgets.items():
        run = runs[name]
        said = PROMPT.split()  # every word of the prompt, each occurrence ("a" twice)
        words = sorted({i for n, word in enumerate(said) for i in run.token_indices(word, said[:n].count(word) + 1)})
        for (label, parts), layer in zip(budget.items(), run.store.layers):
            # the same shares written out from the stored maps, with each part's own key indices
            per_key = torch.stack([run.store.get(s, layer)[0].float().mean(0) for s in run.store.step_indices])
            per_key = per_key.flatten(1, 2).mean(1).mean(0)  # (text keys,): mean over steps and pixels
            bos = [0] if name != "flux" else []  # T5 has no BOS; CLIP (SD, SD3) does
            rest = [i for i in range(per_key.numel()) if i not in bos and i not in words]
            want = {"BOS": float(per_key[bos].sum()), "the prompt's words": float(per_key[words].sum()),
                    "EOS and padding": float(per_key[rest].sum()),
                    "image tokens": 0.0 if name == "sd" else 1.0 - float(per_key.sum())}
            assert parts == pytest.approx(want, abs=1e-6), (name, label)
            assert sum(want.values()) == pytest.approx(1.0, abs=2e-3)  # a softmax row, stored in fp16
            assert (parts["image tokens"] > 0.01) == (name != "sd")
    assert list(budgets["flux"])[:2] == ["double 0", "single 0"] and list(budgets["sd3"]) == ["joint 0", "joint 1"]
    fig = course_joint.plot_attention_budget({"Flux": budgets["flux"], "SD": budgets["sd"]}, title="budget")
    assert [ax.get_title() for ax in fig.axes] == ["Flux", "SD"]
    with pytest.raises(ValueError, match='tokens="all"'):
        course_joint.attention_budget(generate(pipes["flux"], PROMPT, seed=0, num_inference_steps=1, height=32, width=32,
                                               store=AttentionStore(), progress=False))


def test_word_grid_titles_name_the_words_and_rows(pipes):
    run = generate(pipes["flux"], PROMPT, seed=0, num_inference_steps=2, height=32, width=32, store=AttentionStore(),
                   progress=False)
    rows = {course_joint.layer_label(layer, "double"): course_joint.word_maps(run, ["red", "blue square"], layers=[layer])
            for layer in run.store.layers[:2]}
    fig = course_joint.plot_word_grid(rows, title="image→text, steps 0–1", images={k: run.image for k in rows})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles.count('"red"') == 2 and titles.count('"blue square"') == 2 and titles.count("image") == 2
    assert fig.axes[0].get_ylabel().startswith("double 0")
