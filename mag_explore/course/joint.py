"""Notebook 08's helpers: joint attention (Flux.1, SD3) next to a UNet's cross-attention.

* :func:`capture_joint` - the whole joint softmax of one layer at one step ([text; image] ×
  [text; image], head mean), with its block boundaries and token names;
* :func:`plot_joint_matrix` - that matrix with its four blocks labelled, and how each query's
  attention splits between text and image keys;
* :func:`word_maps`, :func:`plot_word_grid` - per-word maps (one row per layer choice or per
  model), titled with the words, steps and layers;
* :func:`attention_budget`, :func:`plot_attention_budget` - where a pixel's attention goes, per
  layer: BOS, the prompt's words, EOS and padding, and (MMDiT only) the image tokens.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LogNorm

from ..attention import AttentionContext, AttentionHook, AttentionStore
from ..attention.joint import image_text_block, joint_attention_layer_names
from ..families import is_mmdit
from ..plots import CMAP, FONT, TITLE, legible, short_layer_name
from ..sampling import GenerationResult, Hooks, Sampler
from ..text.tokens import phrase_occurrences, token_text, words_of

__all__ = ["JointMatrix", "attention_budget", "capture_joint", "layer_label", "plot_attention_budget",
           "plot_joint_matrix", "plot_word_grid", "word_maps"]


def layer_label(layer: str, place: str | None = None) -> str:
    """A short name: 'single_transformer_blocks.3.attn' -> 'single 3'; 'transformer_blocks.1.attn' with place
    "double" (Flux) -> 'double 1', "joint" (SD3) -> 'joint 1'; a UNet layer -> 'up1.0'."""
    parts = layer.split(".")
    if parts[0] == "single_transformer_blocks":
        return f"single {parts[1]}"
    if parts[0] == "transformer_blocks":
        return f"{place or 'block'} {parts[1]}"
    return short_layer_name(layer)


class JointMatrix(AttentionHook):
    """Keeps the whole joint softmax of one layer at one step: conditional rows, head mean, float32 on the CPU."""

    def __init__(self, layer: str, step: int):
        self.layer, self.step = layer, step
        self.probs: torch.Tensor | None = None
        self.ctx: AttentionContext | None = None

    def active(self, ctx: AttentionContext) -> bool:
        return ctx.phase == "denoise" and ctx.layer == self.layer and ctx.step_index == self.step

    def observe(self, probs, ctx) -> None:  # the image→text block: observe_joint keeps the whole matrix
        pass

    def observe_joint(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        rows = ctx.rows("cond")
        if self.probs is None and rows:  # Flux with true CFG runs a second (uncond) pass: keep the first cond one
            self.probs = probs[rows[0]].float().mean(0).cpu()  # (sequence, sequence)
            self.ctx = ctx


def capture_joint(pipe, prompt: str, layer: str | None = None, step: int = 0, seed: int = 0,
                  num_inference_steps: int | None = None, **options) -> dict:
    """Run the first ``step + 1`` steps of ``prompt`` and keep ``layer``'s joint matrix at ``step``.

    Returns ``probs`` (sequence × sequence, rows = queries, head mean, conditional image),
    ``text`` and ``image`` (slices of the sequence), ``tokens`` (a name per text key:
    the prompt's pieces, then "pad"), ``layer``, ``place``, ``step``, ``timestep``,
    ``sigma`` (flow matching: t = 1000·σ), ``height`` × ``width`` of the image tokens.
    """
    if not is_mmdit(pipe):
        raise ValueError(f"capture_joint needs a Flux or SD3 pipeline (joint attention), not {type(pipe).__name__}")
    layers = joint_attention_layer_names(pipe.transformer)
    layer = layers[0] if layer is None else layer
    if layer not in layers:
        raise ValueError(f"layer {layer!r} is not a joint-attention layer; layers: {layers}")
    keeper = JointMatrix(layer, step)
    sampler = Sampler(pipe, prompt, seed=seed, num_inference_steps=num_inference_steps, controls=[Hooks(keeper)],
                      **options)
    if not 0 <= step < len(sampler.timesteps):
        raise ValueError(f"step={step}: this run has steps 0..{len(sampler.timesteps) - 1}")
    for _ in range(step + 1):
        sampler.step()
    ctx, probs = keeper.ctx, keeper.probs
    image_rows, text_cols = image_text_block(ctx, probs.shape[-1])
    result = sampler.result()
    names = [token_text(t) for t in result.tokens]
    tokens = [names[i] if i < len(names) else "pad" for i in range(ctx.num_text_tokens)]
    timestep = sampler.timesteps[step]
    return {"probs": probs, "text": text_cols, "image": image_rows, "tokens": tokens, "layer": layer,
            "place": ctx.place, "step": step, "timestep": timestep,
            "sigma": float(sampler.scheduler.sigmas[step]), "height": ctx.height, "width": ctx.width}


@legible
def plot_joint_matrix(captured: dict, floor: float = 1e-4) -> plt.Figure:
    """The joint softmax of one layer with its four blocks labelled (log colour scale), and each
    query's split of attention between the text keys and the image keys."""
    probs = captured["probs"].numpy()
    text, image = captured["text"], captured["image"]
    n = probs.shape[0]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [2.2, 1]})
    shown = ax.imshow(probs.clip(floor, None), cmap=CMAP, norm=LogNorm(vmin=floor, vmax=float(probs.max())),
                      interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label="probability (log scale)")
    edge = text.stop if text.start == 0 else text.start  # where text and image meet, on both axes
    for line in (ax.axhline, ax.axvline):
        line(edge - 0.5, color="white", linewidth=2)
    spans = {"text": (text.start, text.stop), "image": (image.start, image.stop)}
    for query, (r0, r1) in spans.items():
        for key, (c0, c1) in spans.items():
            star = " ★" if (query, key) == ("image", "text") else ""
            ax.text((c0 + c1) / 2, (r0 + r1) / 2, f"{query}→{key}{star}", ha="center", va="center", fontsize=FONT + 1,
                    color="black", bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=2))
    ax.set_xlabel(f"key (attended to): {text.stop - text.start} text, {image.stop - image.start} image tokens")
    ax.set_ylabel("query (attending): one row = one softmax")
    ax.set_title(f"layer {layer_label(captured['layer'], captured['place'])}, step {captured['step']} "
                 f"(t={captured['timestep']}, σ={captured['sigma']:.2f}): all {n} tokens, head mean", fontsize=FONT)
    # each query's mass on text keys vs image keys (rows sum to 1 over both)
    on_text = probs[:, text].sum(-1)
    groups = {"text queries": on_text[text], "image queries": on_text[image]}
    labels = list(groups)
    text_share = [float(v.mean()) for v in groups.values()]
    bars.bar(labels, text_share, color="tab:orange", label="on text keys")
    bars.bar(labels, [1 - s for s in text_share], bottom=text_share, color="tab:blue", label="on image keys")
    for i, share in enumerate(text_share):
        bars.text(i, share / 2 if share > 0.08 else share + 0.03, f"{share:.0%} text", ha="center", fontsize=FONT)
    bars.set(ylim=(0, 1), ylabel="share of the row (mean over queries)")
    bars.set_title("where each query's attention goes", fontsize=FONT)
    bars.legend(fontsize=FONT, loc="upper right")
    fig.suptitle("joint attention: one softmax over [text; image]; ★ image→text plays cross-attention's role",
                 fontsize=TITLE)
    fig.tight_layout()
    return fig


def word_maps(result: GenerationResult, words, layers=None, steps=None) -> dict[str, torch.Tensor]:
    """Per word (or phrase): its maps summed over its tokens, averaged over ``layers`` and ``steps`` (default all)."""
    return {word: result.store.aggregate(tokens=result.token_indices(word), steps=steps, layers=layers).sum(0)
            for word in words}


@legible
def plot_word_grid(rows: dict, title: str, images: dict | None = None, cmap: str = CMAP) -> plt.Figure:
    """``rows``: row label -> {word: (h, w) map}. One shared colour scale per row (its max in the label);
    ``images``: row label -> image, drawn first in its row (rows without one leave that panel empty)."""
    words = list(next(iter(rows.values())))
    extra = 1 if images else 0
    ncols = len(words) + extra
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols + 1.2, 2.8 * len(rows) + 0.6), squeeze=False)
    for r, (label, maps) in enumerate(rows.items()):
        vmax = max(float(m.max()) for m in maps.values())
        if images and label in images:
            axes[r, 0].imshow(np.asarray(images[label]))
            axes[r, 0].set_title("image", fontsize=FONT)
        elif images:  # a row without an image: an empty first panel that still carries the row's label
            for spine in axes[r, 0].spines.values():
                spine.set_visible(False)
        for c, word in enumerate(words):
            ax = axes[r, c + extra]
            heat = maps[word]
            ax.imshow(heat.numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f'"{word}"', fontsize=FONT)
        axes[r, 0].set_ylabel(f"{label}\n(max {vmax:.3f})", fontsize=FONT)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=TITLE)
    fig.tight_layout()
    return fig


def _word_indices(result: GenerationResult) -> list[int]:
    found = set()
    for word in set(words_of(result.prompt)):
        for occurrence in phrase_occurrences(result.tokenizer, result.prompt, word):
            found |= set(occurrence)
    return sorted(found)


def attention_budget(result: GenerationResult) -> dict[str, dict[str, float]]:
    """Per layer (keyed by :func:`layer_label`): the mean share of a pixel's attention on BOS, the prompt's words, EOS and padding,
    and (joint attention) the image tokens. Needs a store of every text key: ``AttentionStore(tokens="all")``."""
    store: AttentionStore = result.store
    if store is None or store.tokens != "all":
        raise ValueError('attention_budget needs the run\'s store to keep every text key: AttentionStore(tokens="all")')
    words = _word_indices(result)
    first_ctx = next(iter(store.contexts.values()))
    joint = first_ctx.num_text_tokens is not None
    bos = [] if joint and first_ctx.text_first else [0]  # CLIP has BOS at 0 (SD, SDXL, SD3); T5 (Flux) has none
    budget = {}
    for layer in store.layers:
        maps = torch.stack([store.get(step, layer)[0].float().mean(0) for step in store.step_indices])  # (s, h, w, t)
        per_token = maps.flatten(1, 2).mean(1).mean(0)  # mean over steps and pixels: (tokens,)
        total = float(per_token.sum())
        parts = {"BOS": float(per_token[bos].sum()) if bos else 0.0, "the prompt's words": float(per_token[words].sum())}
        parts["EOS and padding"] = total - parts["BOS"] - parts["the prompt's words"]
        parts["image tokens"] = max(0.0, 1.0 - total) if joint else 0.0
        budget[layer_label(layer, store.contexts[(store.step_indices[0], layer)].place)] = parts
    return budget


@legible
def plot_attention_budget(budgets: dict[str, dict], title: str) -> plt.Figure:
    """Stacked bars per layer, one panel per model: ``budgets`` model label -> :func:`attention_budget`."""
    colors = {"BOS": "tab:gray", "the prompt's words": "tab:orange", "EOS and padding": "tab:purple",
              "image tokens": "tab:blue"}
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.6), squeeze=False)
    for ax, (model, budget) in zip(axes[0], budgets.items()):
        names = list(budget)
        bottom = np.zeros(len(names))
        for part, color in colors.items():
            values = np.array([b[part] for b in budget.values()])
            if values.any():
                ax.bar(names, values, bottom=bottom, color=color, label=part)
                bottom += values
        ax.set(ylim=(0, 1), ylabel="share of a pixel's attention")
        ax.set_title(model, fontsize=FONT)
        ax.tick_params(axis="x", rotation=60)
        ax.legend(fontsize=FONT, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    fig.suptitle(title, fontsize=TITLE)
    fig.tight_layout()
    return fig
