"""Which devices this machine has, and the one check of a device name a user gives.

``torch.device("quantum")`` raises a long RuntimeError, and ``torch.device("cuda")`` on a
machine without CUDA is accepted until the first ``.to()`` fails deep inside diffusers: both
are checked here first, so ``--device`` and ``load_pipeline(device=)`` answer in one line that
names the device and what this machine has, before anything is loaded or written.
"""
from __future__ import annotations

import torch

from ..validation import InputError

#: the device types mag-explore runs on
DEVICE_TYPES = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """The devices of this machine: "cuda" (with its count), "mps", "cpu"."""
    found = []
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        found.append("cuda" if count == 1 else f"cuda (cuda:0 .. cuda:{count - 1})")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` if this machine has it; else :class:`InputError` in one line."""
    name = str(device)
    has = f"this machine has {', '.join(available_devices())}"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {name!r} is not a device; accepted: {', '.join(DEVICE_TYPES)} "
                         f"(e.g. cuda:0); {has}") from None
    if resolved.type not in DEVICE_TYPES:
        raise InputError(f"device {name!r} is not one mag-explore runs on; accepted: {', '.join(DEVICE_TYPES)}; {has}")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {name!r}: no CUDA GPU here (torch {torch.__version__}); {has}")
        if resolved.index is not None and resolved.index >= count:
            raise InputError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 .. cuda:{count - 1}")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                       and torch.backends.mps.is_available()):
        raise InputError(f"device {name!r}: no Apple MPS GPU here; {has}")
    return resolved
