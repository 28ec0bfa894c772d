"""Scoring one arbitrary univariate series online (`fleetwatch replay`).

The same Numba kernels as the fleet detectors, one series, one sample at a time in
timestamp order, each sample scored only against what came before it:

1. Time is measured in typical sampling intervals (an EW average of past gaps), so
   the detector needs no tuning to the series' time scale, and a gap lets the
   baseline forget in proportion to its length.
2. An EWMA mean/variance baseline (half-life HALFLIFE_SAMPLES intervals) gives a
   z-score. Outliers (|z| > Z_GATE) do not move the baseline; RELEARN outliers in a
   row mean the level changed and the baseline starts over.
3. A streaming median/MAD baseline (same half-life and warm-up; kernels.robust_zscore)
   gives a robust z; a spike moves that baseline one small step whatever its size. Where
   it puts a sample less than 1/ROBUST_VETO as far out as the EWMA does, the EWMA
   baseline has been pulled by spikes (or restarted inside a burst of them) and
   the robust z is used; elsewhere the EWMA z, the more precise on clean noise.
4. A CUSUM of that z, clipped to +-CUSUM_CLIP, catches shifts and trends too small
   for one sample; clipped, a lone spike adds little to it, so only several
   outliers close together raise it.
5. anomaly_score = max(z^2 / (z^2 + Z_HALF^2), S^2 / (S^2 + H^2)): 0 for normal,
   0.5 at |z| = Z_HALF or S = H, towards 1 beyond.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from pipeline.detect.state import Cusum, EwmaZ, RobustZ

HALFLIFE_SAMPLES = 20.0
WARMUP = 20
Z_GATE = 6.0
RELEARN = 15
Z_HALF = 4.5
CUSUM_K = 1.5   # in standard deviations
CUSUM_H = 15.0
ROBUST_VETO = 2.0
CUSUM_CLIP = Z_GATE  # z beyond the EWMA gate is an outlier: the point score's, not the drift's


@njit(cache=True, nogil=True)
def typical_time(ts):
    """Time in units of the typical sampling interval so far (no look-ahead)."""
    n = ts.shape[0]
    out = np.zeros(n)
    typical = np.nan
    for i in range(1, n):
        dt = ts[i] - ts[i - 1]
        if not math.isfinite(dt) or dt <= 0.0:
            out[i] = out[i - 1]
            continue
        if not math.isfinite(typical):
            typical = dt
        out[i] = out[i - 1] + min(dt / typical, 1000.0)
        typical += 0.05 * (min(dt, 10.0 * typical) - typical)
    return out


def score_series(ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """anomaly_score in [0, 1] for each sample; 0 where the value is missing."""
    ts = np.asarray(ts, np.float64)
    values = np.asarray(values, np.float64)
    order = np.argsort(ts, kind="stable")  # a CSV out of order is scored in time order
    t = typical_time(ts[order])
    x = values[order]
    slots = np.zeros(x.shape[0], np.int64)
    ewma = EwmaZ(HALFLIFE_SAMPLES, Z_GATE, WARMUP, RELEARN, min_sd_rel=1e-3, min_sd_abs=1e-9)
    ze, _ = ewma.update(x, slots, t)
    zr = RobustZ(HALFLIFE_SAMPLES, WARMUP, min_sd_rel=1e-3, min_sd_abs=1e-9).update(x, slots, t)
    z = np.clip(np.nan_to_num(np.where(ROBUST_VETO * np.abs(zr) < np.abs(ze), zr, ze), nan=0.0), -1e6, 1e6)
    zc = np.clip(z, -CUSUM_CLIP, CUSUM_CLIP)
    cus = Cusum(HALFLIFE_SAMPLES * 4, CUSUM_K, CUSUM_H, WARMUP).update(np.where(np.isfinite(x), zc, np.nan), slots)
    s = np.nan_to_num(np.abs(cus), nan=0.0) * CUSUM_H
    score = np.maximum(z * z / (z * z + Z_HALF ** 2), s * s / (s * s + CUSUM_H ** 2))
    score = np.where(np.isfinite(x), score, 0.0)
    out = np.empty_like(score)
    out[order] = np.clip(score, 0.0, 1.0)
    return out
