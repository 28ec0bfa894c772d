"""Numba kernels: online detectors over many series at once.

Each kernel takes a batch as flat arrays (value, series slot, time in seconds) and
the detector state as flat arrays indexed by slot (struct of arrays), and walks the
batch once in order. Non-finite values are skipped: they never touch the state.
All kernels are `nopython`, `cache=True` (compiled once per machine) and `nogil`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_LN2 = math.log(2.0)
MAX_ALPHA = 0.3


_X_AT_MAX_ALPHA = -math.log(1.0 - MAX_ALPHA)  # 1 - exp(-x) reaches MAX_ALPHA here


@njit(cache=True, nogil=True)
def _one_minus_exp(x: float) -> float:
    """1 - exp(-x) for x >= 0. exp() was half the EWMA kernel's time: for the usual
    steps (a sample interval is far below the half-life, x < 0.1) the Taylor series to
    x^8 is exact to machine precision; longer gaps are rare and take exp()."""
    if x >= 0.1:
        return 1.0 - math.exp(-x)
    return x * (1.0 - x * (1.0 / 2 - x * (1.0 / 6 - x * (1.0 / 24 - x * (1.0 / 120 - x * (
        1.0 / 720 - x * (1.0 / 5040 - x / 40320.0)))))))


@njit(cache=True, nogil=True)
def _alpha(dt: float, halflife_s: float, count: float) -> float:
    """EW weight for a step of `dt` seconds (irregular sampling). At most MAX_ALPHA, so
    one sample after a long gap cannot wipe out the variance; never below 1/(n+1), so
    a young series starts from its plain mean instead of its first value."""
    x = _LN2 * max(dt, 0.0) / halflife_s
    a = MAX_ALPHA if x >= _X_AT_MAX_ALPHA else _one_minus_exp(x)
    return max(a, 1.0 / (count + 1.0))


@njit(cache=True, nogil=True)
def ewma_zscore(values, slots, ts, mean, var, count, last_ts, outliers,
                halflife_s, z_gate, warmup, relearn, min_sd_rel, min_sd_abs, z_out, base_out):
    """EWMA mean/variance z-score per series.

    z_out[i]   : (x - mean) / sd against the baseline *before* x, 0 during warm-up, NaN for bad x.
    base_out[i]: that baseline mean.
    A sample with |z| > z_gate is an outlier: it does not move the baseline (a fault
    must not become the new normal), unless `relearn` outliers in a row say the
    level really changed, in which case the series starts over.
    """
    for i in range(values.shape[0]):
        s = slots[i]
        x = values[i]
        t = ts[i]
        if not math.isfinite(x):
            z_out[i] = np.nan
            base_out[i] = np.nan
            continue
        if count[s] == 0:
            mean[s] = x
            var[s] = 0.0
            count[s] = 1
            last_ts[s] = t
            outliers[s] = 0
            z_out[i] = 0.0
            base_out[i] = x
            continue
        m = mean[s]
        sd = math.sqrt(var[s] + (min_sd_rel * abs(m)) ** 2 + min_sd_abs * min_sd_abs)
        z = (x - m) / sd if count[s] >= warmup else 0.0
        z_out[i] = z
        base_out[i] = m
        if abs(z) > z_gate:
            outliers[s] += 1
            if outliers[s] >= relearn:
                count[s] = 0
        else:
            outliers[s] = 0
            a = _alpha(t - last_ts[s], halflife_s, count[s])
            d = x - m
            mean[s] = m + a * d
            var[s] = (1.0 - a) * (var[s] + a * d * d)
            count[s] += 1
        last_ts[s] = t


@njit(cache=True, nogil=True)
def cusum(values, slots, mean, count, s_hi, s_lo, halflife_s, k, h, warmup, cap, score_out):
    """Two-sided CUSUM against a slow EW baseline, for drifts too slow for a z-score.

    S+ = max(0, S+ + (x - mean) - k), S- = max(0, S- - (x - mean) - k);
    score_out = S+ / h when S+ leads, else -S- / h: |score| >= 1 is an alarm, its
    sign the direction. The baseline learns only
    while both sums are zero, so a drift never teaches the baseline to follow it.
    Each sum is clamped at cap * h: once the drift is gone the alarm clears within
    about cap * h / k samples instead of remembering a finished fault for hours.
    """
    learn = 1.0 - math.exp(-_LN2 / halflife_s)  # one weight per call: samples are evenly weighted here
    for i in range(values.shape[0]):
        s = slots[i]
        x = values[i]
        if not math.isfinite(x):
            score_out[i] = np.nan
            continue
        if count[s] == 0:
            mean[s] = x
            count[s] = 1
            s_hi[s] = 0.0
            s_lo[s] = 0.0
            score_out[i] = 0.0
            continue
        d = x - mean[s]
        if count[s] >= warmup:
            s_hi[s] = min(max(0.0, s_hi[s] + d - k), cap * h)
            s_lo[s] = min(max(0.0, s_lo[s] - d - k), cap * h)
        if s_hi[s] == 0.0 and s_lo[s] == 0.0:
            a = max(learn, 1.0 / (count[s] + 1.0))
            mean[s] += a * d
            count[s] += 1
        score_out[i] = s_hi[s] / h if s_hi[s] >= s_lo[s] else -s_lo[s] / h


MAD_TO_SD = 1.4826  # MAD x this = the standard deviation, for Gaussian noise


@njit(cache=True, nogil=True)
def robust_zscore(values, slots, ts, med, mad, count, last_ts,
                  halflife_s, warmup, min_sd_rel, min_sd_abs, z_out):
    """Robust z-score per series: an exponentially-weighted streaming median and MAD.

    Stochastic approximation: each sample moves the median one step towards itself,
    median += a * 1.4826 * MAD * sign(x - median), and the MAD one step towards
    |x - median|, MAD *= 1 +- a, with the EWMA's weight `a` (half-life, gaps). A sample
    moves them one step whatever its size, where a variance takes it squared, so a
    heavy-tailed or spiky series does not inflate the scale and hide the next fault; the
    scale can still double or halve per half-life, and a level shift is followed in a
    few half-lives without an outlier gate.

    z_out[i]: (x - median) / (1.4826 * MAD) against the state *before* x, the scale
    floored like ewma_zscore's; 0 during warm-up, NaN for bad x. While the scale is
    below its floor (a new series, a constant stretch) the next deviation sets the
    MAD; a constant series scores 0.
    """
    for i in range(values.shape[0]):
        s = slots[i]
        x = values[i]
        t = ts[i]
        if not math.isfinite(x):
            z_out[i] = np.nan
            continue
        if count[s] == 0:
            med[s] = x
            mad[s] = 0.0
            count[s] = 1
            last_ts[s] = t
            z_out[i] = 0.0
            continue
        m = med[s]
        d = x - m
        floor2 = (min_sd_rel * m) ** 2 + min_sd_abs * min_sd_abs
        sd = MAD_TO_SD * mad[s]
        z_out[i] = d / math.sqrt(sd * sd + floor2) if count[s] >= warmup else 0.0
        r = mad[s] if sd * sd >= floor2 else abs(d)
        a = _alpha(t - last_ts[s], halflife_s, count[s])
        med[s] = m + a * MAD_TO_SD * r * np.sign(d)
        mad[s] = r + a * r * np.sign(abs(d) - r)
        count[s] += 1
        last_ts[s] = t


@njit(cache=True, nogil=True)
def counter_delta(values, slots, ts, last_value, last_ts, delta_out, rate_out):
    """Increase of a cumulative counter since its previous sample, and its rate per
    second. A counter that goes down was reset (GPU reset, driver reload): the
    increase is unknown, so 0 is reported and the new value becomes the reference."""
    for i in range(values.shape[0]):
        s = slots[i]
        x = values[i]
        if not math.isfinite(x):
            delta_out[i] = np.nan
            rate_out[i] = np.nan
            continue
        prev = last_value[s]
        dt = ts[i] - last_ts[s]
        if not math.isfinite(prev) or x < prev or dt <= 0.0:
            delta_out[i] = 0.0
            rate_out[i] = 0.0
        else:
            delta_out[i] = x - prev
            rate_out[i] = (x - prev) / dt
        last_value[s] = x
        last_ts[s] = ts[i]


@njit(cache=True, nogil=True)
def flatline(values, slots, last_value, run_length, runs_out):
    """How many consecutive samples of each series repeated the exact same value.
    Real sensors carry noise; a reading frozen to the last bit is a stuck sensor."""
    for i in range(values.shape[0]):
        s = slots[i]
        x = values[i]
        if not math.isfinite(x):
            runs_out[i] = run_length[s]
            continue
        if x == last_value[s]:
            run_length[s] += 1
        else:
            run_length[s] = 0
            last_value[s] = x
        runs_out[i] = run_length[s]


@njit(cache=True, nogil=True)
def group_median(values, groups, n_groups, include, out):
    """Median of the finite, included values of each group (a node's GPUs: the peer
    baseline) and how many there were; NaN for a group with none."""
    order = np.argsort(groups, kind="mergesort")
    counts = np.zeros(n_groups, np.int64)
    buf = np.empty(values.shape[0])
    i = 0
    n = values.shape[0]
    for g in range(n_groups):
        out[g] = np.nan
    while i < n:
        g = groups[order[i]]
        m = 0
        j = i
        while j < n and groups[order[j]] == g:
            v = values[order[j]]
            if include[order[j]] and math.isfinite(v):
                buf[m] = v
                m += 1
            j += 1
        if m > 0:
            part = np.sort(buf[:m])
            out[g] = part[m // 2] if m % 2 == 1 else 0.5 * (part[m // 2 - 1] + part[m // 2])
        counts[g] = m
        i = j
    return counts


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel before the first sample."""
    f = np.zeros(2)
    i = np.zeros(2, np.int64)
    ewma_zscore(f, i, f, f.copy(), f.copy(), i.copy(), f.copy(), i.copy(), 60.0, 6.0, 2, 10, 0.0, 1e-9,
                f.copy(), f.copy())
    cusum(f, i, f.copy(), i.copy(), f.copy(), f.copy(), 60.0, 1.0, 10.0, 2, 2.0, f.copy())
    robust_zscore(f, i, f, f.copy(), f.copy(), i.copy(), f.copy(), 60.0, 2, 0.0, 1e-9, f.copy())
    counter_delta(f, i, f, np.full(2, np.nan), f.copy(), f.copy(), f.copy())
    flatline(f, i, np.full(2, np.nan), i.copy(), i.copy())
    group_median(f, i, 1, np.ones(2, np.bool_), f.copy())
