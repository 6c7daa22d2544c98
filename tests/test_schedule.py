"""Step ranges: official timestep thresholds and step indices, checked against the schedule."""
import pytest

from mag_explore.schedule import StepRange, as_step_range

DDIM_50 = list(range(981, 0, -20))  # diffusers' DDIM, 50 steps, steps_offset=1


def test_threshold_selects_like_the_official_code():
    chosen = as_step_range(700).validate(DDIM_50)
    assert [DDIM_50[i] for i in chosen] == [t for t in DDIM_50 if t > 700]
    assert len(chosen) == 15


def test_indices():
    assert as_step_range((0, 10)).validate(DDIM_50) == list(range(10))
    assert as_step_range(None).validate(DDIM_50) == list(range(50))


@pytest.mark.parametrize("bad, message", [
    (1000, "outside 0..999"),
    ((0, 60), "stop step 60"),
    ((55, None), "start step 55"),
    (990, "selects no step"),
])
def test_ranges_outside_the_schedule_are_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        as_step_range(bad).validate(DDIM_50)


def test_ambiguous_ranges_are_rejected():
    with pytest.raises(ValueError, match="either"):
        StepRange(above_timestep=700, start=0)
    with pytest.raises(TypeError):
        as_step_range("700")
