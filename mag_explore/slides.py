"""Slide-ready exports: one word's attention over the steps as an animated GIF or MP4, and any
figure as a 16:9 PNG. Re-exported by :mod:`mag_explore.plots` (``plots.save_animation``,
``plots.save_slide``).

The animation is built from palette indices, not from rendered RGB: each frame's map is
quantized to 256 levels of viridis and written as a GIF with that palette, so the GIF is lossless
and a frame's pixels are exactly :func:`attention_frame` of its step (the tests compare them).
"""
from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from .text.tokens import token_text

#: The attention colormap, the same as ``plots.CMAP`` (plots re-exports this module, so this one
#: cannot import plots; tests/test_slides.py checks that the two agree).
CMAP = "viridis"
#: Height in pixels of the caption strip under each frame ("step 3 · t = 901").
CAPTION = 24
#: A slide's size in pixels: 16:9 at 1080p, the size projectors and slide software expect.
SLIDE = (1920, 1080)


def _palette(cmap: str) -> list[int]:
    colors = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3]
    return list((colors * 255).round().astype(np.uint8).ravel())


def _word(result, word: str | int) -> tuple[str, list[int]]:
    """A word or phrase of the prompt, or a token index -> (label, token indices)."""
    if isinstance(word, int):
        return token_text(result.tokens[word]), [word]
    return word, result.token_indices(word)


def attention_indices(result, word: str | int, step: int, size: int = 256, layer_sizes=None) -> np.ndarray:
    """One step's map of ``word`` (all layers, head mean) as palette indices 0-255, ``size`` × ``size``.

    Each map is scaled to its own peak (as in ``plot_attention_over_steps``: the animation shows
    *where* the word attends at each step) and enlarged by repeating cells, so no value is invented.
    """
    store = result.store
    if store is None or not store.maps:
        raise ValueError("this result has no attention: pass store=AttentionStore() to generate()")
    _, indices = _word(result, word)
    heat = store.aggregate(tokens=indices, steps=[step], layer_sizes=layer_sizes).sum(0).float().numpy()
    peak = float(heat.max())
    levels = np.zeros(heat.shape, np.uint8) if peak <= 0 else np.round(heat / peak * 255).astype(np.uint8)
    reps = (-(-size // levels.shape[0]), -(-size // levels.shape[1]))  # ceil: then crop to size
    return np.kron(levels, np.ones(reps, np.uint8))[:size, :size]


def attention_frame(result, word: str | int, step: int, size: int = 256, layer_sizes=None,
                    cmap: str = CMAP) -> np.ndarray:
    """The RGB pixels (``size`` × ``size`` × 3, uint8) of one step's map, as the animation shows them."""
    palette = np.asarray(_palette(cmap), np.uint8).reshape(256, 3)
    return palette[attention_indices(result, word, step, size, layer_sizes)]


def _frames(result, word, size, layer_sizes, cmap) -> list[Image.Image]:
    store = result.store
    label, _ = _word(result, word)
    frames = []
    for step in store.step_indices:
        canvas = np.zeros((size + CAPTION, size), np.uint8)  # the caption strip is palette index 0
        canvas[:size] = attention_indices(result, word, step, size, layer_sizes)
        frame = Image.fromarray(canvas, mode="P")
        frame.putpalette(_palette(cmap))
        # the caption also keeps frames distinct: Pillow merges identical consecutive GIF frames
        ImageDraw.Draw(frame).text((4, size + 6), f'"{label}" step {step} t={store.timesteps.get(step)}', fill=255)
        frames.append(frame)
    return frames


def save_animation(result, word: str | int, path, fps: float = 4, size: int = 256, layer_sizes=None,
                   cmap: str = CMAP) -> Path:
    """Save ``word``'s attention over the captured steps as ``.gif`` (Pillow) or ``.mp4`` (ffmpeg).

    One frame per captured step, its map on top and "step i t=…" under it. An MP4 needs the
    ``ffmpeg`` program (``apt-get install ffmpeg``); without it saving one raises RuntimeError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = _frames(result, word, size, layer_sizes, cmap)
    if not frames:
        raise ValueError("the store holds no steps: nothing to animate")
    if path.suffix.lower() == ".gif":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                       loop=0, optimize=False, disposal=1)
    elif path.suffix.lower() == ".mp4":
        _write_mp4(frames, path, fps)
    else:
        raise ValueError(f"{path.name}: save_animation writes .gif or .mp4")
    return path


def _write_mp4(frames: list[Image.Image], path: Path, fps: float) -> None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("writing an MP4 needs the ffmpeg program (apt-get install ffmpeg); save a .gif instead")
    with tempfile.TemporaryDirectory() as folder:
        for i, frame in enumerate(frames):
            frame.convert("RGB").save(Path(folder) / f"{i:05d}.png")
        # yuv420p: the pixel format every player and slide program reads; it needs even sides
        command = [ffmpeg, "-v", "error", "-y", "-framerate", str(fps), "-i", str(Path(folder) / "%05d.png"),
                   "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
        subprocess.run(command, check=True)


def save_slide(fig, path, size: tuple[int, int] = SLIDE, dpi: int = 200, background: str = "white") -> Path:
    """Save a figure as a 16:9 image (1920 × 1080 by default): the figure, scaled to fit, centered.

    The figure is drawn once at ``dpi`` and then placed on the slide, so its own layout (panels,
    titles) is never squeezed into a new aspect ratio.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor=background)
    drawn = Image.open(buffer).convert("RGB")
    scale = min(size[0] / drawn.width, size[1] / drawn.height)
    drawn = drawn.resize((max(1, round(drawn.width * scale)), max(1, round(drawn.height * scale))), Image.LANCZOS)
    slide = Image.new("RGB", size, background)
    slide.paste(drawn, ((size[0] - drawn.width) // 2, (size[1] - drawn.height) // 2))
    slide.save(path)
    return path
