"""Interactive tools for the notebooks, built with ipywidgets.

* :class:`AttentionExplorer` - browse the cross-attention maps of a finished run: step,
  layer or resolution, token, head and opacity. Every control redraws from the stored
  maps; none of them runs the model.
* :class:`MagPlayground` - MAG's knobs (α, λ, guidance steps, swap steps, CFG, seed, MAG's
  layers); the last runs side by side.
  Nothing runs until the Run button; a progress bar follows the steps. An interrupted run
  (the kernel's stop button) leaves the pipeline as it was: the engine restores every
  attention processor on any exit.
* :class:`LayoutBuilder` - regions tied to the prompt's words, placed and sized with
  sliders (rectangles and ellipses), with a live preview; ``.layout`` is the result.
* :class:`LayoutPainter` - the same, painted freehand with the mouse (ipycanvas), one brush
  per phrase; ``.layout``, ``to_code()`` and ``save()`` (PNG + JSON for the CLI).

Each tool *is* an ``ipywidgets.VBox``: put it last in a cell to show it. Their state is
plain Python attributes, so tests set a control's ``value`` and check what happened,
with no browser.
"""
from ..plots import png_bytes
from .builder import LayoutBuilder, RegionSpec
from .explorer import AttentionExplorer
from .painter import LayoutPainter
from .playground import MagPlayground

__all__ = ["AttentionExplorer", "LayoutBuilder", "LayoutPainter", "MagPlayground", "RegionSpec", "png_bytes"]
