"""Slide-ready exports: the GIF has one frame per captured step and shows exactly that step's
map; the MP4 (where ffmpeg exists) has as many frames; a slide is 16:9 and holds the figure."""
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageSequence  # noqa: E402

from mag_explore import AttentionStore, generate  # noqa: E402
from mag_explore import plots  # noqa: E402
from mag_explore.slides import attention_frame  # noqa: E402

PROMPT = "a red circle and a blue square"
SIZE = 64


@pytest.fixture(scope="module")
def result(sd15_pipe):
    return generate(sd15_pipe, PROMPT, num_inference_steps=5, seed=0, store=AttentionStore(), progress=False)


def test_gif_has_one_frame_per_step_with_the_steps_pixels(result, tmp_path):
    path = plots.save_animation(result, "circle", tmp_path / "circle.gif", size=SIZE)
    steps = result.store.step_indices
    with Image.open(path) as gif:
        frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
    assert len(frames) == len(steps) == 5
    for frame, step in zip(frames, steps):
        expected = attention_frame(result, "circle", step, size=SIZE)
        np.testing.assert_array_equal(frame[:SIZE], expected, err_msg=f"frame of step {step}")
    # the maps differ between steps: the frames are not one picture repeated
    assert any(not np.array_equal(frames[0][:SIZE], f[:SIZE]) for f in frames[1:])


def test_frame_is_the_word_map_scaled_to_its_peak(result):
    step = result.store.step_indices[-1]
    heat = result.store.aggregate(tokens=result.token_indices("circle"), steps=[step]).sum(0).numpy()
    frame = attention_frame(result, "circle", step, size=heat.shape[0])  # one pixel per cell
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    viridis_top = (np.asarray(matplotlib.colormaps["viridis"](1.0)[:3]) * 255).round()
    np.testing.assert_array_equal(frame[peak], viridis_top)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffmpeg/ffprobe missing (apt-get install ffmpeg)")
def test_mp4_has_one_frame_per_step(result, tmp_path):
    path = plots.save_animation(result, "square", tmp_path / "square.mp4", size=SIZE)
    counted = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                              "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert int(counted) == len(result.store.step_indices)


def test_slides_use_the_plots_colormap():
    from mag_explore import slides

    assert slides.CMAP == plots.CMAP


def test_unknown_animation_format_is_refused(result, tmp_path):
    with pytest.raises(ValueError, match=".gif or .mp4"):
        plots.save_animation(result, "circle", tmp_path / "circle.avi")


def test_slide_is_16_9_and_holds_the_figure(result, tmp_path):
    fig = plots.plot_token_maps(result, tokens=["circle", "square"])
    path = plots.save_slide(fig, tmp_path / "slide.png")
    with Image.open(path) as slide:
        assert slide.size == (1920, 1080)
        pixels = np.asarray(slide.convert("RGB"))
    drawn = np.argwhere((pixels < 250).any(axis=2))
    height, width = drawn.max(0) - drawn.min(0) + 1
    # the figure fills the slide's width or its height (scaled to fit, less the figure's own white
    # margin), not a corner of it
    assert width >= 0.9 * 1920 or height >= 0.9 * 1080, (width, height)
