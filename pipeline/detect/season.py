"""Finding a series' period online, and its seasonal profile, from a bounded window.

Run between batches on the last samples of a series (at most the scorer's window), so
it costs an FFT per few hundred samples, never a per-sample Python step:

- `find_period`: the autocorrelation of the window (outliers clipped, linear trend
  removed, one FFT), read at its peaks. A peak counts when it is high (ACF_MIN) and
  prominent (PROMINENCE above the lowest ACF at a shorter lag: a random walk's ACF
  decays without rising again, a pattern's comes back). Of the peaks within ACF_TIE of
  the highest, the shortest lag wins (the fundamental, not its multiples).
- `update`, the profile: each phase's mean departure from a centred moving average of one period
  (the level and trends taken out), and how much of the variance it explains in the
  window's last period when fitted on the periods before: MIN_CYCLES periods must fit in
  the window (a daily period needs two days of samples), and a period that does not
  predict is no season.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACF_MIN = 0.3
PROMINENCE = 0.3
ACF_TIE = 0.05
MIN_PERIOD = 3
MIN_GAIN = 0.2    # a profile explaining less of a period it was not fitted on than this is no season
SAME = 0.01       # a new estimate this close (relative) to the period in use is the same period
SWITCH = 0.9      # a new period must leave at most this share of the error the one in use leaves (held out)
MIN_CYCLES = 2    # periods in the window: one to fit the profile on, the last to judge it


def _clean(window: np.ndarray) -> np.ndarray | None:
    """Finite, winsorized at the 0.5th and 99.5th percentiles (a spike 100 sd high would
    be the whole ACF; a MAD clip would cut a square wave in half), gaps filled with the median."""
    ok = np.isfinite(window)
    if ok.sum() < 8 * MIN_PERIOD:
        return None
    lo, med, hi = np.percentile(window[ok], [0.5, 50, 99.5])
    return np.clip(np.where(ok, window, med), lo, hi)


def _detrend(x: np.ndarray) -> np.ndarray:
    """x less its least-squares line."""
    t = np.arange(x.size, dtype=np.float64) - 0.5 * (x.size - 1)
    return x - x.mean() - t * (float(t @ x) / float(t @ t) if x.size > 1 else 0.0)


def find_period(window: np.ndarray, current: float = 0.0) -> float:
    """The dominant period of `window` (evenly spaced samples, NaN for gaps), in samples; 0: none.
    `current`, the period in use, is kept while the estimate stays within SAME of it."""
    x = _clean(window)
    return 0 if x is None else _find_period(x, current)


def _find_period(x: np.ndarray, current: float) -> float:
    n = x.size
    x = _detrend(x)
    f = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(f * np.conj(f))[:n]
    if acf[0] <= 1e-12 * max(1.0, float(np.abs(x).max()) ** 2):
        return 0.0  # no variance left: a constant or a straight line
    # Each lag's correlation over its own n - k pairs, normalised by their energy (as YIN
    # does): no factor in k that would pull the peak (the plain 1/n or 1/(n - k) one moves a
    # daily peak by three samples in four days of them).
    energy = np.cumsum(x * x)
    head = energy[::-1][:n]                      # sum of x[t]^2 over t < n - k
    tail = energy[-1] - np.concatenate([[0.0], energy[:-1]])  # sum over t >= k
    acf = 2 * acf / np.maximum(head + tail, 1e-300)
    top = n // 2
    if top <= MIN_PERIOD + 1:
        return 0
    k = np.arange(MIN_PERIOD, top)
    peak = (acf[k] >= acf[k - 1]) & (acf[k] >= acf[k + 1]) & (acf[k] >= ACF_MIN)
    lowest_before = np.minimum.accumulate(acf[:top])[k - 1]
    peak &= acf[k] - lowest_before >= PROMINENCE
    if not peak.any():
        return 0
    lags, heights = k[peak], acf[k[peak]]
    first = int(lags[heights >= heights.max() - ACF_TIE].min())
    # The ACF is flat at its peak and noise moves its highest lag by a few samples: the
    # vertex of a parabola through the ACF within 10% of the lag is steadier, and finer
    # than a sample (a period that is off by one slips a sample every cycle).
    near = np.arange(max(MIN_PERIOD, int(0.9 * first)), min(top, int(1.1 * first) + 2))
    u = (near - first).astype(np.float64)
    a, b, _ = np.linalg.lstsq(np.stack([u * u, u, np.ones_like(u)], axis=1), acf[near], rcond=None)[0]
    vertex = first - b / (2 * a) if a < 0 else float(near[np.argmax(acf[near])])
    vertex = float(min(max(vertex, near[0]), near[-1]))
    if current and abs(vertex - current) <= SAME * current:
        return current  # the same period: each change costs a relearn
    return vertex


def bins(period: float) -> int:
    """How many phases a profile of `period` samples has: one per sample, about."""
    return max(int(round(period)), MIN_PERIOD)


def phases(pos: np.ndarray, period: float) -> np.ndarray:
    """The phase of each position (in typical intervals) in a profile of `bins(period)`;
    kernels.series_score computes the same."""
    n = bins(period)
    return (np.mod(pos, period) * (n / period)).astype(np.int64) % n


@dataclass(frozen=True)
class Season:
    period: float           # samples, not always whole; 0: none
    profile: np.ndarray     # one value per phase, mean 0
    sd: float               # robust sd of what the profile leaves


def update(window: np.ndarray, first_pos: int, current: float) -> Season | None:
    """What the window says of the series' season: a new one to adopt, Season(0, ...) to
    drop the current one (it no longer predicts), or None to keep what is in use.
    `first_pos` is window[0]'s position."""
    x = _clean(window)
    if x is None:
        return None
    ok = np.isfinite(window)
    pos = first_pos + np.arange(x.size, dtype=np.float64)
    found = _find_period(x, current)
    if found and found == current:
        return None
    kept = _profile(x, ok, pos, current) if current and MIN_CYCLES * (current + 1) <= x.size else None
    if found and MIN_CYCLES * (found + 1) <= x.size:
        # The vertex, or a whole lag within a few samples of it where the pattern repeats
        # exactly (a sawtooth's ACF peaks off centre, and its reset misaligned by a tenth of
        # a sample per cycle is a spike every cycle after ten): whichever predicts best,
        # and with less error than the period in use (SWITCH: each change costs a relearn).
        lags = {found, *(float(k) for k in range(int(found) - 4, int(found) + 6) if k >= MIN_PERIOD)}
        fits = [(_profile(x, ok, pos, p), p) for p in lags if MIN_CYCLES * (p + 1) <= x.size]
        (prof, gain, left, _), found = max(fits, key=lambda f: (f[0][1], -f[1]))
        if gain >= MIN_GAIN and (kept is None or 1.0 - gain < SWITCH * (1.0 - kept[1])):
            return Season(found, prof, 1.4826 * float(np.median(np.abs(left - np.median(left)))))
    if kept is not None and kept[3] < MIN_GAIN:
        return Season(0.0, np.zeros(0), 0.0)  # judged on the whole window: one odd day is no reason
    return None


def _profile(x: np.ndarray, ok: np.ndarray, pos: np.ndarray, period: float):
    """(profile, mean 0, by phase; the share of the variance of the window's last period
    it explains, fitted on the periods before it; what it leaves of that period (its
    error out of sample: with two periods, half the phases fit one sample exactly); the
    share of the whole window's variance the profile explains). Held out: fitted and
    judged on the same samples, a profile of two or three periods explains a good part of
    any random walk. The held-out test takes a straight line out; the profile itself a
    centred moving average of one period (level and trends as they go)."""
    n, width = x.size, bins(period)
    phase = phases(pos, period)
    line = _detrend(x)
    held = np.zeros(n, bool)
    held[n - width:] = True
    fit = _fit(line, phase, ok & ~held, width)
    before = line[ok & held] - np.mean(line[ok & held]) if (ok & held).any() else line[:0]
    left = before - fit[phase[ok & held]]
    gain = 1.0 - float(np.mean(left ** 2)) / float(np.mean(before ** 2)) if before.size and np.any(before) else 0.0
    csum = np.concatenate([[0.0], np.cumsum(x)])
    half = width // 2
    local = np.full(n, np.nan)   # centred moving average over one period
    local[half:n - width + half + 1] = (csum[width:] - csum[:-width]) / width
    detrended = x - local
    use = ok & np.isfinite(detrended)
    prof = _fit(detrended, phase, use, width)
    rest = detrended[use] - prof[phase[use]]
    explained = 1.0 - float(np.mean(rest ** 2)) / float(np.mean(detrended[use] ** 2)) if np.any(detrended[use]) else 0.0
    return prof, gain, left, explained


def _fit(detrended: np.ndarray, phase: np.ndarray, use: np.ndarray, period: int) -> np.ndarray:
    sums = np.bincount(phase[use], detrended[use], minlength=period)
    counts = np.bincount(phase[use], minlength=period)
    prof = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return prof - prof.mean()
