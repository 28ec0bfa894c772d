"""`fleetwatch replay`: one series in, one score per row out, online (no look-ahead).

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_replay.py."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.detect.kernels import CAL_P_FLOOR
from pipeline.detect.series import RELEARN, score_series


def rarer_than(p: float) -> float:
    """The score of a sample whose tail probability is p: scores are log(p) / log(CAL_P_FLOOR)."""
    return float(np.log(p) / np.log(CAL_P_FLOOR))


ONE_IN_A_THOUSAND = rarer_than(1e-3)
ONE_IN_A_MILLION = rarer_than(1e-6)


def _spiky(rate: float, seed: int = 0):
    """White noise (sd 1) where a share `rate` of samples spike by 10-50 sd, and two
    40-sample bursts of +30 (at 2000 and 4000)."""
    rng = np.random.default_rng(seed)
    n = 6000
    v = 50 + rng.normal(0, 1, n)
    burst = np.zeros(n, bool)
    burst[2000:2040] = burst[4000:4040] = True
    v[burst] += 30
    spike = (rng.random(n) < rate) & ~burst
    spike[:100] = False
    v[spike] += rng.choice([-1, 1], spike.sum()) * rng.uniform(10, 50, spike.sum())
    normal = ~spike & ~burst
    normal[:100] = False
    return score_series(60.0 * np.arange(n), v), spike, burst, normal


def test_a_series_that_spikes_all_the_time_is_not_paged_for_each_spike_but_for_a_burst():
    """Scores are calibrated against the series' own history: where 5% of samples spike
    by 10-50 sd, a spike is this series' normal (about one in twenty, not one in a
    million), while a burst that holds is rare here and scores high within a few samples.
    The burst is then a new regime, and its end another change: after RELEARN samples of
    it, nothing scores."""
    s, spike, burst, normal = _spiky(0.05)
    assert (s[normal] > ONE_IN_A_THOUSAND).mean() < 0.004  # calibrated (two statistics, each one in a thousand)
    assert np.median(s[spike]) < ONE_IN_A_THOUSAND
    assert s[2000:2005].max() > ONE_IN_A_MILLION and s[4000:4005].max() > ONE_IN_A_MILLION
    after = np.r_[2040 + RELEARN:2240, 4040 + RELEARN:4240]
    assert (s[after][normal[after]] < ONE_IN_A_THOUSAND).all()


def test_rare_spikes_on_clean_noise_score_high_and_nothing_else_does():
    s, spike, burst, normal = _spiky(0.001)
    assert spike.sum() >= 5
    assert (s[spike] > ONE_IN_A_MILLION).all()
    assert (s[2000:2003] > ONE_IN_A_MILLION).all() and (s[4000:4003] > ONE_IN_A_MILLION).all()
    assert (s[normal] > ONE_IN_A_THOUSAND).mean() < 0.004  # calibrated (two statistics, each one in a thousand)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.just(1.0)), max_size=200))
@example([1.0, 0, 0, 0, 0, 0, 0, 1.4343515973679452e308, 1, 1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1.0])  # (overflowed)
def test_score_is_always_in_unit_interval_and_online(values):
    v = np.array(values, np.float64)
    ts = np.arange(v.size, dtype=np.float64)
    s = score_series(ts, v)
    assert s.shape == v.shape and ((s >= 0) & (s <= 1)).all()
    # No look-ahead: scoring a prefix gives the same scores for that prefix.
    k = v.size // 2
    np.testing.assert_array_equal(score_series(ts[:k], v[:k]), s[:k])


DAY = 288  # 5-minute samples


def _days(n_days: int):
    return 300.0 * np.arange(DAY * n_days), np.arange(DAY * n_days)


def test_a_daily_season_scores_low_and_a_spike_on_it_scores_top():
    """The issue's series: a daily sine of amplitude 10, noise sd 1, 5-minute samples, a
    3-sample spike of +40. The old scorer put the normal part's 99th percentile at 0.65
    (the season itself looked anomalous)."""
    ts, i = _days(14)
    v = 10 * np.sin(2 * np.pi * i / DAY) + np.random.default_rng(2).normal(0, 1, i.size)
    v[3000:3003] += 40
    s = score_series(ts, v)
    normal = np.ones(i.size, bool)
    normal[3000:3003] = False
    normal[:3 * DAY] = False  # the season is found once three days fit in the window
    assert int(np.argmax(s)) in (3000, 3001, 3002)
    assert (s[3000:3003] > ONE_IN_A_MILLION).all()
    assert np.quantile(s[normal], 0.99) < ONE_IN_A_THOUSAND
    assert s[normal].max() < ONE_IN_A_MILLION
    # The bar: under 0.2 at the 99th percentile of the whole normal part, warm-up included.
    everything = np.ones(i.size, bool)
    everything[3000:3003] = False
    assert np.quantile(s[everything], 0.99) < 0.2


@given(st.sampled_from([48, 96, 288]), st.floats(1.0, 100.0), st.sampled_from(["sine", "square", "sawtooth"]))
@settings(max_examples=12, deadline=None)
def test_a_noiseless_periodic_series_scores_low_at_every_turn(period, amplitude, shape):
    n = 12 * period if period > 48 else 40 * period
    phase = (np.arange(n) % period) / period
    v = amplitude * {"sine": np.sin(2 * np.pi * phase), "square": (phase < 0.5).astype(float),
                     "sawtooth": phase}[shape]
    s = score_series(60.0 * np.arange(n), v)
    assert s[4 * period:].max() < ONE_IN_A_THOUSAND


def test_a_level_shift_scores_high_where_it_begins_then_is_the_new_normal():
    rng = np.random.default_rng(3)
    v = 50 + rng.normal(0, 1, 4000)
    v[2500:] += 8
    s = score_series(60.0 * np.arange(v.size), v)
    assert s[2500] > ONE_IN_A_MILLION
    assert (s[2500 + RELEARN:] < ONE_IN_A_THOUSAND).all()


def test_quantized_and_stepping_constant_series():
    """Integer readings that flicker by one are their own normal; a constant that steps
    scores once at the step."""
    rng = np.random.default_rng(4)
    temps = np.round(45 + rng.normal(0, 0.4, 5000))          # an integer sensor
    s = score_series(10.0 * np.arange(temps.size), temps)
    assert np.quantile(s[100:], 0.999) < ONE_IN_A_THOUSAND
    const = np.full(5000, 7.0)
    const[3000:] = 8.0
    s = score_series(10.0 * np.arange(const.size), const)
    assert s[3000] == 1.0
    assert (s[3000 + RELEARN:] == 0).all() and (s[:3000] == 0).all()
