"""What the three shapes trainers share: atomic checkpoints, when to save and stop, the EMA
update and the learning-rate schedule (``train``, ``train_mmdit`` and ``train_decoder``)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

CHECKPOINT_SECONDS = 300


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-save never leaves a broken checkpoint


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.exists() else None


def checkpoint_now(step: int, steps: int, last_save: float, stop_at: float | None) -> tuple[bool, bool]:
    """(save, stop): save every CHECKPOINT_SECONDS, at the last step and when ``--max-minutes`` ran out; stop then."""
    out_of_time = stop_at is not None and time.time() > stop_at
    if out_of_time:
        print(f"stopping at step {step}: --max-minutes reached")
    return time.time() - last_save > CHECKPOINT_SECONDS or step == steps or out_of_time, out_of_time


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(step: int, steps: int, peak: float, schedule: str, warmup: int = 300) -> float:
    """A linear warm-up over ``warmup`` steps, then constant, or (``"cosine"``) down to a
    tenth of the peak at the last step. Both trainers use it (the MMDiT one: cosine, 200).

    One annealed continuation of the shipped shapes UNet (3,000 steps, cosine from 2.5e-4)
    did not beat it on the suite (closing note of 2026-12-02).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: use one of {', '.join(map(repr, LR_SCHEDULES))}")
    warm = min(1.0, (step + 1) / warmup)
    if schedule == "constant":
        return peak * warm
    progress = min(1.0, step / max(steps - 1, 1))
    # A Python float: a numpy one in the optimizer's state would not load with weights_only.
    return float(peak * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * progress))))
