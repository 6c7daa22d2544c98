"""Step ranges: official timestep thresholds and step indices, checked against the schedule."""
import numpy as np
import pytest
from diffusers import DDIMScheduler

from mag_explore.schedule import StepRange, resolve_step_range

DDIM_50 = list(range(981, 0, -20))  # diffusers' DDIM, 50 steps, steps_offset=1


def official_timesteps(steps: int = 50) -> list[int]:
    """The official MAG sampler's timesteps, high to low: linspace(0, 1, steps) · 999 cast to int."""
    return [int(x) for x in np.linspace(0, 1, steps) * 999][::-1]


def test_threshold_selects_like_the_official_code():
    # Our schedule is diffusers' DDIM (built here by diffusers itself, SD's settings); the
    # official one is written out above. Both guide 15 steps while t > 700, at timesteps
    # at most 18 apart; the official walks 49 transitions 999 -> ... -> 20 -> 0, diffusers
    # 50 steps 981 -> ... -> 1 -> the clean latent.
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(50)
    ours = [int(t) for t in ddim.timesteps]
    assert ours == DDIM_50
    official = official_timesteps()
    assert official[:3] == [999, 978, 958] and official[-3:] == [40, 20, 0] and len(official) - 1 == 49
    chosen = resolve_step_range(while_t_above=700).validate(ours)
    official_guided = [t for t in official if t > 700]
    assert len(chosen) == len(official_guided) == 15
    assert chosen == list(range(15))
    assert max(abs(ours[i] - t) for i, t in zip(chosen, official_guided)) == 18
    # and the step after the last guided one is unguided in both
    assert ours[15] <= 700 and official[15] <= 700


def test_indices():
    assert resolve_step_range(step_range=(0, 10)).validate(DDIM_50) == list(range(10))
    assert resolve_step_range().validate(DDIM_50) == list(range(50))
    assert resolve_step_range(step_range=(45, None)).validate(DDIM_50) == list(range(45, 50))
    default = StepRange(while_t_above=700)
    assert resolve_step_range(default=default) is default
    assert StepRange(while_t_above=700).as_keywords() == {"while_t_above": 700}
    assert StepRange(start=0, stop=10).as_keywords() == {"step_range": (0, 10)}


@pytest.mark.parametrize("bad, message", [
    (dict(while_t_above=1000), "outside 0..999"),
    (dict(step_range=(0, 60)), "stop step 60"),
    (dict(step_range=(55, None)), "start step 55"),
    (dict(while_t_above=990), "selects no step"),
])
def test_ranges_outside_the_schedule_are_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        resolve_step_range(**bad).validate(DDIM_50)


@pytest.mark.parametrize("bad, fix", [
    (dict(step_range=10), r"while_t_above=10 .*step_range=\(0, 10\)"),
    (dict(while_t_above=(0, 10)), r"step_range=\(start, stop\)"),
    (dict(while_t_above="700"), "must be an int"),
    (dict(while_t_above=True), "must be an int"),
    (dict(step_range=(0.5, 3)), "not a \\(start, stop\\) pair"),
    (dict(while_t_above=700, step_range=(0, 10)), "not both"),
])
def test_ambiguous_ranges_are_type_errors_that_say_what_to_write(bad, fix):
    with pytest.raises(TypeError, match=fix):
        resolve_step_range(**bad)


def test_step_range_holds_one_form():
    with pytest.raises(ValueError, match="either"):
        StepRange(while_t_above=700, start=0)
