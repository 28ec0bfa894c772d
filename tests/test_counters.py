"""Energy counters (pipeline/counters.py): a power reading every 30 s stands for its scrape by the
counter's mean, where the counter can be trusted, and is the instant elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.counters import Counter, counter_step_j, interval_mean_w


def test_a_counter_read_30_s_apart_gives_the_mean_of_a_load_that_swings_between_its_readings():
    draw = np.where(np.arange(30) % 20 < 14, 700.0, 300.0)  # a training job, second by second
    energy = 5e7 + np.cumsum(draw)                            # its counter, 1 mJ resolution
    mean = interval_mean_w(energy[-1] - 5e7, 30.0, 1e-3, 700.0, draw[-1])
    assert mean == pytest.approx(draw.mean()) and draw[-1] != pytest.approx(draw.mean())


@pytest.mark.parametrize("energy_j, span_s, step_j, why", [
    (21000.0, 1.0, 1e-3, "read 1 s apart: the instant is as good"),
    (2 * 3.6e6, 30.0, 3.6e6, "a 1 kWh counter: 2 steps in 30 s"),
    (-5e4, 30.0, 1e-3, "went back: reset"),
    (0.0, 30.0, 1e-3, "stood still: a BMS resending a cached value"),
    (21000.0, 30.0, np.nan, "its resolution not known yet"),
])
def test_the_instant_stands_where_the_counter_cannot_be_trusted(energy_j, span_s, step_j, why):
    assert np.isnan(interval_mean_w(energy_j, span_s, step_j, 700.0, 700.0)), why


def test_a_counter_s_resolution_is_read_off_its_readings():
    assert counter_step_j(np.array([3.6e6 * 1234, 3600.0 * 17, 12.345, 0.0])).tolist()[:3] == [3.6e6, 3600.0, 1e-3]
    assert np.isnan(counter_step_j(np.array([0.0]))[0])


def test_a_power_reading_without_its_counter_stands_as_the_instant_and_the_next_spans_both():
    c, e0 = Counter(), 1234567.891  # (a counter to the mJ)
    c.count(e0, 0.0)
    assert c.mean_w(600.0, 0.0) == 600.0  # (the first: nothing to span)
    c.count(e0 + 30 * 500.0, 30.0)
    assert c.mean_w(650.0, 30.0) == pytest.approx(500.0)
    assert c.mean_w(640.0, 60.0) == 640.0  # its counter did not come with it
    c.count(e0 + 30 * 500.0 + 60 * 400.0, 90.0)
    assert c.mean_w(380.0, 90.0) == pytest.approx(400.0)  # from the last one taken, at 30 s
