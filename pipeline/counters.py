"""Energy counters (a GPU's, a PDU's, the site meter's): the mean power between two readings.

A power reading is an instant. Read every 30 s (dcgm-exporter under Prometheus, a BMS's poll),
one instant of a training job that swings between compute and communication is a poor
stand-in for the 30 s around it; the energy counted between two readings gives their mean
exactly, where it can be trusted: read `MEAN_AFTER_S` apart or more (closer, the instant is
as good), the energy between `COUNTER_STEPS` of the counter's steps or more (a 0.1 kWh
counter read every 30 s is +-20%), and the mean plausible against the instants at both ends
(a counter that went back, was reset, or stood still: a BMS resending a cached value)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MEAN_AFTER_S = 5.0    # readings this far apart or more: the counter's mean, not the instant ...
COUNTER_STEPS = 50.0  # ... where the energy between them is this many of the counter's steps (2%) or more
PLAUSIBLE = 4.0       # ... and the mean within this factor of the instants at both ends
# The steps a counter's readings can come in (J): 1 mJ to 1 MWh, in decades of J and of Wh.
STEPS_J = np.sort(np.concatenate([10.0 ** np.arange(-3, 10), 3.6 * 10.0 ** np.arange(0, 10)]))[::-1]


def counter_step_j(readings: np.ndarray) -> np.ndarray:
    """The coarsest step each reading of an energy counter is a whole number of (J; 0: finer
    than 1 mJ; NaN for 0 or no reading, which tell nothing): a counter's resolution is the finest of these
    over its readings (a reading on a coarser step is one by chance)."""
    readings = np.asarray(readings, np.float64)
    n = np.round(readings[:, None] / STEPS_J[None, :])
    off_j = np.abs(readings[:, None] - n * STEPS_J[None, :])
    whole = (n != 0) & (off_j <= 1e-12 * np.abs(readings[:, None]) + 1e-9)  # (to the float's precision)
    step = np.where(whole.any(axis=1), STEPS_J[np.argmax(whole, axis=1)], 0.0)
    return np.where((readings == 0) | ~np.isfinite(readings), np.nan, step)


def interval_mean_w(energy_j, span_s, step_j, before_w, instant_w) -> np.ndarray:
    """The mean power over each span from the energy counted in it (`energy_j` over `span_s`),
    NaN where the instant is the better reading or the counter cannot be trusted (the module
    doc): `step_j` the counter's resolution (NaN: not known), `before_w` and `instant_w` the
    power read at the span's start (NaN: none) and at its end."""
    energy_j, span_s = np.asarray(energy_j, np.float64), np.asarray(span_s, np.float64)
    instant_w = np.asarray(instant_w, np.float64)
    before_w = np.where(np.isnan(before_w), instant_w, before_w)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_w = energy_j / span_s
        ok = ((span_s >= MEAN_AFTER_S) & (energy_j >= COUNTER_STEPS * np.asarray(step_j, np.float64))
              & (mean_w >= np.fmin(before_w, instant_w) / PLAUSIBLE)
              & (mean_w <= PLAUSIBLE * np.fmax(before_w, instant_w)))
    return np.where(ok, mean_w, np.nan)


def step_mean(energy_j, energy_t, taken_j, taken_t, step_j, before_w, before_t, instant_w, t):
    """A power reading, `instant_w` at `t` (the one before it: `before_w` at `before_t`), and the
    counter's latest reading, `energy_j` at `energy_t`: (the power the span since the counter
    reading last taken stands for, the counter reading taken now). The counter's mean where it
    came with this power reading (in the same batch or before it, within a quarter of the
    interval) and can be trusted (`interval_mean_w`), else the instant; a power reading that
    came without its counter leaves the last one taken, and the next spans both. Times in s."""
    interval_s = np.nan_to_num(np.asarray(t, np.float64) - before_t, nan=0.0)
    fresh = np.abs(np.asarray(energy_t, np.float64) - t) <= np.maximum(0.5, 0.25 * interval_s)
    mean_w = interval_mean_w(np.asarray(energy_j, np.float64) - taken_j, np.asarray(energy_t, np.float64) - taken_t,
                             step_j, before_w, instant_w)
    power_w = np.where(fresh & np.isfinite(mean_w), mean_w, instant_w)
    return power_w, (np.where(fresh, energy_j, taken_j), np.where(fresh, energy_t, taken_t))


@dataclass
class Counter:
    """One device's energy counter as its power readings take it (a site meter, a PDU)."""
    energy_j: float = math.nan   # its latest reading, at ...
    energy_t: float = math.nan   # ... (unix s)
    step_j: float = math.nan     # its resolution (counter_step_j)
    taken: tuple[float, float] = (math.nan, math.nan)  # the reading the last power reading took (J, unix s)
    power: tuple[float, float] = (math.nan, math.nan)  # the last power reading (W, unix s)

    def count(self, energy_j: float, t: float) -> None:
        if t <= self.energy_t:
            return  # (a reading resent, or late behind a newer one)
        self.energy_j, self.energy_t = energy_j, t
        self.step_j = float(np.fmin(self.step_j, counter_step_j(np.array([energy_j]))[0]))

    def mean_w(self, instant_w: float, t: float) -> float:
        """The power this reading stands for since the one before (`step_mean`)."""
        power_w, taken = step_mean(self.energy_j, self.energy_t, *self.taken, self.step_j, *self.power, instant_w, t)
        self.taken, self.power = (float(taken[0]), float(taken[1])), (instant_w, t)
        return float(power_w)
