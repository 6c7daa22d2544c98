"""Layouts: regions of the image tied to words of the prompt.

A :class:`Layout` is a list of :class:`Region` s. Each region is a boolean mask at
*image* resolution plus the words it controls: either a ``phrase`` of the prompt
(turned into token indices by :meth:`Layout.resolve`) or token indices given
directly (the official MAG format). Guidance and swapping ask the layout for its
masks at each attention resolution with :meth:`Layout.masks_at`.

Ways to build one::

    Layout.from_color_png("scene.png", {"#ff0000": "red circle", "#0000ff": "blue square"})
    Layout.from_official("mask1.png", "[[1,2,3,4],[6,7]]")   # the official script's input
    Layout.from_shapes(64, 64, [ellipse("red circle", 0.3, 0.5, 0.2, 0.2),
                                rect("blue square", 0.55, 0.3, 0.95, 0.7)])
    Layout.from_arrays(masks, ["red circle", "blue square"])
    Layout.from_json("left_right.json")      # a PNG + {"prompt", "regions"}; mx.data_path("layouts") has examples

Jobs: ``colors`` (hex and RGB, the palette), ``raster`` (masks from arrays,
PNGs and shapes drawn in code), ``official`` (the official MAG format), ``region`` and
``layout`` (the classes and their constructors). ``mag_explore.plots.plot_layout`` draws one.

Rules worth knowing (each is checked and raises a ``ValueError`` naming the value):

* Overlapping regions are allowed; an empty region is an error.
* Token index 0 is the BOS token and is refused: word tokens start at 1.
* Official format: the colors are found after the official 64x64 nearest shrink, and
  there is one word-id list per color (black may be left out).
* A PNG whose size differs from the requested size is resized (nearest, so no new
  colors appear) with a warning naming both sizes: drawing a 512² mask for a 64²
  model is common and harmless.
* Pillow's decompression-bomb guard stays on.
"""
from .colors import BACKGROUND_COLORS, RGB, parse_color, to_hex
from .layout import MASK_MODES, Layout
from .official import MAX_OFFICIAL_COLORS, OFFICIAL_COLOR_GRID, official_color_grid, official_color_order, parse_word_ids
from .raster import Shape, ellipse, mask_iou, polygon, rect
from .region import Region
from .suite import MAX_REGIONS, SuiteLayout, load_suite

__all__ = ["MAX_REGIONS", "SuiteLayout", "load_suite", "mask_iou", "BACKGROUND_COLORS", "Layout", "MASK_MODES", "MAX_OFFICIAL_COLORS", "OFFICIAL_COLOR_GRID", "RGB", "Region", "Shape", "ellipse",
           "official_color_grid", "official_color_order", "parse_color", "parse_word_ids", "polygon", "rect", "to_hex"]
