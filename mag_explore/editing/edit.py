"""Layout editing of a real image: invert it, then redraw it with its objects in new regions.

    image, prompt ──DDIM inversion──▶ x_T ──source run (no control)──▶ the image again
                                        │        └─ stores its cross-attention maps
                                        └──edited run──▶ the edited image
                                             MAG (or swap) pulls the moved words into the
                                             target layout and holds the kept words where
                                             the source run had them; optionally the kept
                                             words' source maps are injected in early steps

The user only draws where things should *go*: where the kept words *are* is read from the
source run's own cross-attention (``layout_from_attention``), unless a source layout is given.
An inverted x_T still holds every object where it was, and a nudge to the attention in the
first steps rarely undoes that. So by default (``start="move"``) the moved words' latent
cells are first carried into their target regions (``move_latents``) and MAG then holds every
word in its region. On the embedded shapes model, moving one of two objects to the other half
(measured in the README, kept as floors by ``tests/test_inversion.py``), MAG alone from the
inverted x_T rarely moves it, and the moved x_T without MAG often swaps the two objects' identities.
Both runs start from the same x_T with the inversion's guidance scale (1 by default, see
``mag_explore.editing.inversion``), so without controls the edited run is the source run.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..attention import AttentionStore
from .inversion import InversionResult, invert, psnr, reconstruct
from ..layouts import Layout
from ..methods import METHOD_NAMES, make_controls
from ..methods.inject import AttentionInjection, injection_store
from ..sampling import GenerationResult, Hooks, generate
from ..schedule import StepRange, resolve_step_range
from ..text.tokens import token_indices
from ..validation import check_number, check_seed


STARTS = ("inverted", "renoise", "move")


def layout_from_attention(store: AttentionStore, tokenizer, prompt: str, words: Sequence[str], *,
                          threshold: float = 0.5, size: tuple[int, int] | None = None,
                          steps=None, layer_sizes=None) -> Layout:
    """Where the run that filled ``store`` put each word: a layout read from its attention.

    Each word's map is averaged over the stored steps, layers, heads and its tokens,
    resampled to ``size`` (height, width; default: the finest stored resolution), scaled
    to a peak of 1, and thresholded: the region is where the map is at least
    ``threshold`` (0 < threshold <= 1). ``tokenizer`` may also be a ``GenerationResult``,
    whose tokenizer and image size are then used.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}; it must lie in (0, 1] (maps are scaled to a peak of 1)")
    if isinstance(tokenizer, GenerationResult):
        size = size or (tokenizer.settings["height"], tokenizer.settings["width"])
        tokenizer = tokenizer.tokenizer
    if isinstance(words, str):
        words = [words]
    masks = []
    for word in words:
        tokens = token_indices(tokenizer, prompt, word)
        attention = store.aggregate(tokens=tokens, steps=steps, layer_sizes=layer_sizes, size=size).sum(0)
        masks.append((attention / attention.max().clamp_min(1e-12) >= threshold).numpy())
    return Layout.from_arrays(np.stack(masks), list(words), prompt=prompt)


@dataclass
class EditResult:
    """The edited image and every run that led to it."""

    edited: GenerationResult  # the edited run (its store holds the edited attention)
    source: GenerationResult  # the source run from x_T: the reconstruction of the input
    inversion: InversionResult
    layout: Layout  # what the control steered to: target regions plus kept regions
    source_layout: Layout | None  # where the kept words are (given, or read from attention)

    @property
    def image(self) -> Image.Image:
        return self.edited.image

    @property
    def reconstruction_psnr(self) -> float:
        """PSNR (dB) of the source run against the input: how faithful the inversion is."""
        return psnr(self.inversion.image, self.source.image)


def _regions_of(words: Sequence[str], source_layout: Layout, tokenizer, prompt: str) -> list:
    """The regions of ``source_layout`` whose words are ``words`` (matched by token indices)."""
    resolved = source_layout.resolve(tokenizer, prompt)
    by_tokens = {tuple(r.token_indices): r for r in resolved.regions}
    regions = []
    for word in words:
        found = by_tokens.get(tuple(token_indices(tokenizer, prompt, word)))
        if found is None:
            raise ValueError(f"{word!r} has no region in the source layout; its regions are "
                             f"{source_layout.labels}")
        regions.append(found)
    return regions


def _kept_tokens(target: Layout, keep: Sequence[str], inject_step_range, tokenizer, prompt: str) -> list[int]:
    """Token indices of the kept words, after checking that no word both moves and stays."""
    moved = {i for r in target.regions for i in r.token_indices}
    both = [word for word in keep if moved & set(token_indices(tokenizer, prompt, word))]
    if both:
        raise ValueError(f"kept words {both} also have a region in the target layout; a word either "
                         f"moves (target layout: {target.labels}) or stays (keep)")
    if inject_step_range is not None and not keep:
        raise ValueError(f"inject_step_range={inject_step_range!r} injects the maps of the kept words, "
                         "but keep is empty")
    return [i for word in keep for i in token_indices(tokenizer, prompt, word)]


def move_latents(latents: torch.Tensor, source: Layout, target: Layout, seed: int = 0) -> torch.Tensor:
    """Carry each word's latent cells from its ``source`` region to its ``target`` region.

    An inverted x_T still draws every object where it was; shifting the cells under a
    word's source region so that its centre lands on the centre of the word's target
    region makes the sampler draw it there instead. Where the object was, fresh noise
    (``seed``) lets the model fill in background. Regions are matched by token indices
    (both layouts resolved); cells shifted past the border are dropped.
    """
    h, w = latents.shape[-2:]
    by_tokens = {tuple(r.token_indices): i for i, r in enumerate(source.regions)}
    src_cells = source.masks_at(h, w, mode="area") > 0
    moves = []
    for region, box in zip(target.regions, target.masks_at(h, w, mode="area") > 0):
        index = by_tokens.get(tuple(region.token_indices))
        if index is None:
            raise ValueError(f"{target.label(target.regions.index(region))!r} has no region in the source "
                             f"layout; its regions are {source.labels}")
        dy, dx = (_centre(box) - _centre(src_cells[index])).round().long().tolist()
        moves.append((src_cells[index], dy, dx))
    moved = _fresh_noise(latents, torch.stack([cells for cells, _, _ in moves]).any(0), seed)
    for cells, dy, dx in moves:
        ys, xs = torch.nonzero(cells, as_tuple=True)
        inside = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        moved[..., ys[inside] + dy, xs[inside] + dx] = latents[..., ys[inside], xs[inside]]
    return moved


def _centre(cells: torch.Tensor) -> torch.Tensor:
    """Centre (row, column) of the bounding box of a bool mask."""
    ys, xs = torch.nonzero(cells, as_tuple=True)
    return torch.stack([ys.min() + ys.max(), xs.min() + xs.max()]).float() / 2


def renoise(latents: torch.Tensor, layout: Layout, seed: int = 0) -> torch.Tensor:
    """``latents`` with fresh Gaussian noise in every latent cell that a region of ``layout`` touches.

    An inverted x_T still holds each object where it was (that is how it redraws the
    image), and MAG has to fight that to move it. Fresh noise where the moved object is
    and where it should go leaves the model free to draw it anew there.
    """
    h, w = latents.shape[-2:]
    return _fresh_noise(latents, layout.masks_at(h, w, mode="area").amax(0) > 0, seed)


def _fresh_noise(latents: torch.Tensor, cells: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(seed))
    return torch.where(cells.to(latents.device), noise.to(latents.device, latents.dtype), latents)


def edit_image(pipe, image: Any, prompt: str, target_layout: Layout, *, source_layout: Layout | None = None,
               method: str = "mag", keep: Sequence[str] = (), inject_step_range: tuple | StepRange | None = None,
               threshold: float = 0.5, num_inference_steps: int | None = None, guidance_scale: float = 1.0,
               alpha: float | None = None, lmbda: float | None = None, step_rule: str | None = None,
               while_t_above: int | StepRange | None = None, step_range: tuple | StepRange | None = None,
               inversion: InversionResult | None = None, start: str = "move", seed: int = 0, progress: bool = True,
               allow_negative_lambda: bool = False) -> EditResult:
    """Move or reshape the objects of ``image`` into ``target_layout``.

    Args:
        image: path, PIL image or (H, W, 3) array; ``prompt`` describes it and names
            the words of both layouts.
        target_layout: where the moved words should go (image size, phrases of ``prompt``).
        keep: words that should stay where they are. MAG/swap hold them in their source
            regions, which come from ``source_layout`` or, when it is None, from the
            source run's attention (``layout_from_attention`` with ``threshold``).
        method: a name of ``METHOD_NAMES``: "mag" (default), "swap", "none" (no control), ...
        inject_step_range: also inject the kept words' source-run attention maps during
            these step indices ``(start, stop)``, e.g. ``(0, 10)``; None: no injection.
        num_inference_steps, guidance_scale: of the inversion, and so of both runs (CFG 1:
            see ``mag_explore.editing.inversion`` for why); taken from ``inversion`` when it is given.
        alpha, lmbda, step_rule: MAG's α, λ and step rule, as in ``MaskedAttentionGuidance``.
        while_t_above, step_range: when MAG (or swap) acts (None: the model's threshold).
        inversion: reuse an ``invert`` result of this image and prompt (saves a pass).
        start: the edited run's x_T: "move" (default: the moved words' inverted cells
            carried into the target regions, ``move_latents``), "inverted" (as inverted) or
            "renoise" (fresh noise, ``seed``, where the moved words are and where they go:
            ``renoise``). Where the moved words are comes from ``source_layout`` or the attention.
        allow_negative_lambda: experimental, accept ``lmbda`` < 0 (MAG only).
    """
    keep = _checked_edit_options(method, start, threshold, guidance_scale, seed, keep)
    tokenizer = pipe.tokenizer
    inversion = _inversion_for(pipe, image, prompt, inversion, num_inference_steps, guidance_scale, progress)
    size = (inversion.height, inversion.width)
    target = target_layout.for_generation(*size).resolve(tokenizer, prompt)  # a phrase not in the prompt fails here
    kept_tokens = _kept_tokens(target, keep, inject_step_range, tokenizer, prompt)

    # 1. the source run: redraws the input, and records where each word is
    source, store, source_maps = _source_run(pipe, inversion, kept_tokens, inject_step_range, progress)
    located = list(keep) + (target.labels if start != "inverted" else [])
    if located and source_layout is None:
        source_layout = layout_from_attention(store, tokenizer, prompt, located, threshold=threshold, size=size)
    elif source_layout is not None:
        source_layout = source_layout.for_generation(*size)

    # 2. the edited run: the target regions, plus the kept words where they are
    kept = _regions_of(keep, source_layout, tokenizer, prompt) if keep else []
    layout = Layout(list(target.regions) + [replace(r, color=None) for r in kept], prompt=prompt)
    latents = _starting_latents(inversion.latents, start, target, source_layout, tokenizer, prompt, seed)
    experimental = {"allow_negative_lambda": True} if allow_negative_lambda and method == "mag" else {}
    controls = make_controls(method, layout, alpha=alpha, lmbda=lmbda, step_rule=step_rule, while_t_above=while_t_above,
                             step_range=step_range, **experimental)  # None: the model's defaults, resolved at the start
    if source_maps is not None:
        controls.append(AttentionInjection(source_maps, kept_tokens, step_range=inject_step_range))
    s = inversion.settings
    edited = generate(pipe, prompt, latents=latents, controls=controls, store=AttentionStore(),
                      num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                      negative_prompt=s["negative_prompt"], height=inversion.height, width=inversion.width,
                      progress=progress)
    return EditResult(edited=edited, source=source, inversion=inversion, layout=layout, source_layout=source_layout)


def _checked_edit_options(method: str, start: str, threshold: float, guidance_scale: float, seed: int,
                          keep: Sequence[str] | str) -> list[str]:
    """``edit_image``'s plain options checked (errors name the value and what is accepted); ``keep`` as a list."""
    if method not in METHOD_NAMES:
        raise ValueError(f"method={method!r}; use one of {METHOD_NAMES}")
    if start not in STARTS:
        raise ValueError(f"start={start!r}; use one of {STARTS}")
    check_number("threshold", threshold, minimum=0, maximum=1)
    check_number("guidance_scale", guidance_scale, minimum=0)
    check_seed(seed)
    return [keep] if isinstance(keep, str) else list(keep)


def _inversion_for(pipe, image, prompt: str, inversion: InversionResult | None, num_inference_steps: int | None,
                   guidance_scale: float, progress: bool) -> InversionResult:
    """The given inversion (made for this prompt), or a fresh one of ``image``."""
    if inversion is None:
        return invert(pipe, image, prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      progress=progress)
    if inversion.prompt != prompt:
        raise ValueError(f"the inversion was made for prompt {inversion.prompt!r}, not {prompt!r}")
    return inversion


def _source_run(pipe, inversion: InversionResult, kept_tokens, inject_step_range, progress: bool):
    """The reconstruction of the input with a store; and the kept words' maps to inject, if asked (else None)."""
    store, source_maps = AttentionStore(), None
    if inject_step_range is not None:
        injected = resolve_step_range(step_range=inject_step_range, what="inject_step_range").selected(
            inversion.timesteps)
        source_maps = injection_store(kept_tokens, steps=injected)
    source = reconstruct(pipe, inversion, store=store, controls=[] if source_maps is None else [Hooks(source_maps)],
                         progress=progress)
    return source, store, source_maps


def _starting_latents(inverted: torch.Tensor, start: str, target: Layout, source_layout: Layout | None,
                      tokenizer, prompt: str, seed: int) -> torch.Tensor:
    """The edited run's x_T for ``start`` (see ``edit_image``): as inverted, moved, or renoised."""
    if start == "inverted":
        return inverted
    was = Layout(_regions_of(target.labels, source_layout, tokenizer, prompt), prompt=prompt)
    if start == "renoise":
        return renoise(inverted, Layout(list(target.regions) + list(was.regions)), seed)
    return move_latents(inverted, was, target, seed)
