"""Each GPU's power -> throughput curve, learned online from the fleet's own samples.

A cap costs a job what its compute loses only where its work waits on compute: a
compute-bound job (training, prefill) keeps the recorded H100's share of its work
(power/curve.py), a memory-bound one (decode) much more, because a lower SM clock barely
touches the HBM's bandwidth. The planner (power/planner.py) models a job by its
sensitivity s, the compute-bound share of its time: held to a compute rate r (the curve
at the capped power over the curve at its draw), it keeps w = 1 / (s / r + 1 - s) of its
work. Every GPU starts at s = 1, the recorded curve: the most a cap can cost, so a class's
bound holds before anything is learned.

What the samples show under a cap: the power the GPU holds (so r, from the curve) and its
memory utilisation, the share of time the HBM is busy. A job moves the same bytes per unit
of work, so util_mem under the cap over util_mem before it is w, the work it keeps. From
1 / w - 1 = s (1 / r - 1), each sample is a point (x, y) = (1/r - 1, 1/w - 1) on a line
through 0 of slope s; `CurveLearner` fits the slope per GPU by least squares, with the
prior s = 1 as `PRIOR_WEIGHT` pseudo-samples, from:

  - the reference: an exponential mean of the GPU's draw and util_mem while it is busy and
    not held by a cap (none below its default, or one it draws `NOT_BINDING_W` under): the
    job's own uncapped behaviour;
  - the points: samples busy, under a cap, drawing at least `MIN_SHED` below the reference
    (the cap binds; otherwise r is 1 and the sample says nothing);
  - a new job: a GPU that goes idle forgets its reference and its fit (the next job is
    another's). A GPU whose job starts under a cap has no reference, and stays at s = 1.

`sensitivity()` is the fit, `upper()` the fit plus its uncertainty (the planner's: a
class's bound is a promise about work, so it rests on the pessimistic side). Batch at a
time: each GPU batch is a few vector operations, whatever the fleet's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.power.curve import PowerCurve

PRIOR_WEIGHT = 0.05   # the prior s = 1, as pseudo-samples at x = 0.22 (a 700 -> 500 W cap's)
REF_SAMPLES = 30      # the reference's exponential mean of util_mem spans about this many samples (its
                      # integer percent needs them) ...
REF_POWER_SAMPLES = 5  # ... of the draw, these (a job whose load steps is followed within seconds)
MIN_REF = 5           # samples of reference before a capped one counts
MIN_SHED = 0.03       # a cap binds when the draw is this share below the reference
NOT_BINDING_W = 10.0  # a GPU drawing this far under its limit is not held by it (the simulator's and
                      # the recorded H100's hold 1-4 W under)
NOISE_Y = 0.03        # util_mem's resolution (an integer percent of ~34%) as an error on y
IDLE_UTIL = 0.05      # (power/planner.py's: under it a GPU does no work, and its job is over)


@dataclass
class CurveLearner:
    """Per GPU slot (the caller's indices, grown with `grow`): the sensitivity learned so far."""
    curve: PowerCurve
    ref_power: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref_mem: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref_n: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sxx: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sxy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    points: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def grow(self, n: int) -> None:
        extra = n - self.ref_n.size
        if extra > 0:
            for name in ("ref_power", "ref_mem", "ref_n", "sxx", "sxy", "points"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(extra)]))

    def observe(self, slots: np.ndarray, power_w: np.ndarray, util: np.ndarray, util_mem: np.ndarray,
                limit_w: np.ndarray, default_w: float) -> None:
        """One batch of samples: per row its GPU's slot, draw, utilisation, memory utilisation
        and enforced limit (NaN where unknown); `default_w` the GPUs' default limit."""
        self.grow(int(slots.max()) + 1 if slots.size else 0)
        power = np.asarray(power_w, np.float64)
        util = np.nan_to_num(np.asarray(util, np.float64))
        mem = np.nan_to_num(np.asarray(util_mem, np.float64))
        limit = np.nan_to_num(np.asarray(limit_w, np.float64), nan=default_w)
        ok = np.isfinite(power)
        idle = ok & (util < IDLE_UTIL)
        if idle.any():  # the job is over: the next one is learned afresh
            gone = slots[idle]
            for a in (self.ref_power, self.ref_mem, self.ref_n, self.sxx, self.sxy, self.points):
                a[gone] = 0.0
        busy = ok & ~idle
        capped = limit < default_w - 0.5
        free = busy & (~capped | (power < limit - NOT_BINDING_W)) & (mem > 0)
        if free.any():
            s = slots[free]
            n = self.ref_n[s] + 1.0
            a = np.maximum(1.0 / n, 1.0 / REF_POWER_SAMPLES)
            self.ref_power[s] += a * (power[free] - self.ref_power[s])
            a = np.maximum(1.0 / n, 1.0 / REF_SAMPLES)
            self.ref_mem[s] += a * (mem[free] - self.ref_mem[s])
            self.ref_n[s] = n
        known = busy & capped & (self.ref_n[slots] >= MIN_REF)
        ref_p = self.ref_power[slots]
        held = known & (power < (1.0 - MIN_SHED) * ref_p)
        if held.any():
            s = slots[held]
            at_ref = self.curve.at(ref_p[held])
            r = np.clip(self.curve.at(power[held]) / np.where(at_ref > 0, at_ref, 1.0), 1e-3, 1.0)
            w = np.clip(mem[held] / self.ref_mem[s], 1e-3, 1.0)
            x, y = 1.0 / r - 1.0, 1.0 / w - 1.0
            np.add.at(self.sxx, s, x * x)
            np.add.at(self.sxy, s, x * y)
            np.add.at(self.points, s, 1.0)

    def sensitivity(self, slots: np.ndarray | None = None) -> np.ndarray:
        """The least-squares slope with the prior, in [0, 1]."""
        sl = slice(None) if slots is None else slots
        return np.clip((PRIOR_WEIGHT + self.sxy[sl]) / (PRIOR_WEIGHT + self.sxx[sl]), 0.0, 1.0)

    def upper(self, slots: np.ndarray | None = None) -> np.ndarray:
        """The fit plus two standard errors (util_mem's resolution over the points' spread)."""
        sl = slice(None) if slots is None else slots
        err = NOISE_Y / np.sqrt(PRIOR_WEIGHT + self.sxx[sl])
        return np.clip(self.sensitivity(slots) + 2.0 * err, 0.0, 1.0)
