"""toyvae.stats: argument checks of the median-of-means tools (their statistics are tested in
tests/test_estimators.py, where they check the estimators)."""

import pytest
import torch

from toyvae.stats import median_of_means


@pytest.mark.parametrize("false_alarm", [0.0, 1.0, -0.1, 1.5])
def test_false_alarm_outside_the_open_unit_interval_is_rejected(false_alarm):
    """A false-alarm probability of 0, 1 or outside [0, 1] raises ValueError naming it."""
    with pytest.raises(ValueError, match="false_alarm"):
        median_of_means(torch.zeros(100), 1.0, false_alarm=false_alarm)


def test_false_alarm_just_below_one_is_accepted():
    """1 − 1e-12 is a (useless but) valid probability."""
    estimate = median_of_means(torch.ones(100), 1.0, false_alarm=1 - 1e-12)
    assert estimate.value == 1.0
