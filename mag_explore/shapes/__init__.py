"""The shapes world and its embedded mini text-to-image model.

``world`` draws captioned scenes with ground-truth masks and reads generated images
back (segmentation by color, shape classification); ``train`` trains the small
``StableDiffusionPipeline`` shipped in ``mag_explore/data/models/shapes``, ``train_mmdit``
(parts in ``mmdit``, figures from ``check_mmdit``) the tiny ``FluxPipeline`` in ``models/shapes_flux``.
"""
from .world import (COLORS, SHAPES, WORDS, Scene, SceneObject, blobs, caption_for,
                    classify_shape, make_scene, parse_caption, score_image,
                    segment_by_color)

__all__ = ["COLORS", "SHAPES", "WORDS", "Scene", "SceneObject", "blobs", "caption_for",
           "classify_shape", "make_scene", "parse_caption", "score_image",
           "segment_by_color"]
