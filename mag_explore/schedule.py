"""Which denoising steps a method acts on, and the DDIM schedule those steps come from.

The official MAG code says "while the timestep t > 700"; a course often says "the first
ten steps". The two are different numbers, so they have different names everywhere:

* ``while_t_above=700`` - a timestep threshold: active while t > 700 (official style);
* ``step_range=(0, 10)`` - step indices ``[start, stop)``: steps 0..9.

``StepRange`` holds either form and checks it against the actual schedule, so a range
that selects nothing, or lies outside the schedule, is an error - not a silent no-op.
A bare int or tuple, whose meaning a reader has to guess, is a ``TypeError`` that says
which of the two to write.

**Flow matching (Flux.1, SD3).** x_t = (1 − σ)·x_0 + σ·noise, and the scheduler's timesteps
are t = σ · num_train_timesteps = 1000·σ. ``while_t_above=700`` therefore means σ > 0.7 (the
comparison is on int(t), so σ in (0.700, 0.701) counts as t = 700: not above), the same
*fraction of the way from noise* as on DDIM's t, though not the same noise level: DDIM's
t = 700 has a noise std √(1 − ᾱ_t) ≈ 0.93 on SD's schedule. Flux and SD3 shift their σ
toward 1 (``shift``, Flux's ``mu``), so more of their steps have σ > 0.7 than a plain
linear schedule would give. :func:`sigma_as_timestep` writes the mapping out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class StepRange:
    """Either ``while_t_above`` (active while t > it) or step indices ``[start, stop)``."""

    while_t_above: int | None = None
    start: int | None = None
    stop: int | None = None

    def __post_init__(self):
        by_t = self.while_t_above is not None
        by_index = self.start is not None or self.stop is not None
        if by_t == by_index:
            raise ValueError("give either while_t_above=T or start/stop step indices, not both or neither")

    @classmethod
    def all(cls) -> "StepRange":
        return cls(start=0, stop=None)

    def contains(self, step_index: int, timestep: int) -> bool:
        if self.while_t_above is not None:
            return int(timestep) > self.while_t_above
        stop = self.stop if self.stop is not None else step_index + 1
        return (self.start or 0) <= step_index < stop

    def selected(self, timesteps: Sequence[int]) -> list[int]:
        """Indices of the steps of ``timesteps`` that this range selects."""
        return [i for i, t in enumerate(timesteps) if self.contains(i, int(t))]

    def validate(self, timesteps: Sequence[int], num_train_timesteps: int = 1000, what: str = "step range") -> list[int]:
        """The selected step indices; a clear error if the range does not fit the schedule."""
        n = len(timesteps)
        if self.while_t_above is not None and not 0 <= self.while_t_above < num_train_timesteps:
            raise ValueError(
                f"{what}: timestep threshold {self.while_t_above} is outside 0..{num_train_timesteps - 1}"
            )
        if self.start is not None and not 0 <= self.start < n:
            raise ValueError(f"{what}: start step {self.start} is outside the schedule's steps 0..{n - 1}")
        if self.stop is not None and not (self.start or 0) < self.stop <= n:
            raise ValueError(f"{what}: stop step {self.stop} must be in {(self.start or 0) + 1}..{n} (steps 0..{n - 1})")
        chosen = self.selected(timesteps)
        if not chosen:
            ts = [int(t) for t in timesteps]
            raise ValueError(f"{what} {self} selects no step of this schedule (timesteps {ts[0]} … {ts[-1]})")
        return chosen

    def as_keywords(self) -> dict:
        """``{"while_t_above": 700}`` or ``{"step_range": (0, 10)}``: how to write this range."""
        if self.while_t_above is not None:
            return {"while_t_above": self.while_t_above}
        return {"step_range": (self.start or 0, self.stop)}

    def __str__(self) -> str:
        if self.while_t_above is not None:
            return f"t > {self.while_t_above}"
        return f"steps {self.start or 0}..{'end' if self.stop is None else self.stop - 1}"


def _fix_hint(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = int(value)
        return (f"write while_t_above={v} (a timestep threshold: active while t > {v}) or "
                f"step_range=(0, {v}) (step indices 0..{v - 1})")
    if isinstance(value, (tuple, list)):
        return f"for step indices write step_range={tuple(value)!r} ([start, stop))"
    return "write while_t_above=T (active while t > T) or step_range=(start, stop) (step indices [start, stop))"


def resolve_step_range(while_t_above: int | StepRange | None = None, step_range: tuple | StepRange | None = None,
               *, default: StepRange | None = None, what: str = "step range") -> StepRange:
    """The ``StepRange`` that the two keywords stand for; ``default`` when both are None.

    ``while_t_above`` must be an int (a timestep), ``step_range`` a ``(start, stop)`` pair of
    step indices (``stop`` None: to the end); either may also be a ``StepRange``. Anything
    else, or both at once, is a ``TypeError`` that says what to write instead.
    """
    if while_t_above is not None and step_range is not None:
        raise TypeError(f"{what}: give while_t_above or step_range, not both")
    for value in (while_t_above, step_range):
        if isinstance(value, StepRange):
            return value
    if while_t_above is not None:
        if isinstance(while_t_above, bool) or not isinstance(while_t_above, int):
            raise TypeError(f"{what}: while_t_above={while_t_above!r} must be an int timestep; "
                            "for step indices write step_range=(start, stop)")
        return StepRange(while_t_above=while_t_above)
    if step_range is not None:
        if not (isinstance(step_range, (tuple, list)) and len(step_range) == 2
                and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in step_range)):
            raise TypeError(f"{what}: step_range={step_range!r} is not a (start, stop) pair of step indices; "
                            + _fix_hint(step_range))
        start, stop = step_range
        return StepRange(start=0 if start is None else start, stop=stop)
    return StepRange.all() if default is None else default


def sigma_as_timestep(sigma: float, num_train_timesteps: int = 1000) -> int:
    """The ``while_t_above`` threshold that means "while σ > sigma" on a flow-matching schedule (t = 1000·σ)."""
    if not 0 <= sigma < 1:
        raise ValueError(f"sigma={sigma!r}: give a noise level in [0, 1)")
    return int(round(sigma * num_train_timesteps))


def ddim_scheduler(pipe, num_inference_steps: int, device=None):
    """A fresh DDIM scheduler from the pipeline's config, set to ``num_inference_steps``.

    Never the pipeline's own scheduler object, so the pipeline is left as it was.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler
