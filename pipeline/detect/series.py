"""Scoring one arbitrary univariate series online (`fleetwatch replay`), with no
per-series tuning: each sample is scored only against what came before it.

1. Time is measured in typical sampling intervals (an EW average of past gaps), so the
   scorer needs no tuning to the series' time scale, and a gap lets the baselines forget
   in proportion to its length.
2. Seasonality (detect/season.py): every few hundred samples the last WINDOW samples'
   autocorrelation names the period, if any (daily, weekly, or whatever repeats), and
   its profile. The prediction is then level + profile[phase]; each phase keeps
   learning (PROFILE_RATE per visit), so a pattern that drifts is followed. A profile
   that stops explaining the window is dropped.
3. The level is an EW mean (half-life HALFLIFE intervals) of what the profile leaves;
   the noise scale an EW mean absolute deviation (SCALE_HALFLIFE). The scale never goes
   below a floor that knows noiseless and quantized series: one quantum (the smallest
   step the series has taken, 1 for integers), 1% of the series' own spread, and
   1e-9 of its level, so a sine without noise or an integer counter is not an anomaly
   at every turn.
4. z = (x - prediction) / scale. Beyond Z_GATE a sample is an outlier and teaches
   nothing (a fault must not become the normal); RELEARN outliers in a row are a new
   regime: the level restarts at their median, and the next samples score against it.
   A level shift therefore scores high where it begins, for RELEARN samples at most.
5. A slow EW mean of the clipped z (SLOW_RATE) catches shifts too small for one sample.
6. |z| and the slow mean (in its own sd) are each calibrated against the series' own
   history of them (kernels.tail_probability): anomaly_score = log(p) / log(1e-6), p
   twice the smaller tail probability, so 0.5 means one in a thousand of this series'
   own past, on every series. The numbers are in kernels.series_score.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from pipeline.detect import kernels, season
from pipeline.detect.kernels import C_BINS, C_COUNT, C_OUTLIERS, C_POS, S_LEVEL, S_PERIOD, S_SCALE, S_SLOW

WINDOW = 8192          # samples kept for finding the period: 3 weeks of 5-minute samples fit, or 5 days of 1-minute
DETECT_EVERY = 128     # samples between the first period searches; then a quarter of the samples so far,
DETECT_MAX = WINDOW    # up to once a window (a search is an FFT of the window and a few profile fits, ~1 ms)
HALFLIFE = 20.0
SCALE_HALFLIFE = 50.0
WARMUP = 20
Z_GATE = 5.0
RELEARN = 5
PROFILE_RATE = 0.1
SLOW_RATE = 0.1
FLOOR_SPREAD = 0.01
ADOPT_KEEP = 0.1       # of the calibration history, when the season changes: it measured another model
PARAMS = (HALFLIFE, SCALE_HALFLIFE, WARMUP, Z_GATE, RELEARN, PROFILE_RATE, SLOW_RATE, FLOOR_SPREAD)


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


class SeriesScorer:
    """One series' scorer: `update` takes samples in time order (time in typical
    intervals, `typical_time`) and returns their scores; its state carries over."""

    def __init__(self) -> None:
        self.f = np.zeros(9)
        self.c = np.zeros(4, np.int64)
        self.window = np.full(WINDOW, np.nan)
        self.prof = np.zeros(WINDOW // 2)
        self.recent = np.zeros(RELEARN)
        self.hists = np.zeros((2, kernels.CAL_BINS + 1))
        self.weight = np.ones(1)
        self.samples = 0  # finite or not: the period searches run at sample counts, so a prefix scores the same
        self.next_search = DETECT_EVERY

    def update(self, t: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.empty(x.shape[0])
        i = 0
        while i < x.shape[0]:
            j = min(x.shape[0], i + self.next_search - self.samples)
            kernels.series_score(x[i:j], t[i:j], self.f, self.c, self.window, self.prof, self.recent, self.hists,
                                 self.weight, out[i:j], *PARAMS)
            self.samples += j - i
            i = j
            if self.samples == self.next_search:
                if self.c[C_COUNT] > 0:
                    self._find_season()
                # a quarter of the samples so far: a season shows soon after two periods fit
                self.next_search = self.samples + min(max(DETECT_EVERY, self.samples // 4), DETECT_MAX)
        return out

    def _find_season(self) -> None:
        """Between batches: look for the period in the window, and adopt, keep or drop it."""
        pos, w = int(self.c[C_POS]), WINDOW
        first = max(0, pos - w + 1)
        window = self.window[np.arange(first, pos + 1) % w]
        change = season.update(window, first, float(self.f[S_PERIOD]))
        if change is not None:
            self._adopt(window, first, change)

    def _adopt(self, window: np.ndarray, first: int, new: season.Season) -> None:
        self.prof[:] = 0.0
        self.prof[:new.profile.size] = new.profile
        self.f[S_PERIOD] = new.period
        self.c[C_BINS] = new.profile.size
        span = window[-max(int(new.period), RELEARN):]
        pos = first + window.size - span.size + np.arange(span.size, dtype=np.float64)
        left = span - (new.profile[season.phases(pos, new.period)] if new.period else 0.0)
        if np.isfinite(left).any():
            self.f[S_LEVEL] = float(np.nanmean(left))
        if new.sd > 0:
            self.f[S_SCALE] = new.sd
        self.c[C_OUTLIERS] = 0
        self.f[S_SLOW] = 0.0
        self.hists *= ADOPT_KEEP


def score_series(ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """anomaly_score in [0, 1] for each sample; 0 where the value is missing, or beyond
    kernels.SERIES_MAX (1e150: no measurement; the scorer's arithmetic would overflow)."""
    ts = np.asarray(ts, np.float64)
    values = np.asarray(values, np.float64)
    order = np.argsort(ts, kind="stable")  # a CSV out of order is scored in time order
    t = typical_time(ts[order])
    score = SeriesScorer().update(t, values[order])
    out = np.empty_like(score)
    out[order] = np.clip(score, 0.0, 1.0)
    return out
