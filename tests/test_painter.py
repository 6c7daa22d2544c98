"""The freehand painter without a browser: canvas mouse events in, a Layout out.

Mouse events are fed the way ipycanvas delivers them from the front end
(``_handle_frontend_event`` with the canvas's pixel coordinates); the expected masks are
discs written out here, not read from the painter.
"""
import numpy as np
import pytest

from mag_explore.layouts import Layout
from mag_explore.widgets import LayoutPainter
from mag_explore.widgets import MagPlayground

PROMPT = "a red circle and a blue square"


def mouse(painter, kind, x, y):
    painter.canvas._handle_frontend_event(None, {"event": f"mouse_{kind}", "x": x, "y": y}, [])


def drag(painter, points):
    """A stroke as the browser sends it: down, moves, up (canvas pixels)."""
    mouse(painter, "down", *points[0])
    for point in points[1:]:
        mouse(painter, "move", *point)
    mouse(painter, "up", *points[-1])


def disc(height, width, row, col, radius):
    ys, xs = np.ogrid[:height, :width]
    return (ys + 0.5 - row) ** 2 + (xs + 0.5 - col) ** 2 <= radius ** 2


def test_a_mouse_stroke_paints_the_selected_brush_and_binds_its_phrase():
    painter = LayoutPainter(PROMPT, size=64, canvas_size=256, radius=3)  # 4 screen pixels per layout pixel
    with pytest.raises(ValueError, match="brush 1: pick one or more words"):
        painter.layout
    painter.phrase.value = (1, 2)  # "red", "circle"
    drag(painter, [(40, 40), (40, 120), (40, 200)])  # a vertical stroke at x = 10 layout pixels
    expected = np.zeros((64, 64), bool)
    for row in np.linspace(10, 50, 41):  # the stroke runs from row 10 to row 50 at column 10
        expected |= disc(64, 64, row, 10, 3)
    np.testing.assert_array_equal(painter.labels == 1, expected)
    layout = painter.layout
    assert [(r.phrase, r.occurrence) for r in layout.regions] == [("red circle", 1)]
    np.testing.assert_array_equal(layout.regions[0].mask, expected)
    assert "1 region(s): red circle" in painter.status.value

    painter.add_brush("blue square")
    assert painter.color_of(2) == (0, 130, 200)  # painted in the color its phrase names
    drag(painter, [(200, 128)])  # a dot
    np.testing.assert_array_equal(painter.labels == 2, disc(64, 64, 32, 50, 3))
    assert [r.phrase for r in painter.layout.regions] == ["red circle", "blue square"]

    painter.mode.value = "erase"
    drag(painter, [(40, 40), (40, 80)])  # erase the top of the first stroke
    assert not painter.labels[8:14, 8:12].any() and (painter.labels[40:50, 10] == 1).all()
    painter.phrase.value = (1, 3)  # "red", "and": not consecutive
    assert "not consecutive" in painter.status.value


def test_repeated_words_by_occurrence_and_tokens(sd15_pipe):
    prompt = "a red circle and a red square"
    painter = LayoutPainter(prompt, size=32)
    assert [label for label, _ in painter.phrase.options][:3] == ["a (1)", "red (1)", "circle"]
    painter.brushes[0] = (5,)  # the second "red"
    painter.paint_stroke([(0.7, 0.5)])
    region = painter.layout.regions[0]
    assert (region.phrase, region.occurrence) == ("red", 2)
    assert painter.layout.resolve(sd15_pipe.tokenizer).regions[0].token_indices == (6,)
    painter.add_brush("red square")
    painter.paint_stroke([(0.2, 0.5)])
    assert painter.color_of(1) == (230, 25, 75)  # the color "red" names...
    assert painter.color_of(2) not in {painter.color_of(1), (255, 255, 255), (0, 0, 0)}  # ...once: PNG colors differ
    painter.remove_brush()
    painter.remove_brush()
    assert painter.brushes == [] and not painter.labels.any()
    with pytest.raises(ValueError, match="no brush"):
        painter.layout


def test_empty_brush_is_refused_by_name():
    painter = LayoutPainter(PROMPT, size=32)
    painter.phrase.value = (5, 6)
    with pytest.raises(ValueError, match="brush 1 \\('blue square'\\) has no paint"):
        painter.layout


def test_to_code_save_and_the_cli_rebuild_the_same_masks(tmp_path):
    painter = LayoutPainter(PROMPT, size=(32, 48))  # non-square
    painter.phrase.value = (1, 2)
    painter.paint_stroke([(0.1, 0.2), (0.4, 0.8)])
    painter.add_brush("blue square")
    painter.paint_stroke([(0.8, 0.5)])
    layout = painter.layout
    assert (layout.height, layout.width) == (32, 48)

    namespace = {}
    exec(painter.to_code(), namespace)  # the generated code is ours; a test may run it
    for mine, rebuilt in zip(layout.regions, namespace["layout"].regions):
        np.testing.assert_array_equal(mine.mask, rebuilt.mask)
        assert mine.phrase == rebuilt.phrase

    png, meta = painter.save(tmp_path / "painted")
    loaded = Layout.from_json(meta)
    assert loaded.prompt == PROMPT and [r.phrase for r in loaded.regions] == ["red circle", "blue square"]
    for mine, back in zip(layout.regions, loaded.regions):
        np.testing.assert_array_equal(mine.mask, back.mask)

    from mag_explore.cli import build_parser, load_layout
    args = build_parser().parse_args(["generate", "--prompt", PROMPT, "--layout", str(meta), "--out", "x.png"])
    np.testing.assert_array_equal(load_layout(args, PROMPT).regions[1].mask, layout.regions[1].mask)


def test_the_playground_runs_mag_on_the_painted_layout_and_paints_over_its_image(sd15_pipe):
    painter = LayoutPainter(PROMPT, size=64)
    painter.phrase.value = (5, 6)
    painter.paint_stroke([(0.8, 0.1), (0.8, 0.9)])  # a vertical band on the right
    playground = MagPlayground(sd15_pipe, painter, num_inference_steps=3)
    mag = playground.controls()[0]
    np.testing.assert_array_equal(mag.layout.regions[0].mask, painter.labels == 1)
    before = painter.composite().copy()
    playground.run_button.click()
    assert playground.error is None, playground.error
    assert not np.array_equal(painter.composite(), before)  # the new image is under the paint now
