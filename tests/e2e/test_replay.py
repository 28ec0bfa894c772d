"""End-to-end: `fleetwatch replay` as a user runs it (moved from tests/test_replay.py)."""

from __future__ import annotations

import numpy as np
import polars as pl

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
