"""`fleetwatch replay`: one series in, one score per row out, online (no look-ahead)."""

from __future__ import annotations

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.detect.series import score_series
from tests.conftest import fleetwatch


def write(tmp_path, ts, values, name="s.csv"):
    pl.DataFrame({"timestamp": ts, "value": values}).write_csv(tmp_path / name)
    return tmp_path / name


def test_spike_and_level_shift_score_high_normal_scores_low(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    v = 10 + rng.normal(0, 1, n) + 3 * np.sin(np.arange(n) * 2 * np.pi / 500)  # noise plus a slow season
    v[1000] += 15     # spike
    v[2000:] += 8     # level shift
    ts = 1.7e9 + 60.0 * np.arange(n)
    src = write(tmp_path, ts, v)
    r = fleetwatch("replay", str(src), "--out", str(tmp_path / "out.csv"))
    assert r.returncode == 0, r.stderr
    out = pl.read_csv(tmp_path / "out.csv")
    assert out.columns == ["timestamp", "value", "anomaly_score"] and out.height == n
    s = out["anomaly_score"].to_numpy()
    assert ((s >= 0) & (s <= 1)).all()
    assert s[1000] > 0.8
    assert s[2000:2010].max() > 0.7
    normal = np.r_[100:990, 1010:1990]
    assert np.quantile(s[normal], 0.99) < 0.5


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


def test_rows_keep_input_order_with_gaps_irregular_times_and_iso_timestamps(tmp_path):
    times = pl.datetime_range(pl.datetime(2026, 1, 1), pl.datetime(2026, 1, 2), "1m", eager=True, time_zone="UTC")
    keep = np.ones(times.len(), bool)
    keep[300:700] = False  # a gap
    ts = times.filter(pl.Series(keep)).dt.to_string("%Y-%m-%dT%H:%M:%SZ").to_list()
    rng = np.random.default_rng(1)
    v = rng.normal(5, 0.5, len(ts))
    shuffled = rng.permutation(len(ts))
    src = write(tmp_path, [ts[i] for i in shuffled], v[shuffled])
    assert fleetwatch("replay", str(src), "--out", str(tmp_path / "o.csv")).returncode == 0
    out = pl.read_csv(tmp_path / "o.csv")
    assert out["timestamp"].to_list() == [ts[i] for i in shuffled]
    assert np.quantile(out["anomaly_score"].to_numpy(), 0.99) < 0.5


def test_constant_series_and_missing_values(tmp_path):
    src = write(tmp_path, list(range(1000)), [4.0] * 500 + [None] + [4.0] * 499)
    assert fleetwatch("replay", str(src), "--out", str(tmp_path / "o.csv")).returncode == 0
    out = pl.read_csv(tmp_path / "o.csv")
    assert out.height == 1000 and (out["anomaly_score"] == 0).all()


def test_tens_of_thousands_of_rows(tmp_path):
    n = 50_000
    src = write(tmp_path, np.arange(n) * 10.0, np.random.default_rng(2).normal(0, 1, n))
    r = fleetwatch("replay", str(src), "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 0 and f"scored {n} rows" in r.stdout
    assert pl.read_csv(tmp_path / "o.csv").height == n


def test_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text("time,val\n1,2\n")
    r = fleetwatch("replay", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 2 and "missing column(s) ['timestamp', 'value']" in r.stderr
    r = fleetwatch("replay", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 2 and "no such file" in r.stderr


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
