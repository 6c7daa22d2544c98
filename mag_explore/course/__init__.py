"""The course: the notebooks' helpers, their exercises and checks, and the learner's plug-ins.

* :mod:`.helpers` - what the notebooks share (example layouts, methods side by side, IoU in the
  shapes world, MAG's first step, what guidance costs, :class:`Claims` checked under each figure);
* :mod:`.joint` - notebook 08: joint attention (Flux.1, SD3) next to a UNet's cross-attention;
* :mod:`.exercises` - ``check_…``: your function against the reference, on fixed inputs
  (:mod:`.checking` is their machinery, :mod:`.solutions` the references);
* :mod:`.learner` - runs *your* functions inside the engine (a swap hook, a MAG step);
* :mod:`.nbtools` - run, time and strip the notebooks (``python -m mag_explore.course.nbtools``).
"""
from . import exercises, joint, learner, solutions
from .helpers import (EXAMPLE_LAYOUTS, ClaimFailed, Claims, attention_inside_outside, color_ious, color_masks, color_of, describe, example_layout,
                      first_step_attention, guidance_cost, iou_text, method_images, object_counts, region_iou, run_methods_on,
                      swap_sweep, x0_images)

__all__ = ["EXAMPLE_LAYOUTS", "ClaimFailed", "Claims", "attention_inside_outside", "color_ious", "color_masks", "color_of", "describe",
           "example_layout", "exercises", "first_step_attention", "guidance_cost", "iou_text", "joint", "learner", "method_images",
           "object_counts", "region_iou", "run_methods_on", "solutions", "swap_sweep", "x0_images"]
