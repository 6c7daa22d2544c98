"""Plots name what they show, and show what they name."""
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mag_explore import AttentionStore, Layout, MaskedAttentionGuidance, generate, rect  # noqa: E402
from mag_explore import plots  # noqa: E402

PROMPT = "a red circle and a purple square"  # "purple" is several tokens in the tiny vocabulary


@pytest.fixture(scope="module")
def result(sd15_pipe):
    layout = Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1), rect("purple square", 0.5, 0, 1, 1)])
    return generate(sd15_pipe, PROMPT, num_inference_steps=4, seed=0, store=AttentionStore(),
                    controls=[MaskedAttentionGuidance(layout, alpha=1.0, step_range=(0, 2))], progress=False)


def titles(fig):
    return [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]


def test_token_maps_name_words_and_steps(result):
    fig = plots.plot_token_maps(result, tokens=["red", "purple"], steps=[1, 2], overlay=False)
    text = titles(fig)
    assert '"red"' in [t.split("\n")[0] for t in text] and '"purple"' in [t.split("\n")[0] for t in text]
    assert "steps 1–2" in text[-1] and "each map scaled to its own peak" in text[-1]
    # the purple panel shows the sum over all of purple's sub-word tokens, built here from the
    # raw per-layer maps: each layer bilinearly to the finest grid, mean over steps and layers,
    # bilinearly to the image
    import torch
    import torch.nn.functional as F

    store, purple = result.store, result.token_indices("purple")
    assert len(purple) == 6  # p-u-r-p-l-e: one token per letter in the tiny vocabulary
    finest = max((store.grid(l) for l in store.layers), key=lambda hw: hw[0] * hw[1])
    per_layer = [F.interpolate(sum(store.map(s, l, token=t) for t in purple)[None, None].float(), size=finest,
                               mode="bilinear", align_corners=False)[0, 0] for s in (1, 2) for l in store.layers]
    expected = F.interpolate(torch.stack(per_layer).mean(0)[None, None], size=(64, 64), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    shown = fig.axes[2].images[0].get_array()
    assert np.allclose(shown, expected, atol=1e-5)
    assert fig.axes[2].get_title() == f'"purple"\npeak {expected.max():.2g}'


def test_token_maps_on_one_scale(result):
    """scale="shared": every panel's colors run from 0 to the largest peak of all the maps."""
    own = plots.plot_token_maps(result, tokens=["red", "and"], overlay=False)
    shared = plots.plot_token_maps(result, tokens=["red", "and"], overlay=False, scale="shared")
    peaks = [ax.images[0].get_array().max() for ax in own.axes[1:3]]
    for ax in shared.axes[1:3]:
        assert ax.images[0].get_clim() == pytest.approx((0.0, max(peaks)))
    assert "one color scale for all maps" in titles(shared)[-1]
    with pytest.raises(ValueError, match="scale='loud'.*'own'.*'shared'"):
        plots.plot_token_maps(result, scale="loud")


def test_default_token_maps_cover_every_word(result):
    fig = plots.plot_token_maps(result)
    words = [t for t in titles(fig) if t.startswith('"') and "\npeak " in t]
    assert len(words) == len(result.tokens) - 2  # every token between BOS and EOS


def test_over_steps_and_layers(result):
    fig = plots.plot_attention_over_steps(result, "red")
    assert [t.split("\n")[0] for t in titles(fig)[:4]] == ["step 0", "step 1", "step 2", "step 3"]
    fig = plots.plot_attention_over_layers(result, "circle", step=1)
    text = titles(fig)
    assert any("8×8" in t for t in text) and any("mid" in t for t in text) and "step 1" in text[-1]


def test_guidance_plot_and_missing_attention(result, sd15_pipe):
    fig = plots.plot_guidance(result.diagnostics["mag"], labels=["red circle", "purple square"])
    assert "MAG loss before each update" in titles(fig)
    d = result.diagnostics["mag"]
    loss_line = fig.axes[0].lines[0]
    assert np.allclose(loss_line.get_ydata(), d["loss"]) and list(loss_line.get_xdata()) == ["0", "1"]
    for region, line in enumerate(fig.axes[1].lines):  # one line per region: its share inside the mask
        assert np.allclose(line.get_ydata(), [s[region] for s in d["inside_share"]])
    assert [line.get_label() for line in fig.axes[1].lines] == ["red circle", "purple square"]
    plain = generate(sd15_pipe, PROMPT, num_inference_steps=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="store=AttentionStore"):
        plots.plot_token_maps(plain)


def test_figures_are_legible_on_a_projector(result):
    """Every text at 11 pt or more, every attention map in a perceptually uniform colormap."""
    from matplotlib.text import Text

    layout = Layout.from_shapes(64, 64, [rect("red circle", 0, 0, 0.5, 1), rect("purple square", 0.5, 0, 1, 1)])
    figures = [plots.plot_token_maps(result), plots.plot_attention_over_steps(result, "red"),
               plots.plot_attention_over_layers(result, "circle", step=1), plots.plot_run_summary(result, layout),
               plots.plot_guidance(result.diagnostics["mag"], labels=["red circle", "purple square"]),
               plots.plot_images({"a": result.images[0]}, title="one image")]
    uniform = {"viridis", "magma", "inferno", "plasma", "cividis"}
    for fig in figures:
        texts = [t for t in fig.findobj(Text) if t.get_text().strip()]
        assert texts
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 11]
        assert not small, small
        maps = [im for ax in fig.axes for im in ax.images if im.get_array().ndim == 2]
        assert all(im.get_cmap().name in uniform for im in maps), [im.get_cmap().name for im in maps]


def test_plots_leave_interactive_mode_alone(result):
    """The inline backend turns interactive mode on when it first starts, which may happen inside a
    plot; restoring every rcParam afterwards (plt.rc_context) turned it off again, and Jupyter then
    stopped showing figures. Only the font sizes are restored."""
    import matplotlib.pyplot as plt

    @plots.legible
    def starts_a_backend():
        plt.rcParams["interactive"] = True  # what the inline backend does on its first figure
        assert plt.rcParams["font.size"] == plots.FONT
        return plt.figure()

    saved = {key: plt.rcParams[key] for key in ("interactive", "font.size")}
    try:
        plt.rcParams.update({"interactive": False, "font.size": 7})
        plt.close(starts_a_backend())
        assert plt.rcParams["interactive"] is True and plt.rcParams["font.size"] == 7
    finally:
        plt.rcParams.update(saved)


def test_evaluate_figures_never_switch_the_backend(monkeypatch, tmp_path):
    """matplotlib.use("Agg") inside the library stopped every later figure of a notebook."""
    import matplotlib

    from mag_explore.evaluate import plot_frontier

    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("the library switched the backend"))
    summary = [{"method": m, "setting": "default", "mean_iou": iou, "ci_low": iou - 0.1, "ci_high": iou + 0.1,
                "fidelity": f, "fidelity_low": f - 0.05, "fidelity_high": f} for m, iou, f in
               (("none", 0.1, 0.95), ("mag", 0.5, 0.9))]
    figure = plot_frontier(summary, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").is_file() and figure.axes


def test_guidance_lines_and_shares_in_the_objects_colors(result):
    from mag_explore.layouts import Layout, rect

    diagnostics = {"step": [0, 1], "iteration": [0, 0], "loss": [1.0, 0.5], "inside_share": [[0.2, 0.3], [0.4, 0.6]]}
    fig = plots.plot_guidance(diagnostics, labels=["red circle", "the sky"])
    red, sky = fig.axes[1].lines[:2]
    assert matplotlib_rgb(red.get_color()) == (220, 40, 40)  # the named color, not the cycle's blue
    assert matplotlib_rgb(sky.get_color()) != (220, 40, 40)
    # the shares in plot_store_comparison's titles, written out for one region
    layout = Layout.from_shapes(64, 64, [rect("red", 0, 0, 0.5, 1)]).resolve(result.tokenizer, result.prompt)
    heat = result.store.aggregate(tokens=list(layout.regions[0].token_indices), steps=[0]).sum(0)
    mask = layout.masks_at(*heat.shape)[0]
    expected = float((heat * mask).sum() / heat.sum())
    assert plots.region_shares(result.store, layout) == pytest.approx([expected])
    fig = plots.plot_store_comparison({"plain": result.store}, layout)
    assert fig.axes[0].get_title() == f'"red": {expected:.0%} inside' and fig.axes[0].get_ylabel() == "plain"


def matplotlib_rgb(color) -> tuple:
    from matplotlib.colors import to_rgb

    return tuple(round(255 * c) for c in to_rgb(color))
