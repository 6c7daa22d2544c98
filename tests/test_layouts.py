"""Tests for mag_explore.layouts. Expected values are worked out by hand in comments."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mag_explore.text.bpe import build_clip_tokenizer
from mag_explore.layouts import (
    Layout, Region, ellipse, official_color_order, parse_word_ids, polygon, rect,
)
from mag_explore.plots import plot_layout
from mag_explore.text.tokens import token_indices

EXAMPLES = Path(__file__).resolve().parents[1] / "mag_explore" / "data" / "layouts"

RED, BLUE, DARK_GREEN, OLIVE, WHITE, BLACK = (
    (255, 0, 0), (0, 0, 255), (0, 128, 0), (90, 200, 30), (255, 255, 255), (0, 0, 0)
)


def save_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def block(size: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    return mask


# Four colored 4x4 squares on white, 16x16. Read in raster order the colors first appear
# as RED (0,0), WHITE (0,4), BLUE (0,8), DARK_GREEN (8,0), OLIVE (8,8).
SQUARES = {
    RED: (slice(0, 4), slice(0, 4)),
    BLUE: (slice(0, 4), slice(8, 12)),
    DARK_GREEN: (slice(8, 12), slice(0, 4)),
    OLIVE: (slice(8, 12), slice(8, 12)),
}


@pytest.fixture
def four_squares(tmp_path) -> Path:
    pixels = np.full((16, 16, 3), 255)
    for color, (rows, cols) in SQUARES.items():
        pixels[rows, cols] = color
    return save_png(tmp_path / "four.png", pixels)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # "purple" is not in the word list, so it splits into one token per letter.
    words = ["a", "red", "circle", "and", "blue", "square"]
    return build_clip_tokenizer(words, tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------ official format
def test_official_order_is_reverse_string_order_of_bgr(four_squares):
    # BGR strings: RED "[0, 0, 255]", BLUE "[255, 0, 0]", DARK_GREEN "[0, 128, 0]",
    # OLIVE "[30, 200, 90]", WHITE "[255, 255, 255]". Reverse *string* order compares
    # the character after "[": '3' > '2' > '0', so OLIVE first; "[255, 255, ..." beats
    # "[255, 0, ..."; "[0, 128, ..." beats "[0, 0, ...":
    expected = [OLIVE, WHITE, BLUE, DARK_GREEN, RED]
    # ...which differs from reverse RGB-string order, numeric BGR order, first appearance:
    assert expected != [OLIVE, WHITE, RED, DARK_GREEN, BLUE]
    assert expected != [WHITE, BLUE, OLIVE, DARK_GREEN, RED]
    assert expected != [RED, WHITE, BLUE, DARK_GREEN, OLIVE]
    rgb = np.asarray(Image.open(four_squares).convert("RGB"))
    assert official_color_order(rgb) == expected

    layout = Layout.from_official(four_squares, "[[1], [2], [3], [4], [5]]")
    assert [r.color for r in layout] == expected
    assert [r.token_indices for r in layout] == [(1,), (2,), (3,), (4,), (5,)]
    for region, color in zip(layout, expected):
        if color == WHITE:
            drawn = ~np.any([block(16, *SQUARES[c]) for c in SQUARES], axis=0)
        else:
            drawn = block(16, *SQUARES[color])
        assert np.array_equal(region.mask, drawn), color


def test_official_empty_list_skips_a_color(four_squares):
    layout = Layout.from_official(four_squares, [[1, 2], [], [3], [4], [5]])
    assert [r.color for r in layout] == [OLIVE, BLUE, DARK_GREEN, RED]


def test_official_black_may_be_left_out(tmp_path):
    # Black background: "[0, 0, 0]" sorts last, after BLUE "[255, 0, 0]" and RED "[0, 0, 255]".
    pixels = np.zeros((8, 8, 3))
    pixels[:4, :4] = RED
    pixels[4:, 4:] = BLUE
    png = save_png(tmp_path / "black.png", pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layout = Layout.from_official(png, "[[1,2],[4]]")
    assert [(r.color, r.token_indices) for r in layout] == [(BLUE, (1, 2)), (RED, (4,))]


@pytest.mark.parametrize("word_ids", ["[[2]]", "[[2], [6, 7]]", "[[1], [2], [3], [4], [5], [6]]"])
def test_official_needs_one_list_per_color_and_lists_them_in_order(four_squares, word_ids):
    # Five colors (no black): fewer lists would leave colors silently unguided (the official
    # script does that), more have no color to go to; both are refused with the order shown.
    with pytest.raises(ValueError, match=r"list\(s\) of word ids but .* has 5 colors: give one list per color") as info:
        Layout.from_official(four_squares, word_ids)
    message = str(info.value)
    positions = [message.index(s) for s in ("[30, 200, 90]", "[255, 255, 255]", "[255, 0, 0]",
                                            "[0, 128, 0]", "[0, 0, 255]")]
    assert positions == sorted(positions)
    assert "[[],[],[],[],[1]]" in message  # the shape of an accepted answer


def official_regions(png: Path, word_ids: list[list[int]]) -> list[tuple[tuple, list[int], np.ndarray]]:
    """The official script's chain, written out: read BGR (OpenCV), shrink to 64x64 with
    INTER_NEAREST (cell i takes pixel floor(i * H / 64)), each distinct pixel as str(list),
    reverse string sort, the i-th word-id list to the i-th color. Returns (RGB, ids, 64x64 mask)."""
    bgr = np.asarray(Image.open(png).convert("RGB"))[:, :, ::-1]
    h, w = bgr.shape[:2]
    small = bgr[[i * h // 64 for i in range(64)]][:, [j * w // 64 for j in range(64)]]
    keys = sorted({str(list(map(int, px))) for px in small.reshape(-1, 3)}, reverse=True)
    regions = []
    for key, ids in zip(keys, word_ids):
        b, g, r = json.loads(key)
        if ids:
            regions.append(((r, g, b), ids, (small == (b, g, r)).all(-1)))
    return regions


def test_official_colors_are_found_after_the_64_nearest_shrink(tmp_path):
    # 512x512: white, a red block, a blue block, a 3-px green line at columns 9-11 and an
    # anti-aliasing pink at odd pixels. The shrink to 64x64 samples columns 0, 8, 16, ...,
    # so the line and the pink vanish there: the official regions are white, blue, red.
    pixels = np.full((512, 512, 3), 255)
    pixels[100:400, 40:200] = RED
    pixels[100:400, 300:480] = BLUE
    pixels[:, 9:12] = (0, 255, 0)
    pixels[99, 41:199:2] = (255, 200, 200)
    png = save_png(tmp_path / "thin.png", pixels)
    word_ids = [[], [6, 7], [2, 3]]
    official = official_regions(png, word_ids)
    assert [c for c, _, _ in official] == [BLUE, RED]
    with pytest.warns(UserWarning, match=r"#00ff00 \(1536 px\).*vanish when the PNG is shrunk to 64x64"):
        layout = Layout.from_official(png, word_ids)
    assert [(r.color, list(r.token_indices)) for r in layout] == [(c, ids) for c, ids, _ in official]
    for region, (_, _, mask) in zip(layout, official):
        assert np.array_equal(layout.masks_at(64, 64)[list(layout).index(region)].numpy() > 0.5, mask)
    # found at full size instead, the line and the pink are regions too and the lists no longer fit
    with pytest.raises(ValueError, match="3 list\\(s\\) of word ids but .* has 5 colors"):
        Layout.from_official(png, word_ids, color_grid=None)


def test_word_id_code_is_rejected_not_run():
    os.environ.pop("MAG_LAYOUT_PWNED", None)
    attack = "__import__('os').environ.__setitem__('MAG_LAYOUT_PWNED', '1')"
    with pytest.raises(ValueError, match="never evaluated"):
        parse_word_ids(attack)
    assert "MAG_LAYOUT_PWNED" not in os.environ
    with pytest.raises(ValueError):
        parse_word_ids("[[1, 2], [__import__('os').getpid()]]")


@pytest.mark.parametrize("bad, why", [
    ("[[0, 1]]", "BOS"), ("[[1, -2]]", "not allowed"), ("[[1, 1]]", "repeat"),
    ("[[1.0]]", "not an int"), ("[[true]]", "not an int"), ("[1, 2]", "one list"),
])
def test_word_id_values_are_checked(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_word_ids(bad)


def test_word_ids_accept_json_and_python_literals():
    assert parse_word_ids("[[1,2,3,4],[6,7]]") == [[1, 2, 3, 4], [6, 7]]
    assert parse_word_ids("[(1, 2), [3,]]") == [[1, 2], [3]]
    assert parse_word_ids([(5,), []]) == [[5], []]


# ------------------------------------------------------------------ color PNG
def test_color_png_masks_equal_drawn_rectangles(four_squares):
    mapping = {"#ff0000": "red circle", "#0000FF": "blue square", "#008000": "green",
               "#5ac81e": {"phrase": "red", "occurrence": 2}}
    layout = Layout.from_color_png(four_squares, mapping)
    assert [r.phrase for r in layout] == ["red circle", "blue square", "green", "red"]
    assert layout[3].occurrence == 2
    for region, color in zip(layout, [RED, BLUE, DARK_GREEN, OLIVE]):
        assert np.array_equal(region.mask, block(16, *SQUARES[color]))
    assert (layout.height, layout.width) == (16, 16)


def test_color_png_absent_color_names_it_and_lists_present(four_squares):
    with pytest.raises(ValueError, match="#00ff00") as info:
        Layout.from_color_png(four_squares, {"#ff0000": "red", "#00ff00": "green"}, unmapped="ignore")
    assert "#ff0000" in str(info.value) and "#5ac81e" in str(info.value)


def test_color_png_unmapped_color_is_an_error_unless_ignored(four_squares):
    mapping = {"#ff0000": "red", "#0000ff": "blue", "#008000": "green"}  # olive left out
    with pytest.raises(ValueError, match="#5ac81e"):
        Layout.from_color_png(four_squares, mapping)
    assert len(Layout.from_color_png(four_squares, mapping, unmapped="ignore")) == 3


def test_color_png_tolerance(tmp_path):
    pixels = np.full((4, 4, 3), 255)
    pixels[0, 0], pixels[0, 1] = (250, 3, 0), (255, 0, 0)
    png = save_png(tmp_path / "soft.png", pixels)
    assert Layout.from_color_png(png, {"#ff0000": "red"}, tolerance=5)[0].mask.sum() == 2
    with pytest.raises(ValueError, match="#fa0300"):
        Layout.from_color_png(png, {"#ff0000": "red"})


def test_size_mismatch_warns_and_resizes(tmp_path):
    pixels = np.full((8, 8, 3), 255)
    pixels[:, :4] = RED  # left half
    png = save_png(tmp_path / "half.png", pixels)
    with pytest.warns(UserWarning, match=r"8x8.*4x4"):
        layout = Layout.from_color_png(png, {"#ff0000": "red"}, size=4)
    assert np.array_equal(layout[0].mask, block(4, slice(None), slice(0, 2)))
    with pytest.warns(UserWarning, match=r"4x4.*12x8"):
        bigger = layout.for_generation(12, 8)
    assert bigger[0].mask.shape == (12, 8) and bigger[0].mask[:, :4].all() and not bigger[0].mask[:, 4:].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layout.for_generation(4, 4) is layout  # same size: no warning


# ------------------------------------------------------------------ validation
def test_empty_region_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'dog' is empty"):
        Layout.from_arrays([np.ones((4, 4), bool), np.zeros((4, 4), bool)], ["cat", "dog"])
    with pytest.raises(ValueError, match="covers no pixel"):
        Layout.from_shapes(8, 8, [rect("tiny", 0.01, 0.01, 0.02, 0.02)])


def test_arrays_numpy_and_torch_overlaps_allowed():
    a = torch.zeros(2, 6, 6, dtype=torch.bool)
    a[0, :4, :4] = True
    a[1, 2:, 2:] = True  # overlaps region 0 on [2:4, 2:4]
    layout = Layout.from_arrays(a, ["cat", "dog"])
    assert np.array_equal(layout.masks, a.numpy())
    with pytest.raises(ValueError, match="0/1"):
        Layout.from_arrays([np.full((4, 4), 0.7)], ["cat"])
    with pytest.raises(ValueError, match="2 masks, 1 phrases"):
        Layout.from_arrays(a, ["cat"])
    with pytest.raises(ValueError, match="same size"):
        Layout.from_arrays([np.ones((4, 4)), np.ones((5, 5))], ["cat", "dog"])


# ------------------------------------------------------------------ resizing
def test_masks_at_nearest_matches_official_resize():
    rng = np.random.default_rng(0)
    mask = rng.random((6, 6)) > 0.5
    mask[0, 0] = True
    layout = Layout.from_arrays([mask], ["x"])
    # nearest picks source index floor(i * 6/4) = 0, 1, 3, 4 in each direction
    expected = mask[np.ix_([0, 1, 3, 4], [0, 1, 3, 4])]
    got = layout.masks_at(4, 4)
    assert got.shape == (1, 4, 4) and got.dtype == torch.float32
    assert np.array_equal(got[0].numpy(), expected.astype(np.float32))


def test_masks_at_area_gives_fractions():
    checker = (np.add.outer(np.arange(8), np.arange(8)) % 2).astype(bool)
    corner = np.zeros((8, 8), bool)
    corner[0, 0] = True
    layout = Layout.from_arrays([checker, corner], ["checker", "corner"])
    area = layout.masks_at(2, 2, mode="area")
    assert torch.allclose(area[0], torch.full((2, 2), 0.5))
    assert torch.allclose(area[1], torch.tensor([[1 / 16, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="nearest"):
        layout.masks_at(2, 2, mode="bicubic")


def test_masks_at_cache_is_per_layout():
    a = Layout.from_arrays([block(8, slice(0, 4), slice(0, 4))], ["a"])
    b = Layout.from_arrays([block(8, slice(4, 8), slice(4, 8))], ["b"])
    assert a.masks_at(4, 4) is a.masks_at(4, 4)
    assert not torch.equal(a.masks_at(4, 4), b.masks_at(4, 4))
    assert a.masks_at(4, 4, dtype=torch.float16).dtype == torch.float16


# ------------------------------------------------------------------ shapes
def test_shapes_relative_equals_pixels():
    relative = [rect("a", 0.25, 0.125, 0.75, 0.625), ellipse("b", 0.5, 0.5, 0.25, 0.375),
                polygon("c", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)])]
    pixels = [rect("a", 16, 4, 48, 20, units="pixels"), ellipse("b", 32, 16, 16, 12, units="pixels"),
              polygon("c", [(0, 0), (64, 0), (0, 32)], units="pixels")]
    rel, pix = Layout.from_shapes(32, 64, relative), Layout.from_shapes(32, 64, pixels)
    assert np.array_equal(rel.masks, pix.masks)
    assert np.array_equal(pix[0].mask, block(64, slice(4, 20), slice(16, 48))[:32])


def test_polygon_and_ellipse_by_hand():
    # Triangle (0,0), (8,0), (0,8): pixel (i, j) has centre (j+.5, i+.5), inside when
    # x + y < 8, i.e. i + j <= 6.
    triangle = Layout.from_shapes(8, 8, [polygon("t", [(0, 0), (8, 0), (0, 8)], units="pixels")])
    assert np.array_equal(triangle[0].mask, np.add.outer(np.arange(8), np.arange(8)) <= 6)
    # Circle of radius 1.5 centred at (2, 2): centres (1.5|2.5, 1.5|2.5) are 0.71 away,
    # (0.5, 2.5) is 1.58 away, so only the 2x2 block rows 1-2, cols 1-2 is inside.
    disc = Layout.from_shapes(4, 4, [ellipse("d", 2, 2, 1.5, 1.5, units="pixels")])
    assert np.array_equal(disc[0].mask, block(4, slice(1, 3), slice(1, 3)))
    with pytest.raises(ValueError, match="units='pixels'"):
        rect("a", 0, 0, 16, 16)


# ------------------------------------------------------------------ words
def test_resolve_multi_token_word(tokenizer):
    prompt = "a red circle and a purple square"
    layout = Layout.from_shapes(8, 8, [rect("red circle", 0, 0, 0.5, 1),
                                       rect("purple square", 0.5, 0, 1, 1)], prompt=prompt)
    resolved = layout.resolve(tokenizer)
    assert resolved[1].token_indices == tuple(token_indices(tokenizer, prompt, "purple square"))
    # 1 a, 2 red, 3 circle, 4 and, 5 a, 6-11 p u r p l e, 12 square
    assert resolved.token_groups == [[2, 3], [6, 7, 8, 9, 10, 11, 12]]
    assert resolved[1].tokens[-1] == "square</w>"
    assert resolved.is_resolved and not layout.is_resolved
    with pytest.raises(ValueError, match="resolve"):
        layout.token_groups


def test_resolve_errors_name_region_and_tokens(tokenizer):
    layout = Layout.from_shapes(8, 8, [rect("green", 0, 0, 1, 1)])
    with pytest.raises(ValueError, match=r"region 'green'.*2:red</w>"):
        layout.resolve(tokenizer, "a red circle")
    official = Layout([Region(np.ones((4, 4), bool), token_indices=(2, 7))])
    with pytest.raises(ValueError, match=r"\[7\].*EOS is at 4.*3:circle</w>"):
        official.resolve(tokenizer, "a red circle")
    assert official.resolve(tokenizer, "a red circle and a blue square").token_groups == [[2, 7]]


# ------------------------------------------------------------------ pictures, examples
def test_preview_and_repr(tokenizer):
    layout = Layout.from_shapes(16, 16, [rect("red circle", 0, 0, 0.5, 0.5, color="#ff0000"),
                                         ellipse("blue square", 0.7, 0.7, 0.2, 0.2)])
    fig = plot_layout(layout)
    ax = fig.axes[0]
    assert "red circle" in ax.get_title() and "blue square" in ax.get_title()
    assert sorted(t.get_text() for t in ax.texts) == ["blue square", "red circle"]
    fig = plot_layout(layout, image=Image.new("RGB", (64, 64), "gray"), alpha=0.3)
    assert fig.axes[0].texts[0].get_position() == (16.0, 16.0)  # centre of the 8x8 block, x4
    text = repr(layout.resolve(tokenizer, "a red circle and a blue square"))
    assert "'red circle'" in text and "[2, 3]" in text and "25.0%" in text


def test_example_layouts_load(tokenizer):
    jsons = sorted(EXAMPLES.glob("*.json"))
    regions = {"bottom_half": 2, "left_right": 2, "official_three_objects": 3, "three_objects": 3, "top_bottom": 2}
    assert [p.stem for p in jsons] == sorted(regions)
    for path in jsons:
        layout = Layout.from_json(path)
        assert (layout.height, layout.width) == (64, 64) and len(layout) == regions[path.stem], path
        assert layout.prompt == json.loads(path.read_text())["prompt"]
    with pytest.warns(UserWarning, match="512x512"):
        big = Layout.from_json(EXAMPLES / "left_right.json", image=EXAMPLES / "left_right_512.png", size=64)
    small = Layout.from_json(EXAMPLES / "left_right.json")
    assert (big.masks == small.masks).mean() > 0.97  # same shapes, drawn at another size
    official = Layout.from_json(EXAMPLES / "official_three_objects.json")
    by_color = Layout.from_json(EXAMPLES / "three_objects.json")
    assert {r.color: r.mask.sum() for r in official} == {r.color: r.mask.sum() for r in by_color}


def test_decompression_bomb_guard_stays_on():
    assert Image.MAX_IMAGE_PIXELS is not None


def test_a_region_is_drawn_in_the_color_its_phrase_names():
    """In the shapes world color is the content: a "red circle" region drawn blue misleads."""
    layout = Layout.from_shapes(16, 16, [rect("red circle", 0, 0, 0.5, 0.5), rect("a Blue square", 0.5, 0.5, 1, 1),
                                         rect("another red one", 0, 0.5, 0.5, 1), rect("the sky", 0.5, 0, 1, 0.5),
                                         rect("green", 0.25, 0.25, 0.5, 0.5, color="#123456")])
    red, blue, second_red, sky, own = layout.colors
    assert red == (220, 40, 40) and blue == (40, 80, 225)
    assert own == (0x12, 0x34, 0x56)                     # a region's own color wins
    assert second_red not in (red, blue, own) and sky not in (red, blue, own, second_red)  # still distinguishable
    assert tuple(layout.color_image()[0, 0]) == red
