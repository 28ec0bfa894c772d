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
def cusum(values, covariate, weight, slots, mean, count, s_hi, s_lo, c_mean, c_var, cov,
          halflife_s, k, h, warmup, cap, prior_var, slope_sd, score_out, base_out):
    """Two-sided CUSUM against a slow EW baseline, for drifts too slow for a z-score.

    S+ = max(0, S+ + w (d - k)), S- = max(0, S- - w (d + k)), d = x - baseline, w the
    seconds the sample stands for (its interval): the sums are in units x seconds and
    the baseline's half-life in seconds, so a series scraped every 30 s (a DCGM
    exporter) alarms after the same time as one read every second, not 30 times later.
    score_out = S+ / h when S+ leads, else -S- / h: |score| >= 1 is an alarm, its
    sign the direction; base_out the baseline the sample was judged against (NaN for a
    missing sample). The baseline is what x owes to a covariate it moves with
    (the fleet's seasonality: a GPU's excess over its siblings follows its own load,
    which follows the day), an EW ridge regression: mean + beta (c - c_mean),
    beta = cov / (c_var + prior_var), so a covariate that hardly moved explains nothing.
    A missing covariate explains nothing either. Away from the covariate values it has
    learnt on, the baseline is uncertain by up to slope_sd per unit (the spread of slopes
    a series may have), less as the series shows its own: the slack widens by
    slope_sd |c - c_mean| sqrt(prior_var / (c_var + prior_var)), so a GPU that sat at one
    load for hours and moves to another is not a drift before its slope is known. The
    baseline learns only while both sums are zero, so a drift never teaches the baseline
    to follow it (as the replay scorer learns nothing from outliers). Each sum is clamped
    at cap * h: once the drift is gone the alarm clears within about cap * h / k seconds
    instead of remembering a finished fault for hours.
    """
    for i in range(values.shape[0]):
        s = slots[i]
        x = values[i]
        if not math.isfinite(x):
            score_out[i] = np.nan
            base_out[i] = np.nan
            continue
        c = covariate[i]
        if not math.isfinite(c_mean[s]):
            if math.isfinite(c):
                c_mean[s] = c
            c_var[s] = 0.0
            cov[s] = 0.0
        if not math.isfinite(c):
            c = c_mean[s] if math.isfinite(c_mean[s]) else 0.0
        if count[s] == 0:
            mean[s] = x
            count[s] = 1
            s_hi[s] = 0.0
            s_lo[s] = 0.0
            score_out[i] = 0.0
            base_out[i] = x
            continue
        dc = c - c_mean[s] if math.isfinite(c_mean[s]) else 0.0
        dx = x - mean[s]
        explained = cov[s] / (c_var[s] + prior_var) * dc
        base_out[i] = mean[s] + explained
        d = dx - explained
        slack = k + slope_sd * abs(dc) * math.sqrt(prior_var / (c_var[s] + prior_var))
        w = weight[i]
        if count[s] >= warmup:
            s_hi[s] = min(max(0.0, s_hi[s] + w * (d - slack)), cap * h)
            s_lo[s] = min(max(0.0, s_lo[s] - w * (d + slack)), cap * h)
        if s_hi[s] == 0.0 and s_lo[s] == 0.0:
            a = _alpha(w, halflife_s, count[s])
            mean[s] += a * dx
            if math.isfinite(c_mean[s]):
                c_mean[s] += a * dc
                c_var[s] = (1.0 - a) * (c_var[s] + a * dc * dc)
                cov[s] = (1.0 - a) * (cov[s] + a * dx * dc)
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
def counter_delta(values, slots, ts, last_value, last_ts, dropped_from, since_drop, glitch_samples, delta_out,
                  rate_out):
    """Increase of a cumulative counter since its previous sample, and its rate per
    second. A counter that goes down was reset (GPU reset, driver reload): the
    increase is unknown, so 0 is reported and the new value becomes the reference.
    Unless it is back at (or over) where it dropped from within `glitch_samples`: the
    drop was one bad reading (an exporter's blank read as 0), and only what it rose past
    that is an increase (1 -> 0 -> 1 is no new error)."""
    for i in range(values.shape[0]):
        s = slots[i]
        x = values[i]
        if not math.isfinite(x):
            delta_out[i] = np.nan
            rate_out[i] = np.nan
            continue
        prev = last_value[s]
        dt = ts[i] - last_ts[s]
        delta_out[i] = 0.0
        rate_out[i] = 0.0
        if not math.isfinite(prev) or dt <= 0.0:
            pass
        elif x < prev:
            if not math.isfinite(dropped_from[s]) or prev > dropped_from[s]:
                dropped_from[s] = prev
            since_drop[s] = 0
        elif math.isfinite(dropped_from[s]) and x >= dropped_from[s]:
            delta_out[i] = x - dropped_from[s]
            rate_out[i] = delta_out[i] / dt
            dropped_from[s] = np.nan
        else:
            delta_out[i] = x - prev
            rate_out[i] = (x - prev) / dt
        if math.isfinite(dropped_from[s]):
            since_drop[s] += 1
            if since_drop[s] > glitch_samples:  # it stayed down: a reset
                dropped_from[s] = np.nan
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


# ---- calibration: how rare a statistic is against its series' own history ----------
#
# A raw deviation means different things on different series: on a spiky latency series
# a 6 sd step happens every hour, on a clean temperature never. Like Numenta's anomaly
# likelihood, a calibrated score is the tail probability of a statistic against the
# series' own past, so one threshold means the same on every series.
#
# Each series keeps a histogram of the statistic's past values (CAL_BINS log-spaced
# bins, forgotten at a half-life of CAL_HISTORY samples: O(1) memory). A new value's tail
# probability is the share of that history at or above it, where at least CAL_TAIL_MIN
# samples lie above it. Further out the history is too thin to count, and its tail is
# extended as a Gaussian's whose scale makes it fall as the history does over the octave
# below where it is still counted: white noise keeps its Gaussian tail (an exponential or
# power-law extension would put a 6 sd step on it at one in ten thousand), a heavy-tailed
# series gets a wider one, as it breaks its record now and then. A prior of
# CAL_PRIOR_N samples of |N(0, 1)| makes a young series behave as a plain z-score.
# Scores are p on a log scale, log(p) / log(CAL_P_FLOOR) in [0, 1]: 0.5 is one in a
# thousand of the series' own past, 1 is one in a million or rarer.
#
# Each sample weighs 2^(1/CAL_HISTORY) times the one before (the history forgets without
# touching every bin); the weights are rescaled past _CAL_RENORM. A history is CAL_BINS
# bins then their total; its newest sample's weight is kept apart, one per series.

CAL_BINS = 56
CAL_BIN0 = 0.25           # upper edge of the first bin; each next edge is 2^(1/4) higher (up to ~4,000)
CAL_PER_OCTAVE = 4
CAL_HISTORY = 5000.0      # half-life of the history, in samples
CAL_PRIOR_N = 20.0
CAL_TAIL_MIN = 10.0       # samples of history above a value for its share to count as measured
CAL_P_FLOOR = 1e-12
CAL_MIN_STAT = 1.5
_CAL_LOG_FLOOR = math.log(CAL_P_FLOOR)
_CAL_RENORM = 1e200


@njit(cache=True, nogil=True)
def _cal_bin(stat: float) -> int:
    if stat < CAL_BIN0:
        return 0
    return min(int(CAL_PER_OCTAVE * math.log2(stat / CAL_BIN0)) + 1, CAL_BINS - 1)


@njit(cache=True, nogil=True)
def _cal_edge(b: int) -> float:
    """The lower edge of bin b."""
    return 0.0 if b <= 0 else CAL_BIN0 * 2.0 ** ((b - 1) / CAL_PER_OCTAVE)


@njit(cache=True, nogil=True)
def _gauss_scale(edge: float, ratio: float) -> float:
    """The sd k of a |N(0, k^2)| whose tail beyond `edge` is `ratio` of its tail beyond
    edge / 2 (that ratio rises with k): bisection on log k."""
    lo, hi = -4.0, 8.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        k = math.exp(mid)
        r = math.erfc(edge / (k * math.sqrt(2.0))) / max(math.erfc(edge / (2.0 * k * math.sqrt(2.0))), 1e-300)
        if r < ratio:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


@njit(cache=True, nogil=True)
def tail_probability(stat: float, hist, w: float) -> float:
    """P(statistic >= stat) by the history `hist` whose newest sample weighs `w`; 1 under
    CAL_MIN_STAT: a deviation under 1.5 sd is no evidence, however rare on a series that
    never moves (a constant's history is all zeros)."""
    if stat < CAL_MIN_STAT:
        return 1.0
    b = _cal_bin(stat)
    above = 0.0
    for k in range(b + 1, CAL_BINS):
        above += hist[k]
    if b == 0:
        frac = 1.0 - stat / CAL_BIN0
    elif b == CAL_BINS - 1:
        frac = 0.0
    else:  # the part of this bin above stat, evenly spread in log
        frac = math.log(_cal_edge(b + 1) / stat) / math.log(_cal_edge(b + 1) / _cal_edge(b))
    above += min(max(frac, 0.0), 1.0) * hist[b]
    if above < CAL_TAIL_MIN * w:  # too few to count: extend the tail from where there are enough
        j = b
        mass = 0.0
        for k in range(b, CAL_BINS):
            mass += hist[k]
        while j > CAL_PER_OCTAVE + 1 and mass < CAL_TAIL_MIN * w:
            j -= 1
            mass += hist[j]
        wider = mass
        for k in range(j - CAL_PER_OCTAVE, j):
            wider += hist[k]
        if mass >= CAL_TAIL_MIN * w and wider > mass and j > CAL_PER_OCTAVE:
            edge = _cal_edge(j)
            k = _gauss_scale(edge, mass / wider)
            above = mass * math.erfc(stat / (k * math.sqrt(2.0))) / math.erfc(edge / (k * math.sqrt(2.0)))
    gauss = math.erfc(stat / math.sqrt(2.0))  # P(|N(0, 1)| >= stat)
    return (above / w + CAL_PRIOR_N * gauss) / (hist[CAL_BINS] / w + CAL_PRIOR_N)


@njit(cache=True, nogil=True)
def remember(stat: float, hist, w: float) -> None:
    b = _cal_bin(stat)
    hist[b] += w
    hist[CAL_BINS] += w


@njit(cache=True, nogil=True)
def next_weight(w: float, hists) -> float:
    """The next sample's weight; rescales the histories (rows of `hists`) when it grows large."""
    w *= 2.0 ** (1.0 / CAL_HISTORY)
    if w > _CAL_RENORM:
        hists /= w
        w = 1.0
    return w


@njit(cache=True, nogil=True)
def calibrated(p: float) -> float:
    """A tail probability as a score in [0, 1]."""
    return min(1.0, max(0.0, math.log(max(p, 1e-300)) / _CAL_LOG_FLOOR))


# ---- one univariate series (detect/series.py) --------------------------------------

S_LEVEL, S_SCALE, S_SPREAD, S_QUANTUM, S_SLOW, S_LAST_X, S_LAST_T, S_RUN_SD, S_PERIOD = range(9)  # its float state
C_COUNT, C_OUTLIERS, C_BINS, C_POS = range(4)  # its int state; C_BINS: the profile's phases (0: no season)
_MAD_TO_SD = math.sqrt(math.pi / 2.0)  # mean absolute deviation x this = sd, for Gaussian noise
SERIES_MAX = 1e150  # a value beyond this is no measurement: its square (the scale's) would overflow to inf


@njit(cache=True, nogil=True)
def series_score(x_in, t_in, f, c, window, prof, recent, hists, weight, out,
                 halflife, scale_halflife, warmup, z_gate, relearn, profile_rate, slow_rate, floor_spread):
    """Score samples of one series in time order (detect/series.py says how). Its state:
    f (floats, by the S_* indices), c (ints, by the C_* ones), the window ring, the
    seasonal profile, the outlier run, and the calibration histories of |z| and of the
    slow mean (two rows) with their newest weight."""
    size = window.shape[0]
    for i in range(x_in.shape[0]):
        x = x_in[i]
        t = t_in[i]
        if not abs(x) <= SERIES_MAX:  # (NaN too)
            out[i] = 0.0
            continue
        pos = int(round(t))
        if c[C_COUNT] > 0:
            for k in range(c[C_POS] + 1, min(pos, c[C_POS] + size + 1)):
                window[k % size] = np.nan  # a gap
        window[pos % size] = x
        c[C_POS] = pos
        nb = c[C_BINS]
        ph = int((pos % f[S_PERIOD]) * (nb / f[S_PERIOD])) % nb if nb > 0 else 0  # as season.phases
        seasonal = prof[ph] if nb > 0 else 0.0
        d = x - seasonal
        if c[C_COUNT] == 0:
            f[S_LEVEL] = d
            f[S_SCALE] = 0.0
            f[S_SPREAD] = 0.0
            f[S_QUANTUM] = np.inf
            f[S_SLOW] = 0.0
            f[S_LAST_X] = x
            f[S_LAST_T] = t
            c[C_COUNT] = 1
            out[i] = 0.0
            continue
        n = c[C_COUNT]
        e = d - f[S_LEVEL]
        q = f[S_QUANTUM] if math.isfinite(f[S_QUANTUM]) else 0.0
        floor = max(q, floor_spread * f[S_SPREAD], 1e-9 * abs(f[S_LEVEL]), 1e-12)
        sd = math.sqrt(f[S_SCALE] * f[S_SCALE] + floor * floor)
        z = e / sd
        dt = t - f[S_LAST_T]
        f[S_LAST_T] = t
        c[C_COUNT] = n + 1
        step = abs(x - f[S_LAST_X])  # after scoring: a constant's first step is measured against no quantum
        if step > 0.0:
            f[S_QUANTUM] = min(f[S_QUANTUM], step)
        f[S_LAST_X] = x
        if n < warmup:
            a = max(_alpha(dt, halflife, n), 1.0 / (n + 1.0))
            f[S_LEVEL] += a * e
            f[S_SCALE] += (_MAD_TO_SD * abs(e) - f[S_SCALE]) / n
            f[S_SPREAD] += (abs(x - f[S_LEVEL]) - f[S_SPREAD]) / n
            out[i] = 0.0
            continue
        if c[C_OUTLIERS] == 0:
            f[S_RUN_SD] = sd
        if abs(e) > z_gate * f[S_RUN_SD]:  # judged by the scale when the run began (a step can set the quantum)
            recent[c[C_OUTLIERS] % relearn] = d
            c[C_OUTLIERS] += 1
            if c[C_OUTLIERS] >= relearn:  # a new regime: start from where it is
                f[S_LEVEL] = np.median(recent)
                f[S_SLOW] = 0.0
                c[C_OUTLIERS] = 0
        else:
            c[C_OUTLIERS] = 0
            f[S_LEVEL] += _alpha(dt, halflife, n) * e
            if nb > 0:  # clipped: a day without its pattern must not teach the profile to forget it
                prof[ph] += profile_rate * min(max(x - f[S_LEVEL] - prof[ph], -2.0 * sd), 2.0 * sd)
            f[S_SCALE] += _alpha(dt, scale_halflife, n) * (_MAD_TO_SD * abs(e) - f[S_SCALE])
            f[S_SPREAD] += _alpha(dt, scale_halflife, n) * (abs(x - f[S_LEVEL]) - f[S_SPREAD])
        f[S_SLOW] += slow_rate * (min(max(z, -z_gate), z_gate) - f[S_SLOW])
        slow = abs(f[S_SLOW]) / math.sqrt(slow_rate / (2.0 - slow_rate))  # in its own sd on white noise
        point = min(abs(z), 1e9)
        w = weight[0]
        p = 2.0 * min(tail_probability(point, hists[0], w), tail_probability(slow, hists[1], w))
        if c[C_OUTLIERS] <= 1:  # a run of outliers is one event in the history, not one per sample
            remember(point, hists[0], w)
            remember(slow, hists[1], w)
        weight[0] = next_weight(w, hists)
        out[i] = calibrated(p)


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel before the first sample."""
    f = np.zeros(2)
    i = np.zeros(2, np.int64)
    ewma_zscore(f, i, f, f.copy(), f.copy(), i.copy(), f.copy(), i.copy(), 60.0, 6.0, 2, 10, 0.0, 1e-9,
                f.copy(), f.copy())
    cusum(f, f.copy(), f.copy(), i, f.copy(), i.copy(), f.copy(), f.copy(), f.copy(), f.copy(), f.copy(), 60.0, 1.0,
          10.0, 2, 2.0, 1.0, 0.0, f.copy(), f.copy())
    robust_zscore(f, i, f, f.copy(), f.copy(), i.copy(), f.copy(), 60.0, 2, 0.0, 1e-9, f.copy())
    counter_delta(f, i, f, np.full(2, np.nan), f.copy(), np.full(2, np.nan), i.copy(), 3, f.copy(), f.copy())
    flatline(f, i, np.full(2, np.nan), i.copy(), i.copy())
    group_median(f, i, 1, np.ones(2, np.bool_), f.copy())
