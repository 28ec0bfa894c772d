"""`fleetwatch replay`: one series in, one score per row out, online (no look-ahead).

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_replay.py."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.detect.series import score_series


def test_spikes_and_bursts_of_spikes_do_not_flag_the_normal_samples_around_them():
    """5% spikes of 10-50 sd and two 40-sample bursts. Before the robust baseline and the
    CUSUM clip, each spike charged the CUSUM (30% of normal samples scored > 0.5) and
    the EWMA learned each burst as the new level, flagging the return to normal."""
    rng = np.random.default_rng(0)
    n = 6000
    v = 50 + rng.normal(0, 1, n)
    burst = np.zeros(n, bool)
    burst[2000:2040] = burst[4000:4040] = True
    v[burst] += 30
    spike = (rng.random(n) < 0.05) & ~burst
    spike[:100] = False
    v[spike] += rng.choice([-1, 1], spike.sum()) * rng.uniform(10, 50, spike.sum())
    s = score_series(60.0 * np.arange(n), v)
    normal = ~spike & ~burst
    normal[:100] = False
    assert (s[normal] > 0.5).mean() < 0.002
    assert (s[np.r_[2040:2240, 4040:4240]][normal[np.r_[2040:2240, 4040:4240]]] < 0.5).all()
    assert (s[spike] > 0.5).mean() > 0.95
    assert (s[[2000, 4000]] > 0.9).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.just(1.0)), max_size=200))
def test_score_is_always_in_unit_interval_and_online(values):
    v = np.array(values, np.float64)
    ts = np.arange(v.size, dtype=np.float64)
    s = score_series(ts, v)
    assert s.shape == v.shape and ((s >= 0) & (s <= 1)).all()
    # No look-ahead: scoring a prefix gives the same scores for that prefix.
    k = v.size // 2
    np.testing.assert_array_equal(score_series(ts[:k], v[:k]), s[:k])
