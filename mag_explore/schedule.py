"""Which denoising steps a method acts on.

The official MAG code says "while the timestep t > 700"; a course often says "the first
ten steps". ``StepRange`` holds either form and checks it against the actual schedule,
so a range that selects nothing, or lies outside the schedule, is an error - not a
silent no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union


@dataclass(frozen=True)
class StepRange:
    """Either ``above_timestep`` (active while t > it) or step indices ``[start, stop)``."""

    above_timestep: int | None = None
    start: int | None = None
    stop: int | None = None

    def __post_init__(self):
        by_t = self.above_timestep is not None
        by_index = self.start is not None or self.stop is not None
        if by_t == by_index:
            raise ValueError("give either above_timestep=T or start/stop step indices, not both or neither")

    @classmethod
    def all(cls) -> "StepRange":
        return cls(start=0, stop=None)

    def contains(self, step_index: int, timestep: int) -> bool:
        if self.above_timestep is not None:
            return int(timestep) > self.above_timestep
        stop = self.stop if self.stop is not None else step_index + 1
        return (self.start or 0) <= step_index < stop

    def selected(self, timesteps: Sequence[int]) -> list[int]:
        """Indices of the steps of ``timesteps`` that this range selects."""
        return [i for i, t in enumerate(timesteps) if self.contains(i, int(t))]

    def validate(self, timesteps: Sequence[int], num_train_timesteps: int = 1000, what: str = "step range") -> list[int]:
        """The selected step indices; a clear error if the range does not fit the schedule."""
        n = len(timesteps)
        if self.above_timestep is not None and not 0 <= self.above_timestep < num_train_timesteps:
            raise ValueError(
                f"{what}: timestep threshold {self.above_timestep} is outside 0..{num_train_timesteps - 1}"
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

    def __str__(self) -> str:
        if self.above_timestep is not None:
            return f"t > {self.above_timestep}"
        return f"steps {self.start or 0}..{'end' if self.stop is None else self.stop - 1}"


StepsLike = Union[StepRange, int, tuple, None]


def as_step_range(value: StepsLike) -> StepRange:
    """``700`` -> while t > 700 (official style); ``(0, 10)`` -> steps 0..9; None -> every step."""
    if value is None:
        return StepRange.all()
    if isinstance(value, StepRange):
        return value
    if isinstance(value, bool):
        raise TypeError(f"step range {value!r}: give a timestep threshold (int), (start, stop) or a StepRange")
    if isinstance(value, (int, float)):
        return StepRange(above_timestep=int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return StepRange(start=int(value[0]), stop=None if value[1] is None else int(value[1]))
    raise TypeError(f"step range {value!r}: give a timestep threshold (int), (start, stop) or a StepRange")
