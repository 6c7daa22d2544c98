"""Step ranges: official timestep thresholds and step indices, checked against the schedule."""
import pytest

from mag_explore.schedule import StepRange, resolve_step_range

DDIM_50 = list(range(981, 0, -20))  # diffusers' DDIM, 50 steps, steps_offset=1


def test_threshold_selects_like_the_official_code():
    chosen = resolve_step_range(while_t_above=700).validate(DDIM_50)
    assert [DDIM_50[i] for i in chosen] == [t for t in DDIM_50 if t > 700]
    assert len(chosen) == 15


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
