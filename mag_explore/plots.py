"""Figures that teach: every function returns a matplotlib Figure whose titles name the
words, the steps and the layers shown. Plots only read results; they never run the model.
"""
from __future__ import annotations

import functools
import io
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from .attention import AttentionStore
from .layouts.colors import color_named_in
from .text.tokens import token_text

#: Perceptually uniform (brightness rises evenly with the value, readable in grey and by
#: color-blind viewers): what every attention map uses unless a caller asks for another.
CMAP = "viridis"
#: Font sizes in points, for a projector at the back of a room: nothing below FONT.
FONT, TITLE = 11, 12
_LEGIBLE = {"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT, "xtick.labelsize": FONT,
            "ytick.labelsize": FONT, "legend.fontsize": FONT, "figure.titlesize": TITLE}


def legible(plot):
    """Make a figure function draw every text at FONT points or more (ticks, labels, legends too).

    Only the font settings are set and restored. (``plt.rc_context`` would restore *every*
    rcParam on exit, ``interactive`` included: when the notebook's inline backend first starts
    inside the context, it sets ``interactive`` on, the exit sets it off again, and Jupyter then
    silently stops showing every later figure.)
    """
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        saved = {key: plt.rcParams[key] for key in _LEGIBLE}
        plt.rcParams.update(_LEGIBLE)
        try:
            return plot(*args, **kwargs)
        finally:
            plt.rcParams.update(saved)
    return wrapper


def _as_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


def upsample_map(map_hw: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(map_hw[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _steps_label(store: AttentionStore, steps) -> str:
    steps = sorted(store.step_indices if steps is None else steps)
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"


def _resolve_tokens(result, tokens) -> list[tuple[str, list[int]]]:
    """Words or token indices -> (label, indices) pairs; None: every word of the prompt."""
    store_tokens = result.store.token_indices
    names = result.tokens
    if tokens is None:
        last = len(names) - 1
        return [(token_text(names[i]), [i]) for i in store_tokens if 0 < i < last]
    pairs = []
    for token in tokens:
        if isinstance(token, int):
            pairs.append((token_text(names[token]) if token < len(names) else f"#{token}", [token]))
        else:
            pairs.append((token, result.token_indices(token)))
    return pairs


@legible
def plot_token_maps(result, tokens: Sequence[str | int] | None = None, steps=None, layer_sizes=None,
                    overlay: bool = True, alpha: float = 0.6, cmap: str = CMAP, scale: str = "own") -> plt.Figure:
    """One panel per word: its cross-attention averaged over steps, layers and heads, over the image.

    ``tokens``: words/phrases of the prompt or token indices (default: every word).
    ``scale``: "own" (each map from 0 to its own peak: shows *where* a word attends, so a
    word with little attention glows as bright as one with much) or "shared" (one scale for
    all panels: shows *how much*). Each panel's title gives its peak either way.
    """
    if scale not in ("own", "shared"):
        raise ValueError(f"scale={scale!r}: expected 'own' (each map to its own peak) or 'shared' (one scale)")
    store = result.store
    if store is None or not store.maps:
        raise ValueError("this result has no attention: pass store=AttentionStore() to generate()")
    pairs = _resolve_tokens(result, tokens)
    image = _as_array(result.images[0])
    size = image.shape[:2]
    fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(2.8 * (len(pairs) + 1), 3.3), squeeze=False,
                             layout="constrained")  # room for two-line titles under the suptitle
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=FONT)
    heats = [upsample_map(store.aggregate(tokens=indices, steps=steps, layer_sizes=layer_sizes).sum(0), size)
             for _, indices in pairs]
    top = max(float(h.max()) for h in heats) if scale == "shared" else None
    for ax, (label, _), heat in zip(axes[0, 1:], pairs, heats):
        if overlay:
            ax.imshow(image)
        ax.imshow(heat, cmap=cmap, alpha=alpha if overlay else None, vmin=0 if top else None, vmax=top)
        ax.set_title(f'"{label}"\npeak {heat.max():.2g}', fontsize=FONT)
    for ax in axes.flat:
        ax.axis("off")
    res = "all layers" if layer_sizes is None else f"layers at {sorted(layer_sizes)}"
    scaled = "each map scaled to its own peak" if scale == "own" else "one color scale for all maps"
    fig.suptitle(f"cross-attention per word, {_steps_label(store, steps)}, {res}, head mean; {scaled}",
                 fontsize=TITLE)
    return fig


@legible
def plot_attention_over_steps(result, token: str | int, steps: Sequence[int] | None = None,
                              layer_sizes=None, cmap: str = CMAP) -> plt.Figure:
    """How one word's map forms over the denoising steps (a row of maps)."""
    store = result.store
    (label, indices), = _resolve_tokens(result, [token])
    steps = list(store.step_indices if steps is None else steps)
    if len(steps) > 10:
        steps = [steps[i] for i in np.linspace(0, len(steps) - 1, 10).round().astype(int)]
    fig, axes = plt.subplots(1, len(steps), figsize=(2.4 * len(steps), 3.0), squeeze=False,
                             layout="constrained")  # room for two-line titles under the suptitle
    for ax, step in zip(axes[0], steps):
        ax.imshow(store.aggregate(tokens=indices, steps=[step], layer_sizes=layer_sizes).sum(0).numpy(), cmap=cmap)
        ax.set_title(f"step {step}\nt={store.timesteps.get(step)}", fontsize=FONT)
        ax.axis("off")
    fig.suptitle(f'"{label}" over the steps (all layers, head mean; each map scaled to its own peak)', fontsize=TITLE)
    return fig


@legible
def plot_attention_over_layers(result, token: str | int, step: int | None = None, cmap: str = CMAP) -> plt.Figure:
    """One word's map in every cross-attention layer, at one step (default: the last stored)."""
    store = result.store
    (label, indices), = _resolve_tokens(result, [token])
    step = store.step_indices[-1] if step is None else step
    layers = store.layers
    fig, axes = plt.subplots(1, len(layers), figsize=(2.4 * len(layers), 3.2), squeeze=False,
                             layout="constrained")  # room for two-line titles under the suptitle
    for ax, layer in zip(axes[0], layers):
        heat = sum(store.map(step, layer, i) for i in indices)
        ax.imshow(heat.numpy(), cmap=cmap)
        h, w = store.grid(layer)
        ax.set_title(f"{short_layer_name(layer)}\n{h}×{w}", fontsize=FONT)
        ax.axis("off")
    fig.suptitle(f'"{label}" per layer at step {step} (t={store.timesteps.get(step)}; each map scaled to its own peak)',
                 fontsize=TITLE)
    return fig


def short_layer_name(layer: str) -> str:
    """'up_blocks.1.attentions.0.transformer_blocks.0.attn2' -> 'up1.0'."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        return "mid"
    return f"{parts[0].split('_')[0]}{parts[1]}.{parts[3]}"


@legible
def plot_images(images: dict, layout=None, title: str | None = None) -> plt.Figure:
    """Images side by side (e.g. none / swap / MAG), with the layout first if given."""
    panels = ([("layout", layout.color_image())] if layout is not None else []) + [
        (name, _as_array(img)) for name, img in images.items()
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4), squeeze=False)
    for ax, (name, picture) in zip(axes[0], panels):
        ax.imshow(picture)
        ax.set_title(name, fontsize=FONT)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=TITLE)
    fig.tight_layout()
    return fig


@legible
def plot_guidance(diagnostics: dict, labels: Sequence[str] | None = None) -> plt.Figure:
    """MAG per guided step: the loss before the update, and each region's attention share inside its mask."""
    if not diagnostics or not diagnostics.get("step"):
        raise ValueError("no guidance diagnostics: was MAG active in any step?")
    steps = [f"{s}.{i}" if i else str(s) for s, i in zip(diagnostics["step"], diagnostics["iteration"])]
    shares = np.array(diagnostics["inside_share"])
    labels = labels or [f"region {i}" for i in range(shares.shape[1])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, diagnostics["loss"], marker="o")
    left.set(title="MAG loss before each update", xlabel="guided step", ylabel="L")
    for i, label in enumerate(labels):
        named = color_named_in(label)  # "red circle" drawn in red: in the shapes world color is the content
        color = None if named is None else tuple(c / 255 for c in named)
        right.plot(steps, shares[:, i], marker="o", label=label, color=color)
    right.set(title="each region's share of its words' attention inside its mask", xlabel="guided step", ylim=(0, 1))
    right.legend(fontsize=FONT)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=FONT, rotation=90)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- course additions
# (widgets and notebooks; the figures above are unchanged)


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes (what an ``ipywidgets.Image`` shows)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def figure_png(fig, dpi: int = 100) -> bytes:
    """A figure as PNG bytes; the figure is closed, so a notebook does not show it twice."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def attention_overlay(image, heat, alpha: float = 0.6, cmap: str = CMAP, size: int | None = None):
    """A PIL image: ``heat`` (h×w, any scale) as a color map over ``image``.

    The map is scaled to its own maximum (read the value from the caption, not the
    color), upsampled bilinearly to the image; ``size`` enlarges the result (nearest)
    so that a 64×64 image is big enough to see.
    """
    from PIL import Image

    picture = _as_array(image).astype(np.float32) / 255
    heat = torch.as_tensor(heat).float()
    scaled = upsample_map(heat / heat.max().clamp_min(1e-12), picture.shape[:2]).clip(0, 1)
    colored = plt.get_cmap(cmap)(scaled)[..., :3]
    blended = (1 - alpha) * picture + alpha * colored
    out = Image.fromarray((blended * 255).round().astype("uint8"))
    if size is not None:
        out = out.resize((size, round(size * out.height / out.width)), Image.NEAREST)
    return out


@legible
def plot_run_summary(result, layout=None, title: str | None = None, cmap: str = CMAP) -> plt.Figure:
    """Layout, image, and each region's words' attention (all steps and layers) with the mask outlined.

    Without a layout: the image and every word's map (as ``plot_token_maps``).
    """
    if layout is None:
        return plot_token_maps(result)
    store = result.store
    image = _as_array(result.images[0])
    size = image.shape[:2]
    labels = layout.labels
    fig, axes = plt.subplots(1, 2 + len(labels), figsize=(3.0 * (2 + len(labels)), 3.5), squeeze=False)
    axes = axes[0]
    axes[0].imshow(layout.color_image())
    axes[0].set_title("layout", fontsize=FONT)
    axes[1].imshow(image)
    axes[1].set_title("image", fontsize=FONT)
    masks = layout.masks_at(*size).numpy()
    for ax, label, region, mask in zip(axes[2:], labels, layout.regions, masks):
        indices = list(region.token_indices) if region.token_indices else result.token_indices(label)
        heat = upsample_map(store.aggregate(tokens=indices).sum(0), size) if store is not None else None
        ax.imshow(image)
        if heat is not None:
            ax.imshow(heat, cmap=cmap, alpha=0.6)
        ax.contour(mask, levels=[0.5], colors="white", linewidths=1.2)
        ax.set_title(f'"{label}" attention', fontsize=FONT)
    for ax in axes:
        ax.axis("off")
    steps = len(result.timesteps)
    fig.suptitle(title or f'"{result.prompt}", {steps} steps, seed {result.settings.get("seed")}; '
                 "maps: all steps and layers, head mean; white: the region", fontsize=FONT)
    fig.tight_layout()
    return fig


@legible
def plot_iou(rows: Sequence[dict], title: str = "mask IoU per method (mean over regions and seeds)") -> plt.Figure:
    """Bars of mean IoU per method, one group per layout. ``rows``: dicts with layout, method, iou."""
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2.0 + 2.4 * len(layouts), 4))
    for k, method in enumerate(methods):
        means = [np.mean([r["iou"] for r in rows if r["layout"] == name and r["method"] == method] or [np.nan])
                 for name in layouts]
        bars = ax.bar(np.arange(len(layouts)) + (k - (len(methods) - 1) / 2) * width, means, width, label=method)
        ax.bar_label(bars, fmt="%.2f", fontsize=FONT)
    ax.set_xticks(np.arange(len(layouts)), layouts, fontsize=FONT)
    ax.set(ylim=(0, 1), ylabel="IoU (region vs. its color)", title=title)
    ax.title.set_fontsize(TITLE)
    ax.legend(fontsize=FONT)
    fig.tight_layout()
    return fig


def region_shares(store: AttentionStore, layout, step: int = 0) -> list[float]:
    """Per region: the share of its words' attention that falls inside its mask at ``step``
    (all layers, resampled to the finest, head mean): what :func:`plot_store_comparison` shows."""
    shares = []
    for i, region in enumerate(layout.regions):
        heat = store.aggregate(tokens=list(region.token_indices), steps=[step]).sum(0)
        mask = layout.masks_at(*heat.shape)[i]
        shares.append(float((heat * mask).sum() / heat.sum().clamp_min(1e-12)))
    return shares


@legible
def plot_store_comparison(stores: dict, layout, step: int = 0, cmap: str = CMAP) -> plt.Figure:
    """Rows: named stores (e.g. without / with guidance); columns: the layout's regions.

    Each panel is a region's words' attention at ``step``, all layers (resampled, head
    mean), with the region outlined; the title gives the share of the map inside the mask
    (:func:`region_shares`), the row's name stands at its left.
    """
    labels = layout.labels
    fig, axes = plt.subplots(len(stores), len(labels), figsize=(3.4 * len(labels) + 1.2, 3.3 * len(stores)),
                             squeeze=False)
    for row, (name, store) in zip(axes, stores.items()):
        for i, (ax, label, share) in enumerate(zip(row, labels, region_shares(store, layout, step))):
            heat = store.aggregate(tokens=list(layout.regions[i].token_indices), steps=[step]).sum(0)
            ax.imshow(heat.numpy(), cmap=cmap)
            ax.contour(layout.masks_at(*heat.shape)[i].numpy(), levels=[0.5], colors="white", linewidths=1.2)
            ax.set_title(f'"{label}": {share:.0%} inside', fontsize=FONT)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, fontsize=FONT)
    fig.suptitle(f"attention at step {step} (all layers, head mean; each map scaled to its own peak); white: the region",
                 fontsize=TITLE)
    fig.tight_layout()
    return fig


@legible
def plot_layout(layout, ax=None, image=None, alpha: float = 0.5):
    """A matplotlib Figure of ``layout`` with each region's phrase at its centre.

    With ``image`` (e.g. a generated PIL image) the layout is laid over it with
    opacity ``alpha``, stretched to the image's size. Draws into ``ax`` if given.
    """
    if ax is None:  # a pyplot figure: a notebook shows it at the end of the cell, like every other plot
        _, ax = plt.subplots(figsize=(4, 4))
    picture = layout.color_image()
    if image is None:
        height, width = layout.height, layout.width
        ax.imshow(picture, extent=(0, width, height, 0), interpolation="nearest")
    else:
        background = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        height, width = background.shape[:2]
        covered = layout.masks.any(axis=0)
        overlay = np.dstack([picture, np.where(covered, round(255 * alpha), 0).astype(np.uint8)])
        ax.imshow(background, extent=(0, width, height, 0))
        ax.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
    sy, sx = height / layout.height, width / layout.width
    for i, region in enumerate(layout.regions):
        y, x = _label_point(region.mask)
        ax.text((x + 0.5) * sx, (y + 0.5) * sy, layout.label(i), ha="center", va="center",
                fontsize=FONT, bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=1))
    ax.set_title(" | ".join(layout.labels), fontsize=TITLE)
    ax.set_xticks([])  # keep the frame: it shows the image border on a white background
    ax.set_yticks([])
    return ax.figure


def _label_point(mask: np.ndarray) -> tuple[float, float]:
    """The region's centroid, or its pixel nearest to the centroid if that lies outside
    (a ring or a C shape), so the label always sits on the region."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    if mask[int(round(cy)), int(round(cx))]:
        return cy, cx
    nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
    return float(ys[nearest]), float(xs[nearest])


# Slide-ready exports live in their own module (this one is near its size limit); they are
# reached from here, beside the figures they export: plots.save_animation, plots.save_slide.
from .slides import save_animation, save_slide  # noqa: E402,F401
