"""Checks for every setting, run once when a run is set up: no silent wrong image.

Each check returns the (normalised) value or raises :class:`InputError` (a ``ValueError``)
whose message names the setting, the bad value, what is accepted and, where it helps,
the fix. The sampler, the methods, the layouts and the command line all call these, so a
rule lives in one place:

* counts (steps, images, iterations, seeds ...) are whole numbers >= 1 (``check_count``);
* sizes are > 0 and multiples of the VAE factor; they are never rounded (``check_size``);
* floats are finite, and inside their range (``check_number``); λ >= 0 unless the caller
  passes an explicit experimental flag (``check_lambda``);
* step ranges fit the schedule (``schedule.StepRange.validate``), a word-id list per color
  (``layouts.Layout.from_official``), phrases found (``layouts.Layout.resolve``);
* every region keeps a mask cell at the cross-attention layers the method uses
  (``check_regions_at_layers``). A region empty at *every* such layer is an **error**:
  nothing would steer it, and MAG and layout guidance would only push its words'
  attention away. A region empty at *some* of them gets a :class:`VanishingRegionWarning`
  naming the region and the layer sizes: the official code runs such layouts as they
  are (at those layers the words are pushed away, or swapped to zero), and the coarsest
  layers of SD (8x8 at 512²) lose every region narrower than 64 px. The message gives
  the fixes: draw it larger, soft masks with ``mask_mode="area"``, or leave those
  layers out (MAG's ``layer_sizes=``).

Non-finite numbers *during* a run (a NaN or inf in the latents after a step, or in a
guidance loss) stop it with a :class:`NonFiniteError` naming the step and the knob to
turn down; an image is never made from them.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Iterable, Mapping

import torch


class InputError(ValueError):
    """A user's setting is not accepted (the message says which, and what is)."""


class VanishingRegionWarning(UserWarning):
    """A region has no mask cell at some of the cross-attention layers a method uses."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared during a run; the message names the step and the likely knob."""


def check_count(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """A whole number in ``minimum..maximum`` (bools and 3.5 are refused, 3.0 is 3)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value) or value != int(value):
        raise InputError(f"{name}={value!r}: give a whole number >= {minimum}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        accepted = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise InputError(f"{name}={value}: must be {accepted}")
    return value


def check_number(name: str, value, minimum: float | None = None, maximum: float | None = None,
                 hint: str = "") -> float:
    """A finite float in [minimum, maximum] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name}={value!r}: give a finite number{hint}")
    value = float(value)
    low_ok = minimum is None or value >= minimum
    high_ok = maximum is None or value <= maximum
    if not (math.isfinite(value) and low_ok and high_ok):
        if minimum is not None and maximum is not None:
            accepted = f"a finite number in [{minimum:g}, {maximum:g}]"
        elif minimum is not None:
            accepted = f"a finite number >= {minimum:g}"
        elif maximum is not None:
            accepted = f"a finite number <= {maximum:g}"
        else:
            accepted = "a finite number"
        raise InputError(f"{name}={value!r}: must be {accepted}{hint}")
    return value


def check_lambda(value, allow_negative: bool = False, name: str = "lmbda") -> float:
    """MAG's λ: finite and >= 0 (λ < 0 *rewards* attention outside the regions)."""
    if allow_negative:
        return check_number(name, value)
    return check_number(name, value, minimum=0.0,
                        hint="; λ < 0 rewards attention outside the regions (to experiment with it pass "
                             "allow_negative_lambda=True, or --allow-negative-lambda on the command line)")


def check_size(height, width, factor: int) -> tuple[int, int]:
    """Image height and width: whole numbers > 0 and multiples of the VAE factor (never rounded)."""
    for name, value in (("height", height), ("width", width)):
        value = check_count(name, value, minimum=1)
        if value % factor:
            lower, upper = value - value % factor, value - value % factor + factor
            nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise InputError(f"{name}={value}: height and width must be positive multiples of {factor} "
                             f"(the VAE factor); try {nearest}")
    return int(height), int(width)


def check_choice(name: str, value, choices: Iterable) -> object:
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise InputError(f"{name}={value!r}: use one of {', '.join(map(repr, choices))}")
    return value


def check_seed(value) -> int | None:
    """None (random) or a whole number in 0..2**63 - 1."""
    if value is None:
        return None
    return check_count("seed", value, minimum=0, maximum=2**63 - 1)


def check_latents_finite(latents: torch.Tensor, step_index: int, timestep: int, knobs: str) -> None:
    """Stop the run when a step produced NaN/inf latents, naming the step and what to turn down."""
    if not torch.isfinite(latents).all():
        bad = int((~torch.isfinite(latents)).sum())
        raise NonFiniteError(
            f"the latents are not finite after step {step_index} (t={timestep}): {bad} of {latents.numel()} "
            f"values are NaN/inf. Likely cause: {knobs}; turn it down, or run in fp32."
        )


def check_regions_at_layers(layout, grids: Mapping[str, tuple[int, int]], mask_mode: str, method: str,
                            masks_at: Callable | None = None) -> None:
    """Every region of ``layout`` has a non-zero mask cell at every layer in ``grids``.

    ``grids`` maps each cross-attention layer the method uses to its (h, w);
    ``masks_at(layout, h, w)`` gives the method's masks there (default: ``layout.masks_at``
    with ``mask_mode``). See the module docstring for why this is an error.
    """
    if masks_at is None:
        masks_at = lambda layout, h, w: layout.masks_at(h, w, mode=mask_mode)  # noqa: E731
    if not grids:
        raise InputError(f"{method}: no cross-attention layer is selected; check its layer options")
    by_size: dict[tuple[int, int], list[str]] = {}
    for layer, hw in grids.items():
        by_size.setdefault(tuple(hw), []).append(layer)
    lost: dict[str, list[tuple[int, int]]] = {r.name: [] for r in layout.regions}
    for (h, w), layers in sorted(by_size.items()):
        for region, mask in zip(layout.regions, masks_at(layout, h, w)):
            if not bool(mask.max() > 0):
                lost[region.name].append((h, w))
    fixes = "Draw it larger, use mask_mode='area', or leave those layers out"
    for region in layout.regions:
        sizes = ", ".join(f"{h}x{w}" for h, w in lost[region.name])
        if len(lost[region.name]) == len(by_size):
            raise InputError(
                f"{method}: region {region.name!r} ({region.area:.1%} of the image) vanishes at every "
                f"cross-attention layer the method uses ({sizes}) with mask_mode={mask_mode!r}. {fixes}"
            )
        if lost[region.name]:
            warnings.warn(
                f"{method}: region {region.name!r} ({region.area:.1%} of the image) vanishes at the {sizes} "
                f"cross-attention layers with mask_mode={mask_mode!r}; there nothing draws its words in. "
                f"{fixes}", VanishingRegionWarning, stacklevel=4,
            )
