"""A labelled corpus of univariate series, an early-detection metric, and a baseline.

Issue 16 asks for an evaluation corpus of our own, modelled on documented real-world
phenomena, with labelled anomalies and an early-detection score. This module has three
parts, all deterministic and in memory (seeded numpy; no files, no network):

1. `corpus(seed)`: 57 series of 2,000-10,000 points, in 13 families, sampled every
   10 s, 1 min, 5 min or 30 min (`Series`: name, family, ts in seconds, values, labelled
   windows, the exact onset index and kind of each anomaly). Families and what they are
   modelled on:

   cpu           server CPU % (the AWS CloudWatch EC2 series of the Numenta Anomaly
                 Benchmark, NAB): business-hours daily cycle, quieter weekends, an hourly
                 cron bump (normal), AR(1) noise growing with load, clipped to 0-100 and
                 quantized to 1 or 0.1.
   latency       request latency (NAB's ec2_request_latency_*): log-normal around a load-
                 following median, with occasional 3-8x single-sample spikes (GC pauses,
                 cold caches: normal, the heavy tail).
   throughput    network/disk throughput: on/off bursts (a two-state Markov process) and a
                 nightly backup at 02:00 that saturates the link (normal).
   traffic       counts per 30 min like NAB's nyc_taxi: Poisson counts, weekday (two rush
                 hours) and weekend shapes, day-to-day weather factors, a DST hour shift
                 (normal); holidays, a blizzard, an event as anomalies.
   machine_temp  NAB's machine_temperature_system_failure: slow mean-reverting drift, a
                 failure precursor (a gradual rise) then the failure (a sharp drop).
   gpu_power     a GPU of a synchronized training job, 10 s samples: square-ish swings
                 between ~300 and ~700 W (compute / communication phases, averaged over
                 each sample), checkpoint stalls every 20-40 min where power drops to
                 ~115 W for 30-90 s, and (one series) job churn with idle gaps: all NORMAL.
                 Anomalies: a hang (NCCL spin, flat ~205 W), a power cap / throttle (the
                 high phase clipped), a straggler (the swing period doubles), a checkpoint
                 stall ten times longer than usual.
   inference     inference requests/s following the day, weekends lower.
   sensor        an inlet-temperature sensor that quantizes to integer degrees, drops out
                 (NaN gaps and missing timestamps), and fails the ways DS18B20-class
                 sensors are documented to fail: the 85 degC power-on-reset reading and the
                 -127 degC disconnected reading (spikes), a stuck value, a cooling failure.
   sensor_recal  the same sensor (0.1 degC) with recalibration steps. CHOICE: a
                 recalibration step is labelled an anomaly (a level shift an operator
                 wants to hear about once, which should then be learned as the new
                 normal) but only in this family, so the bench reports it on its own line
                 and it can be dropped if the project decides such steps are normal. No
                 other family contains recalibration steps. One series has the dropout of
                 the maintenance visit just before its step.
   periodic      noiseless sine, square and sawtooth waves (normal ones must score low at
                 every turn); anomalies: frequency change, a missing cycle, amplitude
                 change, a frozen value. Also issue 16's example: a daily sine of
                 amplitude 10 with noise sd 1, alone and with a 3-sample spike of +40.
   constant      a constant (a locked GPU clock, a fan setting) that steps or blips.
   counter       a cumulative byte counter (monotone, rate following the day); a stall,
                 a rate change (trend onset), a reset.
   seasonal      NAB's artificial art_daily_* series: a daily square pattern with noise;
                 jumps up/down, a flat middle, a missing jump.

   Each family has series with no anomaly (normal only; 18 series) and series with 1-3
   anomalies of the kinds spike (1-3 samples), dip, level_shift, variance, seasonal,
   trend, frequency, flatline (`KINDS`).

   Labelled windows, NAB-style: NAB's labeller gives each anomaly a window of
   10% of the series length divided by the number of anomalies in the series
   (nab/labeler.py, windowSize = 0.10), centred on the labelled point. Here the anomaly's
   onset is known exactly, so the window is placed with the onset at 10% of its length
   (`ONSET_AT`): a detection at the onset earns ~99% of the reward, and the window's
   first 10% is a small lead that NAB's centred windows give far more of. The first 15%
   of each series is probationary (NAB's probationaryPercent = 0.15; NAB also caps it at
   750 rows, this corpus does not): no window starts there and no detection there is
   scored. Random dropouts are kept out of windows so that every onset has a row.

2. The early-detection metric (`evaluate`), NAB's scoring with its standard profile
   (A_TP = 1.0, A_FP = -0.11, A_FN = -1.0), written from NAB's nab/sweeper.py
   (numenta/NAB, `scaledSigmoid`, `Sweeper.calcSweepScore`, `calcScoreByThreshold`) and
   nab/runner.py (normalisation):
   - scaledSigmoid(y) = 2 / (1 + exp(5 y)) - 1, and -1 for y >= 3;
   - a point inside a window at index i, the window being rows [left, right] of width
     w = right - left + 1, has y = -(right - i + 1) / w (-1 at the window's first point)
     and is worth A_TP * scaledSigmoid(y) / scaledSigmoid(-1) (exactly A_TP at the first
     point, ~0.2 at the last);
   - a point outside every window is worth -A_FP * scaledSigmoid(y) with
     y = |i - right_prev| / (w_prev - 1) measured from the end of the previous window, or
     y = 3 (-> A_FP) when no window precedes it: a false positive right after a window
     costs little, one far from any window costs 0.11;
   - a detection is a scored point (after probation) with score >= threshold; a window
     counts its best (= earliest) detection only, or A_FN if it has none; every false
     positive point counts;
   - raw score = sum over the corpus; normalized = 100 (raw - null) / (perfect - null),
     null = every window missed (A_FN each), perfect = every window detected at its first
     point and nothing else (A_TP each);
   - one threshold per detector for the whole corpus, the one that maximizes the raw score
     (NAB optimizes it too). The objective only gains at a value that is the running
     maximum of a window's scores, so those values and 'raise nothing' (inf) are all the
     candidates needed for the exact optimum; 1,000 quantiles of all scored points are
     added for a smooth `curve`.

3. `windowed_gaussian(ts, values)`: NAB's windowedGaussian detector
   (nab/detectors/gaussian/windowedGaussian_detector.py: windowSize 6400, stepSize 100,
   score = 1 - Q(|x - mean| / std) over the window of preceding values, std 0 -> 1e-6;
   the window grows to 6400 values, then slides 100 at a time), vectorised: cumulative
   sums while it grows, exact numpy mean/std per step after; Q through math.erfc as a
   Numba ufunc (numpy has no erfc). NaN values are skipped (not added to the window) and
   score 0.

Run `python -m tests.corpus` for a summary of the corpus.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from numba import vectorize

T0 = 1_704_067_200.0  # 2024-01-01 00:00 UTC, a Monday
DAY = 86_400.0
PROBATION = 0.15
WINDOW_FRACTION = 0.10
ONSET_AT = 0.10
A_TP, A_FP, A_FN = 1.0, -0.11, -1.0
KINDS = ("spike", "dip", "level_shift", "variance", "seasonal", "trend", "frequency", "flatline")


@dataclass(eq=False)
class Series:
    """One labelled series. `windows` are (start_ts, end_ts), inclusive; `onsets[i]` is the
    index of the first anomalous sample of the anomaly of kind `kinds[i]` in `windows[i]`."""

    name: str
    family: str
    interval: float
    ts: np.ndarray
    values: np.ndarray
    windows: list[tuple[float, float]]
    onsets: list[int]
    kinds: list[str]
    note: str = ""

    @property
    def probation(self) -> int:
        """Rows [0, probation) are probationary: never labelled, never scored."""
        return probation_length(len(self.ts))

    def window_bounds(self) -> list[tuple[int, int]]:
        """Each window as inclusive row indices (left, right)."""
        out = []
        for a, b in self.windows:
            left = int(np.searchsorted(self.ts, a, "left"))
            right = int(np.searchsorted(self.ts, b, "right")) - 1
            out.append((left, right))
        return out


def probation_length(n: int) -> int:
    return int(math.floor(PROBATION * n))


def window_length(n: int, k: int) -> int:
    return int(WINDOW_FRACTION * n / k)


# ---- building blocks --------------------------------------------------------------------

def _grid(n: int, dt: float) -> np.ndarray:
    return T0 + dt * np.arange(n, dtype=np.float64)


def _hour(ts: np.ndarray, shift_h: np.ndarray | float = 0.0) -> np.ndarray:
    return (((ts - T0) % DAY) / 3600.0 + shift_h) % 24.0


def _day(ts: np.ndarray) -> np.ndarray:
    return ((ts - T0) // DAY).astype(np.int64)


def _dow(ts: np.ndarray) -> np.ndarray:
    return _day(ts) % 7  # 0 = Monday


def _bump(h: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A Gaussian bump on the 24 h circle."""
    d = (h - centre + 12.0) % 24.0 - 12.0
    return np.exp(-0.5 * (d / width) ** 2)


def _diurnal(h: np.ndarray, peak: float = 15.0) -> np.ndarray:
    return 0.5 + 0.5 * np.cos(2 * np.pi * (h - peak) / 24.0)


def _business(h: np.ndarray) -> np.ndarray:
    """~0 at night, ~1 from 09:00 to 18:00."""
    return 0.5 * (np.tanh((h - 8.5) / 1.0) - np.tanh((h - 18.5) / 1.5))


def _ar1(rng: np.random.Generator, n: int, phi: float, sd: float) -> np.ndarray:
    """Stationary AR(1) noise of standard deviation sd, by FFT convolution (no loop)."""
    if phi <= 0.0:
        return rng.normal(0.0, sd, n)
    k = int(min(4 * n, math.ceil(math.log(1e-6) / math.log(phi))))
    e = rng.normal(0.0, sd * math.sqrt(1.0 - phi * phi), n + k)
    kern = phi ** np.arange(k)
    size = 1 << int(math.ceil(math.log2(n + 2 * k)))
    y = np.fft.irfft(np.fft.rfft(e, size) * np.fft.rfft(kern, size), size)
    return y[k:n + k]


def _runs(rng: np.random.Generator, n: int, on_mean: float, off_mean: float) -> np.ndarray:
    """A two-state Markov on/off process (geometric run lengths), as a bool array."""
    m = int(2 * n / (on_mean + off_mean)) + 8
    on = rng.geometric(1.0 / on_mean, m)
    off = rng.geometric(1.0 / off_mean, m)
    lengths = np.column_stack([off, on]).ravel()
    state = np.tile([False, True], m)
    out = np.repeat(state, lengths)
    while out.shape[0] < n:  # pragma: no cover - m is ample
        out = np.concatenate([out, out])
    return out[:n]


def _events(rng: np.random.Generator, n: int, every: tuple[float, float], dur: tuple[int, int]) -> np.ndarray:
    """A bool mask of events recurring every U(every) samples, each lasting U[dur] samples."""
    m = int(n / every[0]) + 2
    starts = np.cumsum(rng.uniform(every[0], every[1], m)).astype(np.int64)
    lens = rng.integers(dur[0], dur[1] + 1, m)
    mask = np.zeros(n + int(dur[1]) + 1, bool)
    idx = np.concatenate([np.arange(s, s + d) for s, d in zip(starts, lens) if s < n] or [np.zeros(0, np.int64)])
    mask[idx] = True
    return mask[:n]


def _place(rng: np.random.Generator, n: int, k: int, gap: int = 0, slack: int = 0,
           lo_frac: float = 0.2, hi_frac: float = 0.95) -> list[int]:
    """k onsets, windows disjoint and after probation, with `gap` samples after each window for
    the anomaly's effect to end before the next one, and `slack` samples of room for the
    caller to move an onset forward (to a time of day)."""
    if k == 0:
        return []
    L = window_length(n, k)
    lead = int(round(ONSET_AT * L))
    lo = max(int(lo_frac * n), probation_length(n) + lead)
    hi = int(hi_frac * n) - (L - lead)
    seg = (hi - lo) / k
    room = int(seg - L - gap - slack)
    if room <= 0:
        raise ValueError(f"no room for {k} anomalies in {n} rows (gap {gap}, slack {slack})")
    return [int(lo + j * seg + rng.integers(0, room)) for j in range(k)]


def _keep_out(mask: np.ndarray, onsets: Sequence[int], n: int) -> np.ndarray:
    """Clear a dropout mask inside every window (so every onset has a row)."""
    mask = mask.copy()
    if onsets:
        L = window_length(n, len(onsets))
        lead = int(round(ONSET_AT * L))
        for o in onsets:
            mask[max(0, o - lead - 1):o - lead + L + 1] = False
    return mask


def _span(o: int, d: int, n: int) -> slice:
    return slice(o, min(n, o + d))


# ---- the families -----------------------------------------------------------------------
# Each returns (ts, values, onsets, keep) on a regular grid of n rows; keep (or None) says
# which rows exist (missing timestamps are rows with keep False).

Gen = Callable[..., tuple[np.ndarray, np.ndarray, list[int], np.ndarray | None]]


def _cpu(rng, n, dt, kinds, quant=1.0, base=25.0, amp=35.0, noise=3.0):
    ts = _grid(n, dt)
    h, dow = _hour(ts), _dow(ts)
    level = base + amp * _business(h) * np.where(dow >= 5, 0.35, 1.0)
    cron = np.where((ts - T0) % 3600.0 < dt, rng.uniform(0.1, 0.25, n) * amp, 0.0)  # hourly job
    sd = np.full(n, noise)
    x = level + cron
    onsets = _place(rng, n, len(kinds), gap=int(2 * DAY / dt))
    extra = np.zeros(n)
    for o, kind in zip(onsets, kinds):
        if kind == "spike":
            extra[_span(o, int(rng.integers(1, 4)), n)] += rng.uniform(35, 55)
        elif kind == "level_shift":  # a deploy with a performance regression
            extra[o:] += rng.uniform(0.5, 0.8) * amp
        elif kind == "variance":  # a noisy neighbour
            sd[_span(o, int(DAY / dt), n)] *= 4.0
        elif kind == "trend":  # a leak: CPU climbs until the process is restarted
            d = min(n - o, int(1.5 * DAY / dt))
            extra[o:o + d] += np.linspace(0.0, 60.0, d)
    x = x + extra + _ar1(rng, n, 0.6, 1.0) * sd * (0.6 + level / (base + amp))
    for o, kind in zip(onsets, kinds):
        if kind == "flatline":  # the agent stops updating: the last value repeats
            x[_span(o, int(DAY / dt), n)] = x[o - 1]
    x = np.round(np.clip(x, 0.0, 100.0) / quant) * quant
    return ts, x, onsets, None


def _latency(rng, n, dt, kinds, median=120.0, sigma=0.25):
    ts = _grid(n, dt)
    h = _hour(ts)
    mu = np.log(median) + 0.35 * _diurnal(h, 14.0)
    sg = np.full(n, sigma)
    onsets = _place(rng, n, len(kinds), gap=int(0.5 * DAY / dt))
    mult = np.ones(n)
    for o, kind in zip(onsets, kinds):
        if kind == "level_shift":  # a slower dependency, for good
            mu[o:] += math.log(rng.uniform(2.0, 2.8))
        elif kind == "variance":  # retry storms
            sg[_span(o, int(rng.integers(200, 400)), n)] *= 3.0
        elif kind == "spike":
            mult[_span(o, int(rng.integers(1, 4)), n)] *= rng.uniform(30, 50)
        elif kind == "dip":  # failing fast: errors return in a few ms
            mult[_span(o, int(rng.integers(40, 90)), n)] *= 0.05
    x = np.exp(mu + sg * _ar1(rng, n, 0.3, 1.0)) * mult
    gc = rng.random(n) < 0.004  # the heavy tail: GC pauses, cold caches (normal)
    x[gc] *= rng.uniform(3.0, 8.0, int(gc.sum()))
    return ts, np.round(x, 1), onsets, None


def _throughput(rng, n, dt, kinds, rate=60.0, link=117.0, shifts=()):
    ts = _grid(n, dt)
    h = _hour(ts)
    on = _runs(rng, n, on_mean=8.0, off_mean=30.0)
    x = np.where(on, rate * np.exp(rng.normal(0, 0.3, n)), 0.5 + np.abs(rng.normal(0, 0.3, n)))
    backup = (h >= 2.0) & (h < 3.0)
    bk = link - np.abs(rng.normal(0, 2.0, n))
    onsets = _place(rng, n, len(kinds), gap=int(1.5 * DAY / dt), slack=int(DAY / dt))
    for j, (o, kind) in enumerate(zip(onsets, kinds)):
        if kind == "seasonal":  # the backup did not run: the onset is the next 02:00
            o = int(np.flatnonzero(np.abs(h[o:] - 2.0) < 1e-9)[0]) + o
            onsets[j] = o
            backup[o:o + int(3600 / dt)] = False
    x = np.where(backup, bk, x)
    shift = iter(shifts)
    for o, kind in zip(onsets, kinds):
        if kind == "flatline":  # link down
            x[_span(o, int(DAY / dt), n)] = 0.0
        elif kind == "level_shift" and next(shift) == "cap":  # renegotiated to 100 Mb/s, for good
            x[o:] = np.minimum(x[o:], 11.6 - np.abs(rng.normal(0, 0.1, n - o)))
        elif kind == "level_shift":  # a resync saturating the link for 3 h at an unusual hour
            s = _span(o, int(3 * 3600 / dt), n)
            x[s] = bk[s]
    return ts, np.round(x, 2), onsets, None


def _traffic(rng, n, dt, kinds, scale=15000.0):
    ts = _grid(n, dt)
    day = _day(ts)
    dst = np.where((day >= 69) & (day < 307), 1.0, 0.0)  # local time = UTC + 1 h in summer
    h = _hour(ts, dst)
    dow = _dow(ts)
    weekday = 0.12 + 0.75 * _bump(h, 8.5, 1.3) + 0.95 * _bump(h, 19.0, 2.5) + 0.55 * _bump(h, 13.0, 3.0)
    weekend = 0.22 + 0.45 * _bump(h, 13.5, 3.5) + 0.85 * _bump(h, 20.5, 3.0) + 0.5 * _bump(h, 1.0, 1.8)
    shape = np.where(dow >= 5, weekend, weekday)
    days = int(day[-1]) + 1
    weather = np.exp(rng.normal(0, 0.04, days))[day]
    year = 1.0 + 0.06 * np.sin(2 * np.pi * (ts - T0) / (365 * DAY))
    lam = scale * shape * weather * year
    per_day = int(DAY / dt)
    weekday_5am = (np.abs(h - 5.0) < 1e-9) & (dow < 5)
    onsets = _place(rng, n, len(kinds), gap=2 * per_day, slack=4 * per_day)
    for j, (o, kind) in enumerate(zip(onsets, kinds)):
        if kind == "seasonal":  # a holiday: a weekday that looks like a quiet Sunday
            o = int(np.flatnonzero(weekday_5am[o:])[0]) + o
            onsets[j] = o
            s = _span(o, per_day, n)
            lam[s] = scale * weather[s] * year[s] * weekend[s] * 0.75
        elif kind == "dip":  # a blizzard: traffic falls to a fifth for a day
            d = int(rng.integers(30, 40))
            ramp = np.minimum(1.0, np.arange(d) / 3.0)
            lam[_span(o, d, n)] *= (1.0 - 0.8 * ramp)[: n - o]
        elif kind == "spike":  # a big event lets out
            lam[_span(o, int(rng.integers(2, 4)), n)] *= rng.uniform(1.8, 2.2)
        elif kind == "level_shift":  # a competitor arrives
            lam[o:] *= 0.7
    x = rng.poisson(lam).astype(np.float64)
    return ts, x, onsets, None


def _machine_temp(rng, n, dt, kinds, base=85.0):
    ts = _grid(n, dt)
    h = _hour(ts)
    x = base + _ar1(rng, n, 0.998, 2.0) + 0.6 * _diurnal(h, 16.0) + _ar1(rng, n, 0.5, 0.3)
    k = len(kinds)
    onsets: list[int] = []
    if k:  # the series ends in a precursor (trend) and the failure it announces (dip)
        assert tuple(kinds[-2:]) == ("trend", "dip")
        ramp = window_length(n, k) + int(rng.integers(60, 120))  # the precursor outlasts its window
        head = _place(rng, n, k - 1, gap=ramp + window_length(n, k), hi_frac=0.8)
        onsets = head + [head[-1] + ramp]
    for j, (o, kind) in enumerate(zip(onsets, kinds)):
        if kind == "trend":  # bearing wear, a clogging filter: a slow rise, faster at the end
            d = onsets[j + 1] - o if j + 1 < k else min(n - o, 600)
            u = np.arange(d) / d
            x[o:o + d] += 9.0 * u + 6.0 * u ** 4
        elif kind == "dip":  # the machine stops: it cools to ambient, then restarts
            off = int(rng.integers(150, 300))
            s = _span(o, off, n)
            amb = 22.0 + rng.normal(0, 0.3, s.stop - s.start)
            cool = np.exp(-np.arange(s.stop - s.start) / 6.0)
            x[s] = amb + (x[o - 1] - 22.0) * cool
            r = _span(s.stop, 40, n)
            warm = 1.0 - np.exp(-np.arange(r.stop - r.start) / 8.0)
            x[r] = 22.0 + (x[r] - 22.0) * warm
    return ts, np.round(x, 3), onsets, None


def _gpu_power(rng, n, dt, kinds, churn=False):
    ts = _grid(n, dt)
    S = 10  # sub-steps per sample: each sample averages the instantaneous power
    onsets = _place(rng, n, len(kinds), gap=int(1800 / dt))
    period = np.full(n, rng.uniform(5.0, 9.0))  # samples per swing (50-90 s)
    duty = np.full(n, rng.uniform(0.55, 0.7))
    lo = np.full(n, rng.uniform(280.0, 330.0))
    hi = np.full(n, rng.uniform(660.0, 700.0))
    idle = np.zeros(n, bool)
    if churn:  # jobs end and others start after an idle gap; each job its own shape
        ends = np.sort(rng.choice(np.arange(int(0.1 * n), int(0.95 * n)), 4, replace=False))
        for e in ends:
            gap = int(rng.integers(60, 180))
            idle[e:e + gap] = True
            period[e + gap:] = rng.uniform(4.0, 12.0)
            duty[e + gap:] = rng.uniform(0.5, 0.75)
            lo[e + gap:] = rng.uniform(250.0, 350.0)
            hi[e + gap:] = rng.uniform(600.0, 700.0)
    for o, kind in zip(onsets, kinds):
        if kind == "frequency":  # a straggler: every step takes twice as long
            period[o:] *= 2.0
        elif kind == "level_shift":  # throttled / capped: the compute phase is clipped
            hi[o:] = rng.uniform(450.0, 500.0)
    inc = np.repeat(1.0 / (period * S) * (1.0 + rng.normal(0, 0.03, n)), S)
    phase = np.cumsum(inc) + rng.random()
    high = (phase % 1.0) < np.repeat(duty, S)
    sub = np.where(high, np.repeat(hi, S), np.repeat(lo, S))
    p = sub.reshape(n, S).mean(axis=1) + rng.normal(0, 6.0, n)
    stall = _events(rng, n, (120.0, 240.0), (3, 9))  # checkpoints: normal
    p = np.where(stall, 115.0 + rng.normal(0, 4.0, n), p)
    p = np.where(idle, 65.0 + rng.normal(0, 1.5, n), p)
    for o, kind in zip(onsets, kinds):
        if kind == "flatline":  # NCCL hang: every GPU spins in a collective until the watchdog
            s = _span(o, int(rng.integers(90, 180)), n)
            p[s] = 205.0 + rng.normal(0, 0.5, s.stop - s.start)
        elif kind == "dip":  # a checkpoint that takes ten times longer (slow storage)
            s = _span(o, int(rng.integers(50, 80)), n)
            p[s] = 115.0 + rng.normal(0, 4.0, s.stop - s.start)
    return ts, np.round(p, 1), onsets, None


def _inference(rng, n, dt, kinds, peak=800.0):
    ts = _grid(n, dt)
    h, dow = _hour(ts), _dow(ts)
    lam = peak * (0.2 + 0.8 * _diurnal(h, 15.0) ** 1.5) * np.where(dow >= 5, 0.8, 1.0)
    lam = lam * np.exp(_ar1(rng, n, 0.9, 0.03))
    onsets = _place(rng, n, len(kinds), gap=int(0.5 * DAY / dt))
    for o, kind in zip(onsets, kinds):
        if kind == "dip":  # an outage upstream, then the retry surge
            d = int(rng.integers(20, 40))
            lam[_span(o, d, n)] *= 0.05
            lam[_span(o + d, 10, n)] *= 1.3
        elif kind == "level_shift":  # a launch goes viral: new users for a few hours
            s = _span(o, int(rng.integers(180, 300)), n)
            lam[s] += rng.uniform(0.5, 0.8) * peak * np.minimum(1.0, np.arange(s.stop - s.start) / 5.0 + 0.2)
        elif kind == "seasonal":  # a load balancer pins this pool at its average share
            s = _span(o, int(rng.integers(300, 420)), n)
            lam[s] = peak * 0.55 * np.exp(rng.normal(0, 0.01, s.stop - s.start))
        elif kind == "spike":  # a bot
            lam[_span(o, int(rng.integers(1, 4)), n)] *= 3.0
    x = rng.poisson(lam * dt) / dt
    return ts, np.round(x, 2), onsets, None


def _sensor_base(rng, n, dt):
    ts = _grid(n, dt)
    h = _hour(ts)
    x = 24.0 + 1.5 * _diurnal(h, 15.0) + _ar1(rng, n, 0.95, 0.4)
    return ts, x


def _dropouts(rng, n, count, dur):
    mask = np.zeros(n, bool)
    for s, d in zip(rng.integers(0, n, count), rng.integers(dur[0], dur[1] + 1, count)):
        mask[s:s + d] = True
    return mask


def _sensor(rng, n, dt, kinds, quant=1.0):
    ts, x = _sensor_base(rng, n, dt)
    onsets = _place(rng, n, len(kinds), gap=int(0.5 * DAY / dt))
    for o, kind in zip(onsets, kinds):
        if kind == "trend":  # cooling fails: +1 degC per 10 min up to +10 degC, repaired hours later
            d = n - o
            u = np.arange(d) * dt
            fixed = float(rng.uniform(4.0, 6.0)) * 3600.0
            x[o:] += np.where(u < fixed, np.minimum(u / 600.0, 10.0), 10.0 * np.exp(-(u - fixed) / 1800.0))
    for j, (o, kind) in enumerate(zip(onsets, kinds)):
        if kind == "spike":  # DS18B20-class errors: 85 (power-on reset), -127 (disconnected)
            x[o] = 85.0 if j % 2 == 0 else -127.0
        elif kind == "flatline":  # the reading freezes
            x[_span(o, int(rng.integers(600, 900)), n)] = np.round(x[o - 1] / quant) * quant
    x = np.round(x / quant) * quant
    nan = _keep_out(_dropouts(rng, n, 8, (5, 60)), onsets, n)
    x[nan] = np.nan
    missing = _keep_out(_dropouts(rng, n, 8, (5, 120)), onsets, n) & ~nan
    return ts, x, onsets, ~missing


def _sensor_recal(rng, n, dt, kinds, quant=0.1, maintenance_gap=False):
    ts, x = _sensor_base(rng, n, dt)
    onsets = _place(rng, n, len(kinds), gap=100)
    sign = 1.0
    for o in onsets:  # the kinds are all level_shift: a recalibration moves the offset
        x[o:] += sign * rng.uniform(1.0, 2.5)
        sign = -sign
    x = np.round(x / quant) * quant
    if maintenance_gap and onsets:  # the sensor was off the wire for the calibration visit
        d = int(rng.integers(6, 20))
        x[onsets[0] - d:onsets[0]] = np.nan
    nan = _keep_out(_dropouts(rng, n, 4, (3, 20)), onsets, n)
    x[nan] = np.nan
    return ts, x, onsets, None


def _periodic(rng, n, dt, kinds, shape="sine", period=DAY, amp=10.0, noise=0.0):
    ts = _grid(n, dt)
    cyc = np.full(n, dt / period)
    gain = np.ones(n)
    per = int(period / dt)
    onsets = _place(rng, n, len(kinds), gap=3 * per)
    for o, kind in zip(onsets, kinds):
        if kind == "frequency":
            cyc[o:] *= 1.6
        elif kind == "variance":  # amplitude change
            gain[o:] *= 0.5
    phase = np.concatenate([[0.0], np.cumsum(cyc[:-1])]) + 0.25 * (shape == "square")
    frac = phase % 1.0
    if shape == "sine":
        x = amp * np.sin(2 * np.pi * frac)
    elif shape == "square":
        x = np.where(frac < 0.5, amp, -amp)
    else:  # sawtooth
        x = amp * (2 * frac - 1.0)
    x = gain * x
    for o, kind in zip(onsets, kinds):
        if kind == "seasonal":  # one cycle missing: the signal stays at its low
            x[_span(o, per, n)] = -amp * gain[o]
        elif kind == "flatline":
            x[_span(o, 2 * per, n)] = x[o - 1]
    if noise:
        x = x + rng.normal(0.0, noise, n)
    for o, kind in zip(onsets, kinds):
        if kind == "spike":
            x[_span(o, 3, n)] += 4.0 * amp
    return ts, x + 50.0, onsets, None


def _constant(rng, n, dt, kinds, value=1980.0, steps=(-225.0,)):
    ts = _grid(n, dt)
    x = np.full(n, value)
    onsets = _place(rng, n, len(kinds), gap=10)
    step_iter = iter(steps)
    for o, kind in zip(onsets, kinds):
        if kind == "level_shift":
            x[o:] += next(step_iter)
        elif kind == "spike":
            x[o] += 0.05 * value
        elif kind == "dip":
            x[o] -= 0.05 * value
    return ts, x, onsets, None


def _counter(rng, n, dt, kinds, rate=5e6):
    ts = _grid(n, dt)
    h = _hour(ts)
    r = rate * (0.3 + 0.7 * _diurnal(h, 15.0)) * np.exp(_ar1(rng, n, 0.8, 0.1))
    onsets = _place(rng, n, len(kinds), gap=300)
    for o, kind in zip(onsets, kinds):
        if kind == "trend":  # twice the traffic from now on: the slope changes
            r[o:] *= 2.5
        elif kind == "flatline":  # the process hangs: nothing is counted
            r[_span(o, int(rng.integers(120, 240)), n)] = 0.0
    inc = rng.poisson(r * dt / 1000.0) * 1000.0
    inc[0] = rng.integers(1, 1000) * 1e6
    c = np.cumsum(inc)
    for o, kind in zip(onsets, kinds):
        if kind == "level_shift":  # a restart resets the counter
            c[o:] -= c[o - 1]
    return ts, c, onsets, None


def _seasonal(rng, n, dt, kinds, details=(), low=20.0, high=80.0, noise=2.0):
    ts = _grid(n, dt)
    h = _hour(ts)
    up = (h >= 9.0) & (h < 18.0)
    lvl = np.where(up, high, low)
    per_day = int(DAY / dt)
    onsets = _place(rng, n, len(kinds), gap=per_day, slack=per_day)
    for j, (o, kind) in enumerate(zip(onsets, kinds)):
        detail = details[j]  # NAB's art_daily_* variants: jumpsup, jumpsdown, flatmiddle, nojump
        at = 0.0 if detail == "flatmiddle" else 9.0
        o = int(np.flatnonzero(np.abs(h[o:] - at) < 1e-9)[0]) + o
        onsets[j] = o
        s = _span(o, per_day, n)
        if detail == "jumpsup":
            lvl[s] = np.where(up[s], high + 0.5 * (high - low), low)
        elif detail == "jumpsdown":
            lvl[s] = np.where(up[s], high - 0.45 * (high - low), low)
        elif detail == "flatmiddle":
            lvl[s] = 0.5 * (high + low)
        else:
            lvl[s] = low
    return ts, lvl + rng.normal(0, noise, n), onsets, None


# ---- the corpus -------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    gen: Gen
    n: int
    dt: float
    kinds: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)
    note: str = ""


H = 3600.0
SPECS: tuple[Spec, ...] = (
    Spec("cpu_web_normal", "cpu", _cpu, 4032, 300, (), {}, "14 days, integer %"),
    Spec("cpu_batch_low_normal", "cpu", _cpu, 8064, 300, (), dict(quant=0.1, base=3.0, amp=5.0, noise=0.8),
         "an almost idle box, 0.1 % steps"),
    Spec("cpu_spike_shift", "cpu", _cpu, 6048, 300, ("spike", "level_shift")),
    Spec("cpu_stuck_noisy", "cpu", _cpu, 8064, 300, ("flatline", "variance"), dict(quant=0.1)),
    Spec("cpu_leak", "cpu", _cpu, 8064, 300, ("spike", "trend")),
    Spec("latency_normal", "latency", _latency, 10000, 60),
    Spec("latency_dependency", "latency", _latency, 8000, 60, ("spike", "level_shift")),
    Spec("latency_retry_storm", "latency", _latency, 10000, 60, ("variance", "dip"), dict(median=40.0, sigma=0.35)),
    Spec("latency_api", "latency", _latency, 6000, 60, ("dip", "spike", "variance"), dict(median=250.0)),
    Spec("net_normal", "throughput", _throughput, 8064, 300),
    Spec("net_backup_missed", "throughput", _throughput, 8064, 300, ("seasonal", "level_shift"),
         dict(shifts=("resync",))),
    Spec("net_link_down", "throughput", _throughput, 6048, 300, ("flatline",), dict(rate=35.0)),
    Spec("disk_renegotiated", "throughput", _throughput, 8064, 300, ("level_shift", "level_shift"),
         dict(rate=80.0, link=160.0, shifts=("resync", "cap"))),
    Spec("traffic_normal", "traffic", _traffic, 10000, 1800, (), {}, "208 days like nyc_taxi, DST shift"),
    Spec("traffic_holidays", "traffic", _traffic, 10000, 1800, ("seasonal", "seasonal", "dip")),
    Spec("traffic_event", "traffic", _traffic, 8000, 1800, ("spike", "seasonal"), dict(scale=4000.0)),
    Spec("traffic_competitor", "traffic", _traffic, 6000, 1800, ("dip", "level_shift"), dict(scale=800.0)),
    Spec("machine_temp_normal", "machine_temp", _machine_temp, 8000, 300),
    Spec("machine_temp_failure", "machine_temp", _machine_temp, 8000, 300, ("trend", "dip")),
    Spec("machine_temp_shutdown_failure", "machine_temp", _machine_temp, 9000, 300, ("dip", "trend", "dip"),
         dict(base=78.0)),
    Spec("gpu_power_normal", "gpu_power", _gpu_power, 8640, 10, (), {}, "one day of a training job"),
    Spec("gpu_power_churn_normal", "gpu_power", _gpu_power, 10000, 10, (), dict(churn=True), "five jobs, idle gaps"),
    Spec("gpu_power_hang", "gpu_power", _gpu_power, 8000, 10, ("flatline",)),
    Spec("gpu_power_throttle", "gpu_power", _gpu_power, 10000, 10, ("level_shift", "frequency")),
    Spec("gpu_power_slow_ckpt", "gpu_power", _gpu_power, 9000, 10, ("dip", "flatline")),
    Spec("inference_normal", "inference", _inference, 10000, 60, (), {}, "about 7 days"),
    Spec("inference_outage", "inference", _inference, 10000, 60, ("dip", "spike")),
    Spec("inference_viral", "inference", _inference, 5760, 60, ("level_shift",), dict(peak=300.0)),
    Spec("inference_pinned", "inference", _inference, 8640, 60, ("seasonal", "dip"), dict(peak=2000.0)),
    Spec("sensor_normal", "sensor", _sensor, 10000, 60, (), {}, "integer degC, NaN gaps, missing rows"),
    Spec("sensor_stuck", "sensor", _sensor, 10000, 60, ("flatline",)),
    Spec("sensor_bad_reads", "sensor", _sensor, 8000, 60, ("spike", "spike")),
    Spec("sensor_cooling_failure", "sensor", _sensor, 10000, 60, ("spike", "trend")),
    Spec("sensor_recal_normal", "sensor_recal", _sensor_recal, 6000, 300, (), {}, "0.1 degC, no recalibration"),
    Spec("sensor_recal_once", "sensor_recal", _sensor_recal, 6000, 300, ("level_shift",)),
    Spec("sensor_recal_twice", "sensor_recal", _sensor_recal, 8000, 300, ("level_shift", "level_shift")),
    Spec("sensor_recal_visit", "sensor_recal", _sensor_recal, 6000, 300, ("level_shift",),
         dict(maintenance_gap=True), "a dropout for the visit, then the step"),
    Spec("sine_normal", "periodic", _periodic, 4032, 300, (), {}, "daily sine, amplitude 10, noiseless"),
    Spec("square_normal", "periodic", _periodic, 5000, 60, (), dict(shape="square", period=H)),
    Spec("sawtooth_normal", "periodic", _periodic, 6000, 60, (), dict(shape="sawtooth", period=2 * H)),
    Spec("sine_noisy_normal", "periodic", _periodic, 4032, 300, (), dict(noise=1.0), "the same with noise sd 1"),
    Spec("sine_noisy_spike", "periodic", _periodic, 4032, 300, ("spike",), dict(noise=1.0),
         "issue 16's example: daily sine, amplitude 10, noise sd 1, 5 min, a 3-sample spike of +40"),
    Spec("sine_frequency", "periodic", _periodic, 4032, 300, ("frequency",)),
    Spec("square_missing_cycle", "periodic", _periodic, 5000, 60, ("seasonal", "flatline"),
         dict(shape="square", period=H)),
    Spec("sawtooth_amplitude", "periodic", _periodic, 6000, 60, ("variance",), dict(shape="sawtooth", period=2 * H)),
    Spec("constant_normal", "constant", _constant, 4000, 60),
    Spec("constant_step", "constant", _constant, 3000, 60, ("level_shift",), {}, "a GPU clock locked at 1980 MHz drops to 1755"),
    Spec("constant_step_back", "constant", _constant, 6000, 60, ("level_shift", "level_shift"),
         dict(value=64.0, steps=(16.0, -16.0)), "a fan at 64 %, set to 80 %, set back"),
    Spec("constant_blips", "constant", _constant, 2000, 10, ("spike", "dip"), dict(value=1410.0)),
    Spec("counter_normal", "counter", _counter, 10000, 60),
    Spec("counter_stall", "counter", _counter, 8000, 60, ("flatline",)),
    Spec("counter_rate_change", "counter", _counter, 8000, 60, ("trend",)),
    Spec("counter_reset", "counter", _counter, 10000, 10, ("level_shift", "flatline"), dict(rate=2e5)),
    Spec("art_daily_normal", "seasonal", _seasonal, 4032, 300),
    Spec("art_daily_jumps", "seasonal", _seasonal, 4032, 300, ("seasonal", "seasonal"),
         dict(details=("jumpsup", "jumpsdown"))),
    Spec("art_daily_flatmiddle", "seasonal", _seasonal, 4032, 300, ("seasonal",), dict(details=("flatmiddle",))),
    Spec("art_daily_nojump", "seasonal", _seasonal, 4032, 300, ("seasonal",), dict(details=("nojump",))),
)


def _make(spec: Spec, seed: int) -> Series:
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    kinds = list(spec.kinds)
    ts, x, onsets, keep = spec.gen(rng, spec.n, float(spec.dt), kinds, **spec.params)
    n = spec.n
    wins = []
    if onsets:
        L = window_length(n, len(onsets))
        lead = int(round(ONSET_AT * L))
        for o in onsets:
            a, b = o - lead, o - lead + L - 1
            if a < probation_length(n) or b >= n:
                raise AssertionError(f"{spec.name}: window {a}-{b} outside {probation_length(n)}-{n}")
            wins.append((float(ts[a]), float(ts[b])))
        for (_, b0), (a1, _) in zip(wins, wins[1:]):
            if a1 <= b0:
                raise AssertionError(f"{spec.name}: windows overlap")
    onset_ts = ts[np.asarray(onsets, np.int64)] if onsets else np.zeros(0)
    if keep is not None:
        if onsets and not keep[np.asarray(onsets)].all():
            raise AssertionError(f"{spec.name}: an onset row is missing")
        ts, x = ts[keep], x[keep]
    new_onsets = [int(i) for i in np.searchsorted(ts, onset_ts)]
    s = Series(spec.name, spec.family, float(spec.dt), ts.astype(np.float64), x.astype(np.float64),
               wins, new_onsets, kinds, spec.note)
    p = s.probation
    for (left, right), o in zip(s.window_bounds(), s.onsets):
        if not (p <= left <= o <= right):
            raise AssertionError(f"{spec.name}: onset {o} not in window {left}-{right} after probation {p}")
    return s


def corpus(seed: int = 16) -> list[Series]:
    """The whole labelled corpus, the same for the same seed."""
    return [_make(spec, seed) for spec in SPECS]


def families(series: Sequence[Series]) -> list[str]:
    out: list[str] = []
    for s in series:
        if s.family not in out:
            out.append(s.family)
    return out


# ---- NAB's early-detection metric --------------------------------------------------------

def scaled_sigmoid(y):
    """NAB's scaledSigmoid: 2 / (1 + exp(5 y)) - 1, and -1 for y >= 3 (vectorised)."""
    y = np.asarray(y, np.float64)
    with np.errstate(over="ignore"):
        out = np.where(y >= 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * y)) - 1.0)
    return out if out.ndim else float(out)


MAX_TP = scaled_sigmoid(-1.0)


@dataclass(eq=False)
class Sweep:
    """Per-row weights of one series (NAB's Sweeper.calcSweepScore): `weight[i]` is what a
    detection at row i is worth; `window[i]` is the window's number, -1 outside every
    window, -2 in the probationary part (not scored)."""

    weight: np.ndarray
    window: np.ndarray
    n_windows: int


def sweep(series: Series) -> Sweep:
    n = len(series.ts)
    weight = np.empty(n)
    window = np.full(n, -1, np.int64)
    bounds = series.window_bounds()
    i = np.arange(n, dtype=np.float64)
    prev_right, prev_width = None, None
    pos = 0
    for j, (left, right) in enumerate(bounds + [(n, n)]):
        out = slice(pos, min(left, n))  # rows before this window, after the previous one
        if prev_right is None:
            weight[out] = -A_FP * scaled_sigmoid(3.0)
        else:
            y = np.abs(prev_right - i[out]) / float(max(prev_width - 1, 1))
            weight[out] = -A_FP * scaled_sigmoid(y)
        if j == len(bounds):
            break
        width = right - left + 1
        y = -(right - i[left:right + 1] + 1) / float(width)
        weight[left:right + 1] = A_TP * scaled_sigmoid(y) / MAX_TP
        window[left:right + 1] = j
        prev_right, prev_width, pos = right, width, right + 1
    window[: series.probation] = -2
    scored = {int(w) for w in np.unique(window) if w >= 0}
    if scored != set(range(len(bounds))):
        raise ValueError(f"{series.name}: a window lies in the probationary part")
    return Sweep(weight, window, len(bounds))


def _clean(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    return np.where(np.isfinite(s), s, -np.inf)


def series_score(scores: np.ndarray, sw: Sweep, threshold: float) -> dict:
    """Raw NAB score of one series at a threshold, with tp/fn (windows) and fp (rows)."""
    s = _clean(scores)
    det = s >= threshold
    fp_rows = det & (sw.window == -1)
    raw = float(sw.weight[fp_rows].sum())
    tp = 0
    for j in range(sw.n_windows):
        hits = np.flatnonzero(det & (sw.window == j))
        if hits.size:
            raw += float(sw.weight[hits[0]])
            tp += 1
        else:
            raw += A_FN
    return {"raw": raw, "tp": tp, "fn": sw.n_windows - tp, "fp": int(fp_rows.sum()), "windows": sw.n_windows}


def _normalized(raw: float, windows: int) -> float:
    null, perfect = A_FN * windows, A_TP * windows
    return 100.0 * (raw - null) / (perfect - null) if windows else float("nan")


def optimize_threshold(sweeps: Sequence[Sweep], scores: Sequence[np.ndarray], quantiles: int = 1000):
    """The corpus-wide threshold with the highest raw score, and the (thresholds, raw) curve.
    Ties go to the higher threshold; inf is 'raise nothing'."""
    fp_s, fp_w, win_pm, win_w, all_s = [], [], [], [], []
    for sw, sc in zip(sweeps, scores):
        s = _clean(sc)
        scored = sw.window != -2
        all_s.append(s[scored & np.isfinite(s)])
        out = sw.window == -1
        fp_s.append(s[out])
        fp_w.append(sw.weight[out])
        for j in range(sw.n_windows):
            rows = np.flatnonzero(sw.window == j)
            win_pm.append(np.maximum.accumulate(s[rows]))
            win_w.append(sw.weight[rows])
    every = np.concatenate(all_s) if all_s else np.zeros(0)
    cand = [np.array([np.inf])]
    cand += [pm[np.isfinite(pm)] for pm in win_pm]
    if every.size:
        cand.append(np.quantile(every, np.linspace(0.0, 1.0, quantiles + 1)))
    thr = np.unique(np.concatenate(cand))[::-1]  # descending
    fs = np.concatenate(fp_s) if fp_s else np.zeros(0)
    fw = np.concatenate(fp_w) if fp_w else np.zeros(0)
    order = np.argsort(fs, kind="stable")
    fs, fw = fs[order], fw[order]
    suffix = np.concatenate([np.cumsum(fw[::-1])[::-1], [0.0]])
    raw = suffix[np.searchsorted(fs, thr, "left")]
    for pm, w in zip(win_pm, win_w):
        j = np.searchsorted(pm, thr, "left")
        raw = raw + np.where(j < pm.size, w[np.minimum(j, pm.size - 1)], A_FN)
    best = int(np.argmax(raw))  # thr descending: the first maximum is the highest threshold
    return float(thr[best]), thr, raw


@dataclass
class Result:
    threshold: float
    normalized: float
    raw: float
    null: float
    perfect: float
    tp: int
    fp: int
    fn: int
    families: dict[str, dict]
    series: dict[str, dict]


def evaluate(series: Sequence[Series], scores: Sequence[np.ndarray], threshold: float | None = None,
             sweeps: Sequence[Sweep] | None = None) -> Result:
    """NAB score of a detector's scores over the corpus, at `threshold` or at the optimal one."""
    if len(series) != len(scores):
        raise ValueError("one score array per series")
    for s, sc in zip(series, scores):
        if np.shape(sc) != s.ts.shape:
            raise ValueError(f"{s.name}: one score per point")
    sweeps = list(sweeps) if sweeps is not None else [sweep(s) for s in series]
    if threshold is None:
        threshold, _, _ = optimize_threshold(sweeps, scores)
    per = {s.name: series_score(sc, sw, threshold) | {"family": s.family} for s, sc, sw in zip(series, scores, sweeps)}
    fams: dict[str, dict] = {}
    for s in series:
        r, f = per[s.name], fams.setdefault(s.family, {"series": 0, "raw": 0.0, "tp": 0, "fp": 0, "fn": 0, "windows": 0})
        f["series"] += 1
        for key in ("raw", "tp", "fp", "fn", "windows"):
            f[key] += r[key]
    for f in fams.values():
        f["normalized"] = _normalized(f["raw"], f["windows"])
    windows = sum(sw.n_windows for sw in sweeps)
    raw = sum(r["raw"] for r in per.values())
    return Result(threshold, _normalized(raw, windows), raw, A_FN * windows, A_TP * windows,
                  sum(r["tp"] for r in per.values()), sum(r["fp"] for r in per.values()),
                  sum(r["fn"] for r in per.values()), fams, per)


# ---- NAB's windowed-Gaussian baseline ----------------------------------------------------

@vectorize(["float64(float64)"], cache=True)
def _erfc(x):
    """math.erfc as a numpy ufunc (numpy has none)."""
    return math.erfc(x)


def windowed_gaussian(ts: np.ndarray, values: np.ndarray, window: int = 6400, step: int = 100) -> np.ndarray:
    """NAB's windowedGaussian detector: 1 - Q(|x - mean| / std) against the preceding values."""
    ts = np.asarray(ts, np.float64)
    values = np.asarray(values, np.float64)
    order = np.argsort(ts, kind="stable")
    x = values[order]
    ok = np.isfinite(x)
    xf = x[ok]
    m = xf.shape[0]
    sf = np.zeros(m)
    if m > 1:
        i = np.arange(m)
        mean = np.zeros(m)
        std = np.ones(m)
        grow = (i >= 1) & (i <= window)  # scored against xf[0:i]
        c = xf[0]
        d = xf - c
        s1 = np.concatenate([[0.0], np.cumsum(d)])
        s2 = np.concatenate([[0.0], np.cumsum(d * d)])
        g = i[grow]
        mu = s1[g] / g
        mean[grow] = mu + c
        std[grow] = np.sqrt(np.maximum(s2[g] / g - mu * mu, 0.0))
        for k, lo in enumerate(range(0, max(m - window, 0), step)):  # then a slide every `step`
            rows = slice(window + k * step, min(m, window + (k + 1) * step))
            w = xf[lo:lo + window]
            mean[rows], std[rows] = w.mean(), w.std()
        std = np.where(std == 0.0, 1e-6, std)
        z = np.abs(xf - mean) / std
        sf = 1.0 - 0.5 * _erfc(z / math.sqrt(2.0))
        sf[0] = 0.0
    score = np.zeros(x.shape[0])
    score[ok] = sf
    out = np.empty_like(score)
    out[order] = score
    return out


def summary(series: Sequence[Series]) -> str:
    lines = [f"{'family':<13} {'series':>6} {'normal':>6} {'windows':>7} {'points':>8}  intervals  kinds"]
    for fam in families(series):
        ss = [s for s in series if s.family == fam]
        kinds = sorted({k for s in ss for k in s.kinds})
        ivs = sorted({int(s.interval) for s in ss})
        lines.append(f"{fam:<13} {len(ss):>6} {sum(not s.windows for s in ss):>6} "
                     f"{sum(len(s.windows) for s in ss):>7} {sum(len(s.ts) for s in ss):>8}  "
                     f"{','.join(f'{v}s' for v in ivs):<9}  {' '.join(kinds)}")
    lines.append(f"{'total':<13} {len(series):>6} {sum(not s.windows for s in series):>6} "
                 f"{sum(len(s.windows) for s in series):>7} {sum(len(s.ts) for s in series):>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(corpus()))
