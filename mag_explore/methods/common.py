"""Small pieces shared by the methods: layouts tied to the prompt, the non-finite check."""
from __future__ import annotations

import torch


def layout_for_run(layout, sampler):
    """The layout resolved against the sampler's prompt and sized like its image."""
    layout = layout.for_generation(sampler.height, sampler.width)  # warns if it had to resize
    return layout.resolve(sampler.pipe.tokenizer, sampler.prompt)


class NonFiniteGuidanceError(FloatingPointError):
    """The guidance loss or its gradient became inf/NaN."""


def check_finite(method: str, state, loss: torch.Tensor, grad: torch.Tensor, setting: str) -> None:
    """Stop with a clear message instead of letting NaN spread into the image.

    ``setting`` names the knob to turn down, e.g. ``"alpha=0.08"``.
    """
    if not torch.isfinite(loss) or not torch.isfinite(grad).all():
        what = "loss" if not torch.isfinite(loss) else "gradient"
        raise NonFiniteGuidanceError(
            f"{method} at step {state.step_index} (t={int(state.timestep)}): the guidance {what} is not "
            f"finite (loss={float(loss):.4g}, {setting}). Try a smaller {setting.split('=')[0]}, or fp32."
        )
