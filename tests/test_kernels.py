"""Property tests: each Numba kernel equals a plain-Python reference on random input,
including NaN, Inf, gaps, duplicate timestamps and counter resets."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.detect import kernels
from pipeline.detect.state import CounterDelta, Cusum, EwmaZ, Flatline, group_median

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
    assert np.isfinite(det.s.mean).all() and np.isfinite(det.s.var).all() and (det.s.var >= 0).all()


def ref_cusum(values, slots, halflife, k, h, warmup, cap=2.0):
    st_ = {}
    out = []
    for x, s in zip(values, slots):
        if not math.isfinite(x):
            out.append(math.nan)
            continue
        m = st_.get(s)
        if m is None:
            st_[s] = {"mean": x, "count": 1, "hi": 0.0, "lo": 0.0}
            out.append(0.0)
            continue
        d = x - m["mean"]
        if m["count"] >= warmup:
            m["hi"] = min(max(0.0, m["hi"] + d - k), cap * h)
            m["lo"] = min(max(0.0, m["lo"] - d - k), cap * h)
        if m["hi"] == 0 and m["lo"] == 0:
            a = max(1 - math.exp(-math.log(2) / halflife), 1 / (m["count"] + 1))
            m["mean"] += a * d
            m["count"] += 1
        out.append(m["hi"] / h if m["hi"] >= m["lo"] else -m["lo"] / h)
    return np.array(out)


@settings(max_examples=200, deadline=None)
@given(batches())
def test_cusum_matches_reference(b):
    values, slots, _ = b
    score = Cusum(50.0, 0.5, 10.0, 3).update(values, slots)
    np.testing.assert_allclose(score, ref_cusum(values, slots, 50.0, 0.5, 10.0, 3), rtol=1e-9, atol=1e-9)


def test_cusum_catches_a_slow_drift_that_a_zscore_misses():
    n = 4000
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.5, n) + np.where(np.arange(n) > 1000, (np.arange(n) - 1000) * 0.002, 0.0)
    slots = np.zeros(n, np.int64)
    score = Cusum(3600.0, 1.0, 100.0, 60).update(x, slots)
    first = int(np.argmax(score >= 1.0))
    assert 1000 < first < 2500
    assert (score[:1000] < 1.0).all()


def test_cusum_forgets_a_finished_drift():
    """Clamped at cap * h: after the level returns, the alarm clears within ~cap * h / k samples."""
    x = np.r_[np.zeros(200), np.full(3000, 5.0), np.zeros(400)]
    score = Cusum(3600.0, 1.0, 100.0, 60, cap=2.0).update(x, np.zeros(x.size, np.int64))
    assert score[3199] == 2.0           # saturated at the cap, not at 3000 x 4
    assert (score[3200 + 201:] < 1.0).all()


@settings(max_examples=200, deadline=None)
@given(batches())
def test_counter_delta_matches_reference_and_never_goes_negative(b):
    values, slots, ts = b
    values = np.where(np.isfinite(values), np.abs(values), values)
    delta, rate = CounterDelta().update(values, slots, ts)
    last, last_t = {}, {}
    for i, (x, s, t) in enumerate(zip(values, slots, ts)):
        if not math.isfinite(x):
            assert math.isnan(delta[i]) and math.isnan(rate[i])
            continue
        prev = last.get(s)
        dt = t - last_t.get(s, 0.0)
        expect = 0.0 if prev is None or x < prev or dt <= 0 else x - prev
        assert delta[i] == expect
        assert rate[i] == (0.0 if expect == 0.0 else expect / dt)
        last[s], last_t[s] = x, t
    assert (delta[np.isfinite(delta)] >= 0).all()


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
    for k in (kernels.ewma_zscore, kernels.cusum, kernels.counter_delta, kernels.flatline, kernels.group_median):
        assert k.targetoptions.get("nopython", True) and k.targetoptions["nogil"] and k._cache.__class__.__name__ != "NullCache"
