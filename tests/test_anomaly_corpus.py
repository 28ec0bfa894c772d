"""The labelled corpus (tests/corpus.py), its NAB-style early-detection metric, and the
windowed-Gaussian baseline: the metric scores what NAB scores, the corpus is what it says,
and both detectors run over it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.detect.series import score_series
from tests.corpus import (A_FN, A_FP, A_TP, KINDS, ONSET_AT, SPECS, Series, corpus, evaluate, optimize_threshold,
                          probation_length, scaled_sigmoid, series_score, sweep, window_length, windowed_gaussian)
from tests.corpus import _erfc


@pytest.fixture(scope="module")
def series() -> list[Series]:
    return corpus()


def perfect_scores(cs: list[Series]) -> list[np.ndarray]:
    out = []
    for s in cs:
        sc = np.zeros(len(s.ts))
        for left, _ in s.window_bounds():
            sc[left] = 1.0
        out.append(sc)
    return out


def toy(n: int = 1000, windows: tuple[tuple[int, int], ...] = ((400, 499), (700, 799))) -> Series:
    ts = np.arange(n, dtype=np.float64) * 60.0
    return Series("toy", "toy", 60.0, ts, np.zeros(n), [(ts[a], ts[b]) for a, b in windows],
                  [a + 10 for a, _ in windows], ["spike"] * len(windows))


# ---- (a) the metric -----------------------------------------------------------------------

def test_sigmoid_matches_nab_landmarks():
    assert scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)  # the window's first point
    assert scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert scaled_sigmoid(0.0) == 0.0
    assert scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert scaled_sigmoid(3.0) == -1.0 and scaled_sigmoid(50.0) == -1.0


@settings(max_examples=200, deadline=None)
@given(st.floats(-50, 50), st.floats(-50, 50))
def test_sigmoid_monotone_and_bounded(a, b):
    lo, hi = min(a, b), max(a, b)
    assert -1.0 <= scaled_sigmoid(hi) <= scaled_sigmoid(lo) <= 1.0
    if abs(a) > 1e-3:
        assert (scaled_sigmoid(a) > 0) == (a < 0)


def test_perfect_detector_scores_100_and_null_0(series):
    r = evaluate(series, perfect_scores(series))
    assert r.normalized == pytest.approx(100.0)
    assert r.fp == 0 and r.fn == 0 and r.tp == sum(len(s.windows) for s in series)
    null = evaluate(series, [np.zeros(len(s.ts)) for s in series])
    assert null.normalized == pytest.approx(0.0) and null.threshold == math.inf and null.raw == null.null
    assert null.null == A_FN * r.tp and r.perfect == A_TP * r.tp
    for f in r.families.values():
        assert f["normalized"] == pytest.approx(100.0)


def test_weights_follow_nab():
    s = toy()
    sw = sweep(s)
    assert sw.n_windows == 2 and (sw.window[: s.probation] == -2).all()
    assert sw.weight[400] == pytest.approx(A_TP)  # first point of a window: exactly A_TP
    assert sw.weight[410] == pytest.approx(scaled_sigmoid(-0.9) / scaled_sigmoid(-1.0))  # the onset
    assert 0.0 < sw.weight[499] < 0.05  # last point: ~0
    assert np.all(np.diff(sw.weight[400:500]) < 0)  # earlier is better
    assert sw.weight[300] == pytest.approx(A_FP)  # no window before: a full FP
    assert A_FP < sw.weight[500] < 0 and sw.weight[500] > sw.weight[550] > sw.weight[650]  # FPs after a window
    assert sw.weight[600] == pytest.approx(-A_FP * scaled_sigmoid(101 / 99))


def test_late_detection_beats_a_miss_and_a_false_positive_costs():
    s = toy()
    sw = sweep(s)
    base = np.zeros(1000)
    base[400] = base[700] = 1.0
    perfect = series_score(base, sw, 0.5)["raw"]
    late = base.copy()
    late[400], late[499] = 0.0, 1.0
    missed = base.copy()
    missed[400] = 0.0
    assert perfect == pytest.approx(2 * A_TP)
    assert perfect > series_score(late, sw, 0.5)["raw"] > series_score(missed, sw, 0.5)["raw"]
    assert series_score(missed, sw, 0.5)["raw"] == pytest.approx(A_TP + A_FN)
    fp = base.copy()
    fp[300] = 1.0
    r = series_score(fp, sw, 0.5)
    assert r["fp"] == 1 and r["raw"] == pytest.approx(perfect + A_FP)
    inside = base.copy()
    inside[450] = 1.0  # a second detection in a window neither adds nor costs
    assert series_score(inside, sw, 0.5)["raw"] == pytest.approx(perfect)
    probation = base.copy()
    probation[10] = 1.0  # nor does one in the probationary part
    assert series_score(probation, sw, 0.5)["raw"] == pytest.approx(perfect)


def nab_reference(scores: list[np.ndarray], sws, threshold: float) -> float:
    """The scoring rules applied row by row, as NAB's sweeper walks a file."""
    total = 0.0
    for sc, sw in zip(scores, sws):
        best = {j: A_FN for j in range(sw.n_windows)}
        for i, (v, w, win) in enumerate(zip(sc, sw.weight, sw.window)):
            if win == -2 or not v >= threshold:
                continue
            if win == -1:
                total += w
            else:
                best[win] = max(best[win], w)
        total += sum(best.values())
    return total


def test_threshold_sweep_matches_the_row_by_row_rules():
    rng = np.random.default_rng(3)
    cs = [toy(), toy(800, ((200, 279), (500, 579), (650, 729)))]
    sws = [sweep(s) for s in cs]
    scores = [np.round(rng.random(len(s.ts)) ** 8, 3) for s in cs]
    for sc, sw in zip(scores, sws):  # something to find
        for j in range(sw.n_windows):
            rows = np.flatnonzero(sw.window == j)
            sc[rows[rng.integers(0, 40)]] = 0.9 + 0.1 * rng.random()
    best, thr, raw = optimize_threshold(sws, scores)
    for t, r in zip(thr[::7], raw[::7]):
        assert r == pytest.approx(nab_reference(scores, sws, t))
    distinct = np.unique(np.concatenate(scores))
    brute = max(nab_reference(scores, sws, t) for t in distinct)
    assert nab_reference(scores, sws, best) == pytest.approx(max(brute, A_FN * 5))
    assert len(thr) >= 200


# ---- (b) the corpus ----------------------------------------------------------------------

def test_corpus_is_deterministic(series):
    again = corpus()
    assert [s.name for s in again] == [s.name for s in series]
    for a, b in zip(series, again):
        assert np.array_equal(a.ts, b.ts) and np.array_equal(a.values, b.values, equal_nan=True)
        assert a.windows == b.windows and a.onsets == b.onsets and a.kinds == b.kinds
    other = corpus(seed=17)
    assert any(not np.array_equal(a.values, b.values, equal_nan=True) for a, b in zip(series, other))


def test_corpus_shape(series):
    assert 40 <= len(series) <= 60 and len({s.name for s in series}) == len(series)
    assert {s.interval for s in series} == {10.0, 60.0, 300.0, 1800.0}
    fams = {s.family for s in series}
    assert len(fams) >= 12
    for f in fams:  # each family has normal-only series and series with anomalies
        assert any(not s.windows for s in series if s.family == f), f
        assert any(s.windows for s in series if s.family == f), f
    assert {k for s in series for k in s.kinds} == set(KINDS)
    for s in series:
        assert 2000 <= len(s.ts) <= 10_000, s.name
        assert np.all(np.diff(s.ts) > 0) and s.values.dtype == np.float64
    sensor = next(s for s in series if s.name == "sensor_normal")
    assert np.isnan(sensor.values).any() and (np.diff(sensor.ts) > sensor.interval).any()  # NaNs, missing rows


def test_windows_after_probation_with_the_onset_at_their_start(series):
    for s in series:
        spec = next(p for p in SPECS if p.name == s.name)
        assert len(s.windows) == len(s.onsets) == len(s.kinds) == len(spec.kinds)
        bounds = s.window_bounds()
        assert s.probation == probation_length(len(s.ts))
        prev = -1
        for (left, right), o in zip(bounds, s.onsets):
            assert s.probation <= left < o <= right < len(s.ts), s.name
            assert left > prev, s.name  # disjoint, in order
            prev = right
            assert np.isfinite(s.values[o]), s.name
        for (a, b), o in zip(s.windows, s.onsets):  # on the regular grid: the onset 10% in
            L = window_length(spec.n, len(s.onsets))
            assert b - a == (L - 1) * s.interval
            assert s.ts[o] - a == round(ONSET_AT * L) * s.interval


# ---- (c) the detectors over the corpus ----------------------------------------------------

def test_erfc_ufunc():
    x = np.linspace(0.0, 12.0, 2001)
    assert np.array_equal(_erfc(x), np.array([math.erfc(v) for v in x]))


def windowed_gaussian_reference(values: np.ndarray, window: int, step: int) -> np.ndarray:
    """NAB's windowedGaussian, record by record."""
    data: list[float] = []
    buf: list[float] = []
    mean, std = 0.0, 1.0
    out = []
    for v in values:
        out.append(1.0 - 0.5 * math.erfc(abs(v - mean) / std / math.sqrt(2.0)) if data else 0.0)
        if len(data) < window:
            data.append(v)
        else:
            buf.append(v)
            if len(buf) < step:
                continue
            data = data[step:] + buf
            buf = []
        mean, std = float(np.mean(data)), float(np.std(data))
        std = std or 1e-6
    return np.array(out)


@pytest.mark.parametrize("window,step,n", [(50, 5, 400), (300, 10, 1000), (6400, 100, 6800)])
def test_windowed_gaussian_is_nabs(window, step, n):
    rng = np.random.default_rng(window)
    x = np.round(rng.normal(10.0, 2.0, n), 1)
    x[n // 3:n // 3 + 20] = 10.0  # flat stretch
    x[n // 2] += 30.0
    ts = np.arange(n) * 60.0
    got = windowed_gaussian(ts, x, window=window, step=step)
    assert got == pytest.approx(windowed_gaussian_reference(x, window, step), abs=1e-6)
    const = windowed_gaussian(ts[:100], np.full(100, 5.0), window=window, step=step)
    assert const[0] == 0.0 and np.all(const[1:] == 0.5)  # at the mean of a zero-sd window


@pytest.fixture(scope="module")
def detector_scores(series):
    return {"score_series": [score_series(s.ts, s.values) for s in series],
            "windowed_gaussian": [windowed_gaussian(s.ts, s.values) for s in series]}


@pytest.mark.parametrize("name", ["score_series", "windowed_gaussian"])
def test_detectors_score_every_point_in_range(series, detector_scores, name):
    for s, sc in zip(series, detector_scores[name]):
        assert sc.shape == s.ts.shape, s.name
        assert np.all(np.isfinite(sc)) and sc.min() >= 0.0 and sc.max() <= 1.0, s.name
        assert np.all(sc[np.isnan(s.values)] == 0.0), s.name
    r = evaluate(series, detector_scores[name])
    assert -1000.0 < r.normalized <= 100.0
    assert r.tp + r.fn == sum(len(s.windows) for s in series)


def test_scorer_against_baseline(series, detector_scores):
    scorer = evaluate(series, detector_scores["score_series"])
    baseline = evaluate(series, detector_scores["windowed_gaussian"])
    assert math.isfinite(scorer.normalized) and math.isfinite(baseline.normalized)
    # On this seed: 44.2 against 20.3 (seeds 1 and 2: 32.6 against 24.1, 48.9 against 25.1);
    # the scorer before issue 16 scored 1.6.
    assert scorer.normalized >= baseline.normalized + 10.0
