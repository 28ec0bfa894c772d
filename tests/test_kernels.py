"""Property tests: each Numba kernel equals a plain-Python reference on random input,
including NaN, Inf, gaps, duplicate timestamps and counter resets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.detect import kernels
from pipeline.detect.state import CounterDelta, Cusum, EwmaZ, Flatline, RobustZ, group_median

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
value = st.one_of(finite, finite, finite, st.just(float("nan")), st.just(float("inf")))


@st.composite
def batches(draw, max_slots=4, max_n=60):
    n = draw(st.integers(0, max_n))
    slots = np.array(draw(st.lists(st.integers(0, max_slots - 1), min_size=n, max_size=n)), np.int64)
    values = np.array(draw(st.lists(value, min_size=n, max_size=n)), np.float64)
    steps = np.array(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 1.0, 7.0, 600.0]), min_size=n, max_size=n)))
    return values, slots, np.cumsum(steps)


def ref_ewma(values, slots, ts, halflife, gate, warmup, relearn, sd_rel, sd_abs):
    st_ = {}
    z_out, base_out = [], []
    for x, s, t in zip(values, slots, ts):
        if not math.isfinite(x):
            z_out.append(math.nan), base_out.append(math.nan)
            continue
        m = st_.get(s)
        if m is None or m["count"] == 0:
            st_[s] = {"mean": x, "var": 0.0, "count": 1, "last": t, "out": 0}
            z_out.append(0.0), base_out.append(x)
            continue
        sd = math.sqrt(m["var"] + (sd_rel * abs(m["mean"])) ** 2 + sd_abs ** 2)
        z = (x - m["mean"]) / sd if m["count"] >= warmup else 0.0
        z_out.append(z), base_out.append(m["mean"])
        if abs(z) > gate:
            m["out"] += 1
            if m["out"] >= relearn:
                m["count"] = 0
        else:
            m["out"] = 0
            a = max(min(1 - math.exp(-math.log(2) * max(t - m["last"], 0) / halflife), kernels.MAX_ALPHA),
                    1 / (m["count"] + 1))
            d = x - m["mean"]
            m["mean"] += a * d
            m["var"] = (1 - a) * (m["var"] + a * d * d)
            m["count"] += 1
        m["last"] = t
    return np.array(z_out), np.array(base_out)


@settings(max_examples=200, deadline=None)
@given(batches())
def test_ewma_zscore_matches_reference(b):
    values, slots, ts = b
    det = EwmaZ(30.0, 4.0, 3, 5, 1e-3, 1e-6)
    z, base = det.update(values, slots, ts)
    rz, rbase = ref_ewma(values, slots, ts, 30.0, 4.0, 3, 5, 1e-3, 1e-6)
    np.testing.assert_allclose(z, rz, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(base, rbase, rtol=1e-9, atol=1e-9)
    assert np.isfinite(det.arrays.mean).all() and np.isfinite(det.arrays.var).all() and (det.arrays.var >= 0).all()


def ref_robust(values, slots, ts, halflife, warmup, sd_rel, sd_abs):
    def sign(v):
        return (v > 0) - (v < 0)

    st_ = {}
    z_out = []
    for x, s, t in zip(values.tolist(), slots.tolist(), ts.tolist()):
        if not math.isfinite(x):
            z_out.append(math.nan)
            continue
        m = st_.get(s)
        if m is None:
            st_[s] = {"med": x, "mad": 0.0, "count": 1, "last": t}
            z_out.append(0.0)
            continue
        d = x - m["med"]
        scale, floor = 1.4826 * m["mad"], math.sqrt((sd_rel * m["med"]) ** 2 + sd_abs ** 2)
        z_out.append(d / math.hypot(scale, floor) if m["count"] >= warmup else 0.0)
        r = m["mad"] if scale >= floor else abs(d)
        a = max(min(1 - math.exp(-math.log(2) * max(t - m["last"], 0) / halflife), kernels.MAX_ALPHA),
                1 / (m["count"] + 1))
        m["med"] += a * 1.4826 * r * sign(d)
        m["mad"] = r + a * r * sign(abs(d) - r)
        m["count"] += 1
        m["last"] = t
    return np.array(z_out)


@settings(max_examples=300, deadline=None)
@given(batches(max_slots=12, max_n=150), st.floats(0, 1))
def test_robust_zscore_matches_reference(b, split):
    values, slots, ts = b
    det = RobustZ(30.0, 3, 1e-3, 1e-6)
    k = int(split * values.size)  # two batches: the state carries over
    z = np.r_[det.update(values[:k], slots[:k], ts[:k]).copy(), det.update(values[k:], slots[k:], ts[k:])]
    np.testing.assert_allclose(z, ref_robust(values, slots, ts, 30.0, 3, 1e-3, 1e-6), rtol=1e-9, atol=1e-9)
    assert np.isfinite(det.arrays.med).all() and (det.arrays.mad >= 0).all()


def interleaved(x):
    """A (samples, series) array as one batch, series interleaved, one sample per series per second."""
    n, m = x.shape
    return x.ravel(), np.tile(np.arange(m, dtype=np.int64), n), np.repeat(np.arange(n, dtype=np.float64), m)


def test_robust_scale_ignores_spikes_that_inflate_the_variance():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (600, 200))  # 200 series, sd 1
    spikes = rng.random(x.shape) < 0.05
    x[spikes] += rng.choice([-1, 1], spikes.sum()) * rng.uniform(10, 50, spikes.sum())
    robust, plain = RobustZ(20.0, 20), EwmaZ(20.0, np.inf, 20, 10**9)  # plain: EW variance, no outlier gate
    robust.update(*interleaved(x))
    plain.update(*interleaved(x))
    scale, sd = 1.4826 * robust.arrays.mad[:200], np.sqrt(plain.arrays.var[:200])
    assert abs(np.median(scale) - 1.0) < 0.1
    assert np.mean((scale > 0.7) & (scale < 1.4)) > 0.9
    assert np.median(sd) > 3.0


def test_robust_zscore_of_a_constant_series_is_zero():
    x = np.tile([[0.0, 4.0, -1e6, 1e-300]], (300, 1))
    x[150] = np.nan
    z = RobustZ(20.0, 20).update(*interleaved(x)).reshape(x.shape)
    assert (z[150] != z[150]).all()
    assert (np.delete(z, 150, axis=0) == 0.0).all()


def test_robust_zscore_flags_a_level_shift_then_follows_it():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (600, 200))
    x[300:] += 8.0
    z = np.abs(RobustZ(20.0, 20).update(*interleaved(x)).reshape(x.shape))
    assert (z[20:300] > 5).mean() < 0.002
    assert (z[300] > 3).all() and np.median(z[300]) > 6
    assert np.median(z[400:]) < 1.0  # the new level is the new normal within ~100 samples


def ref_cusum(values, slots, halflife, k, h, warmup, cap=2.0, covariate=None, prior_var=1.0, slope_sd=0.0,
              seconds=None):
    """(scores, baselines): the CUSUM one sample at a time, its baseline an EW ridge regression
    on the covariate, each sample weighted by the seconds it stands for."""
    st_ = {}
    out, bases = [], []
    if covariate is None:
        covariate = np.full(len(values), math.nan)
    if seconds is None:
        seconds = np.ones(len(values))
    for x, s, c, w in zip(values, slots, covariate, seconds):
        if not math.isfinite(x):
            out.append(math.nan)
            bases.append(math.nan)
            continue
        m = st_.setdefault(s, {"count": 0, "cm": math.nan})
        if not math.isfinite(m["cm"]):
            m.update(cm=c, cv=0.0, cov=0.0)
        if not math.isfinite(c):
            c = m["cm"] if math.isfinite(m["cm"]) else 0.0
        if m["count"] == 0:
            m.update(mean=x, count=1, hi=0.0, lo=0.0)
            out.append(0.0)
            bases.append(x)
            continue
        dc = c - m["cm"] if math.isfinite(m["cm"]) else 0.0
        dx = x - m["mean"]
        explained = m["cov"] / (m["cv"] + prior_var) * dc
        bases.append(m["mean"] + explained)
        d = dx - explained
        slack = k + slope_sd * abs(dc) * math.sqrt(prior_var / (m["cv"] + prior_var))
        if m["count"] >= warmup:
            m["hi"] = min(max(0.0, m["hi"] + w * (d - slack)), cap * h)
            m["lo"] = min(max(0.0, m["lo"] - w * (d + slack)), cap * h)
        if m["hi"] == 0 and m["lo"] == 0:
            a = max(min(1 - math.exp(-math.log(2) * w / halflife), kernels.MAX_ALPHA), 1 / (m["count"] + 1))
            m["mean"] += a * dx
            if math.isfinite(m["cm"]):
                m["cm"] += a * dc
                m["cv"] = (1 - a) * (m["cv"] + a * dc * dc)
                m["cov"] = (1 - a) * (m["cov"] + a * dx * dc)
            m["count"] += 1
        out.append(m["hi"] / h if m["hi"] >= m["lo"] else -m["lo"] / h)
    return np.array(out), np.array(bases)


@settings(max_examples=200, deadline=None)
@given(batches())
def test_cusum_matches_reference(b):
    values, slots, _ = b
    score, _ = Cusum(50.0, 0.5, 10.0, 3).update(values, slots)
    np.testing.assert_allclose(score, ref_cusum(values, slots, 50.0, 0.5, 10.0, 3)[0], rtol=1e-9, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(batches(), st.integers(0, 2**31))
def test_cusum_with_a_covariate_matches_reference(b, seed):
    values, slots, _ = b
    rng = np.random.default_rng(seed)
    covariate = np.where(rng.random(values.shape[0]) < 0.1, np.nan, rng.normal(300.0, 150.0, values.shape[0]))
    seconds = rng.choice([0.0, 1.0, 2.5, 30.0], values.shape[0])
    score, base = Cusum(50.0, 0.5, 10.0, 3, prior_var=100.0, slope_sd=0.01).update(values, slots, covariate, seconds)
    want, want_base = ref_cusum(values, slots, 50.0, 0.5, 10.0, 3, covariate=covariate, prior_var=100.0,
                                slope_sd=0.01, seconds=seconds)
    np.testing.assert_allclose(score, want, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(base, want_base, rtol=1e-7, atol=1e-7)


def test_cusum_catches_a_slow_drift_that_a_zscore_misses():
    n = 4000
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.5, n) + np.where(np.arange(n) > 1000, (np.arange(n) - 1000) * 0.002, 0.0)
    slots = np.zeros(n, np.int64)
    score, _ = Cusum(3600.0, 1.0, 100.0, 60).update(x, slots)
    first = int(np.argmax(score >= 1.0))
    assert 1000 < first < 2500
    assert (score[:1000] < 1.0).all()


def test_cusum_alarms_after_the_same_time_whatever_the_sampling_interval():
    """A drift read every second or every 30 s (a DCGM exporter's default) alarms about
    as soon: the sums are in C x seconds, the half-life in seconds."""
    def first_alarm(interval: float) -> float:
        t = np.arange(0.0, 4 * 3600.0, interval)
        rng = np.random.default_rng(1)
        x = rng.normal(0, 0.3, t.size) + np.where(t > 3600, (t - 3600) / 3600 * 3.0, 0.0)  # 3 C per hour
        score, _ = Cusum(6 * 3600.0, 1.0, 600.0, 60).update(x, np.zeros(t.size, np.int64), None,
                                                             np.full(t.size, interval))
        return float(t[np.argmax(score >= 1.0)])
    every_second, every_30s = first_alarm(1.0), first_alarm(30.0)
    assert 3600 < every_second < 3 * 3600
    assert abs(every_30s - every_second) < 0.1 * (every_second - 3600)


def test_cusum_baseline_follows_its_covariate_and_still_catches_a_drift():
    """A value that follows its covariate (a GPU's excess over its siblings with its own
    power, which follows the day) is no drift once the slope is learnt; without the
    covariate the same series alarms every afternoon. A drift on top is still caught."""
    n = 3 * 86400 // 10                        # three days of 10-s samples
    t = np.arange(n) * 10.0
    rng = np.random.default_rng(3)
    power = 400.0 - 220.0 * np.cos(2 * np.pi * (t / 86400.0)) + rng.normal(0, 30.0, n)
    x = 0.008 * power + rng.normal(0, 0.4, n)  # 3.5 C more at the peak than at the trough
    slots = np.zeros(n, np.int64)
    args, tens = (6 * 3600.0, 1.0, 600.0, 60), np.full(n, 10.0)   # the detector's settings
    assert (np.abs(Cusum(*args, prior_var=2500.0).update(x, slots, power, tens)[0][n // 3:]) < 1.0).all()
    assert (np.abs(Cusum(*args).update(x, slots, None, tens)[0][n // 3:]) >= 1.0).any()
    drift = np.where(t > 2 * 86400, (t - 2 * 86400) / 3600.0 * 2.0, 0.0)  # 2 C per hour from day 3
    score, _ = Cusum(*args, prior_var=2500.0).update(x + drift, slots, power, tens)
    first = int(np.argmax(score >= 1.0))
    assert (score[:2 * 86400 // 10] < 1.0).all() and 0 < (first - 2 * 86400 // 10) * 10 < 2 * 3600


def test_cusum_forgets_a_finished_drift():
    """Clamped at cap * h: after the level returns, the alarm clears within ~cap * h / k samples."""
    x = np.r_[np.zeros(200), np.full(3000, 5.0), np.zeros(400)]
    score, _ = Cusum(3600.0, 1.0, 100.0, 60, cap=2.0).update(x, np.zeros(x.size, np.int64))
    assert score[3199] == 2.0           # saturated at the cap, not at 3000 x 4
    assert (score[3200 + 201:] < 1.0).all()


@settings(max_examples=200, deadline=None)
@given(batches())
def test_counter_delta_matches_reference_and_never_goes_negative(b):
    values, slots, ts = b
    values = np.where(np.isfinite(values), np.abs(values), values)
    delta, rate = CounterDelta().update(values, slots, ts)
    last, last_t, dropped_from, since_drop = {}, {}, {}, {}
    for i, (x, s, t) in enumerate(zip(values, slots, ts)):
        if not math.isfinite(x):
            assert math.isnan(delta[i]) and math.isnan(rate[i])
            continue
        prev = last.get(s)
        dt = t - last_t.get(s, 0.0)
        if prev is None or dt <= 0:
            expect = 0.0
        elif x < prev:  # a reset, or a bad reading if it comes back
            expect = 0.0
            dropped_from[s], since_drop[s] = max(dropped_from.get(s, prev), prev), 0
        elif s in dropped_from and x >= dropped_from[s]:
            expect = x - dropped_from.pop(s)
        else:
            expect = x - prev
        if s in dropped_from:
            since_drop[s] += 1
            if since_drop[s] > CounterDelta.GLITCH_SAMPLES:
                del dropped_from[s]
        assert delta[i] == expect
        assert rate[i] == (0.0 if expect == 0.0 else expect / dt)
        last[s], last_t[s] = x, t
    assert (delta[np.isfinite(delta)] >= 0).all()


@pytest.mark.parametrize("readings, increases", [
    ([1, 0, 1], [0, 0, 0]),          # one bad reading (an exporter's blank read as 0): no new error
    ([1, 0, 2], [0, 0, 1]),          # ... and what it rose past it is one
    ([1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]),  # a reset (it stayed down): the next error counts
    ([3, 0, 1], [0, 0, 1]),          # a reset and a new error under where it was
])
def test_a_counter_back_where_it_dropped_from_was_one_bad_reading(readings, increases):
    values = np.asarray(readings, np.float64)
    delta, _ = CounterDelta().update(values, np.zeros(values.size, np.int64), np.arange(1.0, values.size + 1))
    assert delta.tolist() == increases


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([1.0, 1.0, 2.0, float("nan")]), max_size=50))
def test_flatline_counts_exact_repeats(seq):
    values = np.array(seq, np.float64)
    runs = Flatline().update(values, np.zeros(len(seq), np.int64))
    run, last = 0, math.nan
    for i, x in enumerate(seq):
        if math.isfinite(x):
            run = run + 1 if x == last else 0
            last = x if x != last else last
        assert runs[i] == run


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), value, st.booleans()), max_size=40))
def test_group_median_matches_numpy(rows):
    groups = np.array([r[0] for r in rows], np.int64)
    vals = np.array([r[1] for r in rows], np.float64)
    inc = np.array([r[2] for r in rows], np.bool_)
    med, counts = group_median(vals, groups, 4, inc)
    for g in range(4):
        members = vals[(groups == g) & inc & np.isfinite(vals)]
        assert counts[g] == members.size
        if members.size:
            assert med[g] == np.median(members)
        else:
            assert math.isnan(med[g])


def test_kernels_are_compiled_nopython_and_cached():
    for k in (kernels.ewma_zscore, kernels.robust_zscore, kernels.cusum, kernels.counter_delta, kernels.flatline,
              kernels.group_median):
        assert k.targetoptions.get("nopython", True) and k.targetoptions["nogil"] and k._cache.__class__.__name__ != "NullCache"
