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

  - the reference: the job's own uncapped behaviour, while the GPU is busy and no cap is
    set below its default: util_mem's exponential mean over the samples at its demand (the
    phase a cap holds: a training job computing), and the distribution of its draw
    (a histogram whose weights fade over `DEMAND_S`, its bins in the curve's watts:
    a GPU whose own limit is not the curve's is stretched to it, as the planner reads it).
    A training job draws near its limit while it computes and far under it while its GPUs
    communicate (every 15-45 s, in lockstep); an inference job's draw moves with its requests. What a cap takes from a
    GPU it holds is what that GPU would draw now: its draw above the cap
    (`demand_above`), not its mean or its last sample. A load that steps up (its last few
    samples' mean `STEP_UP` of the default limit above the distribution's upper half: a
    new job, a bigger batch) starts the distribution and util_mem's mean afresh. Under a cap
    the reference stays as it was (the draw shows only what the cap allows, and a job's
    communication phases under it would pull the distribution down to them); a load that
    rises under its cap is found by the controller (`Controller._rose`) and learned afresh. Read 5 s apart or more, the readings
    give the distribution's shape and the energy counter its level (`level_w`, the mean of
    the scrapes busy and uncapped from end to end, faded with the readings): read every 30 s,
    a job whose step is a multiple of the scrape is read in one phase only, or in one more
    often than it runs, and its readings alone had put a job drawing 590 W on average at
    330 W. Readings on both sides of the level are weighed to it (`_levelled`); readings all
    on one side are bounded by it (`shed_over`, `duty`);
  - the points: samples busy and held by a cap at least `MIN_SHED` below the reference:
    with the SW power cap clock reason 0x4 where the source sends clock reasons, else
    drawing within `NOT_BINDING_W` of the limit the GPU enforces. A sample under its cap is
    not held by it: a training job communicating draws far under its cap at full speed,
    and counted, it read as a cap that cost nothing (a job of s 0.97 learned at 0.17); one
    whose communication draws the cap's watts by itself is within `NOT_BINDING_W` of it, and
    only its clock reasons tell (a job of s 0.95 learned at 0.14-0.20 at 30-s scrapes), as they
    tell of a part that settles further under its cap. The draw and util_mem are means over the
    second before a reading, the reason the instant's: a point needs the cap held at the reading
    before too (read 2 s apart or less) and a draw within `NOT_BINDING_W` of the least its job's
    held samples drew under their limit, and a point far under a fit of `FIRM_POINTS` or more
    (a phase the reference does not describe) does not count;
  - a new job: a GPU that goes idle forgets its reference and its fit (the next job is
    another's), unless its job only paused: idle with its memory still held (a training
    job writing a checkpoint stalls its GPUs for tens of seconds; a job that ends frees its
    memory), and one whose samples name another job (the scheduler's, `new_job`), busy or
    not. A GPU whose job starts under a cap has no reference, and stays at s = 1.

`sensitivity()` is the fit, `upper()` the fit plus its uncertainty, from the points' own
scatter and their number (the planner's: a class's bound is a promise about work, so it
rests on the pessimistic side). Batch at a
time: each GPU batch is a few vector operations, whatever the fleet's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.power.curve import PowerCurve

# Spans are in seconds, so that a fleet scraped every 30 s (dcgm-exporter under Prometheus) learns
# in the same time as one sampled every second; each also needs a least number of samples, which
# a slow scrape reaches later (`span_weight`).
PRIOR_WEIGHT = 0.05   # the prior s = 1, as pseudo-samples at x = 0.22 (a 700 -> 500 W cap's)
REF_SAMPLES = 30      # the reference's exponential mean of util_mem spans about this many samples (its
                      # integer percent needs them, whatever their interval) ...
DEMAND_S = 120.0      # ... its draw's distribution, this long: several training steps (15-45 s), and a
DEMAND_MIN = 20       # job whose load moved for good is followed within minutes; and at least this many
                      # samples (its upper half and its duty need them)
STEP_UP = 0.1         # (a share of the default limit: 70 W on an H100)
RECENT_S = 5.0        # the last few seconds' exponential mean, that shows a step (2 samples at least)
DEMAND_BINS = 64      # the distribution's resolution: 64 bins up to 1.1x the GPU's own limit (12 W on an H100)
MIN_REF_S = 5.0       # seconds of reference before a capped sample counts (2 samples at least)
MIN_SHED = 0.03       # a cap binds when the draw is this share below the reference
NOT_BINDING_W = 10.0  # a GPU drawing this far under its limit is not held by it (the simulator's and
                      # the recorded H100's hold 1-4 W under)
IDLE_SHARE = 0.1      # a GPU's idle draw, as a share of its limit (an H100's 70 W of 700)
STEADY_UNDER = 0.05   # a job that drew under a cap this share of its reference or less never drew under it
SHED_NOISE_W = 10.0   # a scrape's mean draw is this uncertain as a measure of the phases it held (W)
NOISE_Y = 0.03        # util_mem's resolution (an integer percent of ~34%) as an error on y
HELD_THROUGH_S = 2.0  # readings this close: a point needs the cap to have held at the one before too
FIRM_POINTS = 8       # a fit on this many points or more takes no point this many of its errors ...
UNDER_FIT_ERRORS = 4.0  # ... under it, at the point's x (`observe`: a cap far cheaper than the points say)
IDLE_UTIL = 0.05      # (power/planner.py's: under it a GPU does no work, and its job is over)


def held_by_cap(power_w, limit_w, cap_reason=None) -> np.ndarray:
    """Whether a cap holds each GPU: its SW power cap clock reason (0x4: 1 set, 0 clear) where
    its source sends clock reasons (NaN, or None: not sent), else its draw within NOT_BINDING_W
    of the limit. Only the reason tells a part that settles further under its cap, or a training
    job communicating at the cap's watts by itself (not held: at full speed)."""
    at = np.asarray(power_w, np.float64) >= np.asarray(limit_w, np.float64) - NOT_BINDING_W
    if cap_reason is None:
        return at
    reason = np.asarray(cap_reason, np.float64)
    return np.where(np.isnan(reason), at, reason > 0)


def student_t975(df: np.ndarray) -> np.ndarray:
    """Student's t 97.5% quantile for `df` degrees of freedom (Cornish-Fisher's first terms:
    within 1% from df 5, 4% under at df 3, 3.9 at 2 and 7.2 at 1 for 4.3 and 12.7); 2 with none.
    (numpy has no t quantile, and scipy would be a dependency for one line.)"""
    z = 1.959964
    d = np.maximum(np.asarray(df, np.float64), 1.0)
    t = z + (z ** 3 + z) / (4.0 * d) + (5.0 * z ** 5 + 16.0 * z ** 3 + 3.0 * z) / (96.0 * d * d)
    return np.where(np.asarray(df) >= 1.0, t, 2.0)


def span_weight(dt_s, span_s: float, min_samples: float) -> np.ndarray:
    """What one sample counts for in a mean over `span_s` seconds: its interval's share of the
    span (`dt_s`, the seconds since its GPU's sample before), at most 1 / `min_samples` (a mean
    needs that many samples, however slow the scrape)."""
    return np.minimum(np.asarray(dt_s, np.float64) / span_s, 1.0 / min_samples)


def span_seconds(dt_s, span_s: float) -> np.ndarray:
    """What one sample adds to a duration that must last `span_s`: its interval, at most half
    the span (two samples in a row at least: one 30-s scrape may catch any phase of a job)."""
    return np.minimum(np.asarray(dt_s, np.float64), span_s / 2)


def _tilted(theta: np.ndarray, z: np.ndarray, log_w: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Weights exp(log_w + theta z), normalised per row (bins not `seen`: 0)."""
    a = np.where(seen, log_w + theta * z, -np.inf)
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class CurveLearner:
    """Per GPU slot (the caller's indices, grown with `grow`): the sensitivity learned so far."""
    curve: PowerCurve
    draw: np.ndarray = field(default_factory=lambda: np.zeros((0, DEMAND_BINS), np.float32))  # per slot: the
                                                    # weights of its uncapped draw's bins ...
    draw_w: np.ndarray = field(default_factory=lambda: np.zeros((0, DEMAND_BINS), np.float32))  # ... and their
                                                    # weighted sums of watts (a bin's mean, not its centre)
    recent: np.ndarray = field(default_factory=lambda: np.zeros(0))    # per slot: its draw's recent mean
    ref_mem: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref_n: np.ndarray = field(default_factory=lambda: np.zeros(0))    # per slot: samples of reference ...
    ref_s: np.ndarray = field(default_factory=lambda: np.zeros(0))    # ... and their seconds (span_seconds)
    sxx: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sxy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    syy: np.ndarray = field(default_factory=lambda: np.zeros(0))    # (the points' scatter about the fit: `upper`)
    points: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stretch: np.ndarray = field(default_factory=lambda: np.ones(0))  # per slot: the curve's watts per watt of
                                                    # its own limit (planner.GpuPower.stretch): its bins and rates
    level_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))   # per slot: its scrapes' mean draws by the
    level_mass: np.ndarray = field(default_factory=lambda: np.zeros(0))  # energy counter, weighted and faded as the
                                                    # distribution's samples are (`level_w`), and their weight
    was_free: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per slot: its last sample busy, uncapped
    was_held: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per slot: its last sample held at its
                                                    # limit (held_by_cap: a cap's or its own)
    held_gap: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per slot: the least a held sample of its job
                                                    # drew under its limit (W; inf: none yet)
    # `_levelled`'s per slot, worked out when first read after the slot's last sample (`fresh`)
    tilted_p: np.ndarray = field(default_factory=lambda: np.zeros((0, DEMAND_BINS)), repr=False)
    tilted_inside: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)
    tilted_level: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    fresh: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)

    def __post_init__(self) -> None:
        self.bin_w = 1.1 * self.curve.max_limit_w / DEMAND_BINS
        self.edges = (np.arange(DEMAND_BINS) + 1) * self.bin_w  # each bin's upper edge

    def grow(self, n: int) -> None:
        extra = n - self.ref_n.size
        if extra > 0:
            for name in ("recent", "ref_mem", "ref_n", "ref_s", "sxx", "sxy", "syy", "points", "level_sum", "level_mass"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(extra)]))
            self.stretch = np.concatenate([self.stretch, np.ones(extra)])
            self.was_free = np.concatenate([self.was_free, np.zeros(extra, bool)])
            self.was_held = np.concatenate([self.was_held, np.zeros(extra, bool)])
            self.held_gap = np.concatenate([self.held_gap, np.full(extra, np.inf)])
            self.fresh = np.concatenate([self.fresh, np.zeros(extra, bool)])
            self.tilted_inside = np.concatenate([self.tilted_inside, np.zeros(extra, bool)])
            self.tilted_level = np.concatenate([self.tilted_level, np.full(extra, np.nan)])
            self.tilted_p = np.concatenate([self.tilted_p, np.zeros((extra, DEMAND_BINS))])
            self.draw = np.concatenate([self.draw, np.zeros((extra, DEMAND_BINS), np.float32)])
            self.draw_w = np.concatenate([self.draw_w, np.zeros((extra, DEMAND_BINS), np.float32)])

    def referenced(self, slots: np.ndarray | None = None) -> np.ndarray:
        """Per GPU: its job's uncapped draw is known (MIN_REF_S of reference), so a cap's cost and
        what it sheds can be judged against it."""
        sl = slice(None) if slots is None else slots
        return self.ref_s[sl] >= MIN_REF_S

    def demand(self, slots: np.ndarray | None = None) -> np.ndarray:
        """What each GPU's job draws when it draws: the mean of the upper half of its uncapped
        draw (a training job's compute phase; 0 without a reference)."""
        sl = np.arange(self.ref_n.size) if slots is None else np.asarray(slots)
        out = self._readings_demand(sl)
        rows, p, watts, inside, level = self._levelled(sl)
        if rows.size:
            cum = np.cumsum(p, axis=1)
            out[rows] = np.where(inside, self._weighted(p, watts, cum > 0.5 * cum[:, -1:]), np.fmax(out[rows], level))
        return out

    def _readings_demand(self, slots) -> np.ndarray:
        """`demand()` by the readings alone (a step up is one above them: the level moves later)."""
        cum = np.cumsum(self.draw[slots], axis=1)
        return self._mean(slots, cum > 0.5 * cum[:, -1:])

    def duty(self, demand: np.ndarray, default_w: float | np.ndarray) -> np.ndarray:
        """The share of the time each GPU draws its `demand` (`demand()`, within `STEP_UP` of the
        default limit under it): about 1 for a steady job, the compute share of a training job's
        step; 1 without a reference, or where its readings all lie under its level (taken then); where
        they all lie over it, at most the share of the time its level allows at the demand."""
        w = self.draw
        total = w.sum(axis=1, dtype=np.float64)
        floor = np.broadcast_to(demand - STEP_UP * np.asarray(default_w, np.float64), total.shape)
        near = self.edges[None, :] > (floor * self.stretch)[:, None]
        out = np.divide(np.sum(w * near, axis=1, dtype=np.float64), total, out=np.ones(total.size), where=total > 0)
        rows, p, watts, inside, level = self._levelled(np.arange(total.size))
        if rows.size:
            # Readings all under the level: the level all the time; all over it: at most the share of the time
            # the level allows at the demand above idle.
            idle = IDLE_SHARE * self.curve.max_limit_w / self.stretch[rows]
            d = np.asarray(demand, np.float64)[rows]
            allowed = np.clip((level - idle) / np.fmax(d - idle, 1.0), 0.0, 1.0)
            readings_w = np.sum(p * watts, axis=1)
            one_sided = np.where(readings_w < level, 1.0, np.minimum(out[rows], allowed))
            out[rows] = np.where(inside, np.sum(p * (watts > floor[rows, None]), axis=1), one_sided)
        return out

    def demand_above(self, slots: np.ndarray, level_w: np.ndarray) -> np.ndarray:
        """What each GPU would draw, uncapped, when its draw is at least `level_w` (a cap holds
        it there): its uncapped draw's mean above the level; the level itself where its job
        never drew that much (what the cap takes is then not known, and not credited), at least
        its energy counter's level where its readings lie all under it (`_levelled`)."""
        level = np.asarray(level_w, np.float64)
        out = np.fmax(self._mean(slots, self.edges[None, :] > (level * self.stretch[slots])[:, None]), level)
        rows, p, watts, inside, counted = self._levelled(slots)
        if rows.size:
            at = np.broadcast_to(level, out.shape)[rows]
            # (a mean above any level is at least the whole mean, the counter's)
            out[rows] = np.where(inside, np.fmax(self._weighted(p, watts, watts > at[:, None]), at),
                                 np.fmax(out[rows], counted))
        return out

    def level_w(self, slots=slice(None)) -> np.ndarray:
        """Each GPU's uncapped draw's mean by its energy counter (NaN: not known). Read 5 s apart or
        more, its readings give its draw's shape and the counter its level: a mean holds every phase of
        the scrape, a reading one instant. Known while its scrapes' weight is at least half its readings'
        (a fleet back at 1 s, or a counter no longer trusted, lets it fade with them)."""
        mass = self.level_mass[slots]
        known = (mass > 0) & (mass >= 0.5 * self.draw[slots].sum(axis=1, dtype=np.float64))
        return np.divide(self.level_sum[slots], mass, out=np.full(mass.shape, np.nan), where=known)

    def _levelled(self, slots: np.ndarray):
        """The GPUs of `slots` whose level is known: (their indices in `slots`; per bin, the weight and
        watts of their draw's distribution; whether their readings lie on both sides of the level; the
        level). Readings on both sides: their distribution tilted to the level (the least change that
        gives that mean: exponential tilting; a job of two levels read in either phase too often comes
        out exact). All on one side (a job read in one phase only): the readings as they are, which the
        level bounds (`shed_over`, `demand`, `duty`)."""
        slots = np.asarray(slots)
        stale = np.unique(slots[~self.fresh[slots]])
        if stale.size:
            self._tilt(stale)
        level = self.tilted_level[slots]
        rows = np.flatnonzero(np.isfinite(level))
        s = slots[rows]
        return rows, self.tilted_p[s], self._bins(s)[1], self.tilted_inside[s], level[rows]

    def _tilt(self, s: np.ndarray) -> None:
        """`_levelled`'s distribution of the GPUs `s`, kept until their next sample."""
        self.fresh[s] = True
        level = self.level_w(s)
        self.tilted_level[s] = level
        s, at = s[np.isfinite(level)], level[np.isfinite(level)][:, None]
        if s.size == 0:
            return
        raw, watts = self._bins(s)
        seen = raw > 0
        counts = raw > 1e-6  # (a reading faded to nothing says nothing of the draw's range)
        lo = np.min(np.where(counts, watts, np.inf), axis=1, keepdims=True)
        hi = np.max(np.where(counts, watts, -np.inf), axis=1, keepdims=True)
        inside = (lo + 0.5 < at) & (at < hi - 0.5)
        z = np.where(seen, (watts - at) / 100.0, 0.0)
        log_w = np.log(np.where(seen, raw, 1.0))
        theta_lo, theta_hi = np.full((s.size, 1), -60.0), np.full((s.size, 1), 60.0)
        for _ in range(30):  # (the tilted mean rises with theta: bisect it to the level)
            theta = 0.5 * (theta_lo + theta_hi)
            above = np.sum(_tilted(theta, z, log_w, seen) * z, axis=1, keepdims=True) > 0
            theta_hi, theta_lo = np.where(above, theta, theta_hi), np.where(above, theta_lo, theta)
        tilted = _tilted(0.5 * (theta_lo + theta_hi), z, log_w, seen)
        inside &= np.abs(np.sum(tilted * z, axis=1, keepdims=True)) < 0.01  # (within 1 W of the level: no theta
                                                                           # in range reached it, else)
        self.tilted_p[s] = np.where(inside, tilted, raw)
        self.tilted_inside[s] = inside[:, 0]

    def _bins(self, slots) -> tuple[np.ndarray, np.ndarray]:
        """Each GPU's readings' distribution: per bin, its share of their weight and its mean watts."""
        weight = self.draw[slots].astype(np.float64)
        total = weight.sum(axis=1, keepdims=True)
        p = np.divide(weight, total, out=np.zeros_like(weight), where=total > 0)
        return p, np.divide(self.draw_w[slots], self.draw[slots], out=np.zeros_like(weight), where=weight > 0)

    @staticmethod
    def _weighted(p: np.ndarray, watts: np.ndarray, mask: np.ndarray) -> np.ndarray:
        mass = np.sum(p * mask, axis=1)
        return np.divide(np.sum(p * watts * mask, axis=1), mass, out=np.zeros(mass.size), where=mass > 0)

    def shed_over(self, slots: np.ndarray, cap_w: np.ndarray, mean_w: np.ndarray,
                  held_at_ends: np.ndarray | None = None) -> np.ndarray:
        """What each GPU's cap took from its draw over a scrape whose mean draw was `mean_w` (its
        energy counter's): a scrape of 30 s holds more or fewer of a training job's communication
        phases, which a cap does not touch. On its uncapped draw's distribution X (at its level
        where known: `_levelled`), the cap takes max(X - cap, 0) and leaves min(X, cap); the estimate
        is the first's mean, moved by the regression of it on the second by how far the scrape's mean
        is from the second's mean (a job of two levels: exact), between 0 and the most the scrape's
        mean allows: the cap held the GPU at most the share of the scrape its mean is above idle (a
        steady job's reference says nothing of a scrape it stalled in; its own low draw would not do:
        read every 30 s, a job whose step is a multiple of the scrape is read in one phase only). A
        mean over the cap: the cap did not hold it (not applied yet, or set during the scrape):
        nothing. Nor where a job that never drew under the cap in its reference was read under it at
        both ends of the scrape (`held_at_ends` False: its load fell under the cap)."""
        cap = np.asarray(cap_w, np.float64)
        mean = np.asarray(mean_w, np.float64)
        p, watts = self._bins(slots)
        rows, p_at, watts_at, inside, level = self._levelled(slots)
        p[rows], watts[rows] = p_at, watts_at
        at = np.full(mean.shape, np.nan)  # (per GPU of `slots`: its level)
        at[rows] = level
        kept, taken = np.minimum(watts, cap[:, None]), np.maximum(watts - cap[:, None], 0.0)
        kept_mean, taken_mean = np.sum(p * kept, axis=1), np.sum(p * taken, axis=1)
        cov = np.sum(p * kept * taken, axis=1) - kept_mean * taken_mean
        var = np.sum(p * kept * kept, axis=1) - kept_mean ** 2
        idle = IDLE_SHARE * self.curve.max_limit_w / self.stretch[slots]
        # At its level L, what a cap takes on average is at least L - cap and at most the chord from idle to the
        # GPU's own limit at L (max(X - cap, 0) is convex in X, which never leaves that range). Readings all
        # under L: their shed, at least L - cap. All over it (they caught the job computing only): how much of
        # the scrape it computed they cannot tell, but its scrapes average L, and max(X - cap, 0) = X - min(X,
        # cap): L less the scrape's mean.
        chord = np.full(mean.shape, np.inf)
        if rows.size:
            own = self.curve.max_limit_w / self.stretch[slots][rows]
            c = cap[rows]
            chord[rows] = np.maximum(level - idle[rows], 0.0) * np.maximum(own - c, 0.0) / (own - idle[rows])
            readings_w = np.sum(p_at * watts_at, axis=1)  # (their mean: the level's where they are tilted to it)
            under = rows[~inside & (readings_w < level)]
            taken_mean[under] = np.maximum(taken_mean[under], np.maximum(at[under] - cap[under], 0.0))
        est = taken_mean + cov / (var + SHED_NOISE_W ** 2) * (mean - kept_mean)
        if rows.size:
            over = rows[~inside & (readings_w > level)]
            est[over] = at[over] - mean[over]
        est = np.minimum(est, chord)
        held_w = cap - NOT_BINDING_W  # (a GPU held at its cap draws within this of it)
        at_cap = np.clip((mean - idle) / np.fmax(held_w - idle, 1.0), 0.0, 1.0)
        most = np.fmax(self.demand_above(slots, cap) - cap, 0.0)
        fell = np.zeros(mean.shape, bool) if held_at_ends is None else \
            ~np.asarray(held_at_ends, bool) & (np.sum(p * (watts < held_w[:, None]), axis=1) < STEADY_UNDER)
        return np.where((mean <= cap + NOT_BINDING_W) & ~fell, np.clip(est, 0.0, at_cap * most), 0.0)

    def _mean(self, slots, mask: np.ndarray) -> np.ndarray:
        mass = np.sum(self.draw[slots] * mask, axis=1, dtype=np.float64)
        total = np.sum(self.draw_w[slots] * mask, axis=1, dtype=np.float64)
        return np.divide(total, mass, out=np.zeros(mass.size), where=mass > 0)

    def observe(self, slots: np.ndarray, power_w: np.ndarray, util: np.ndarray, util_mem: np.ndarray,
                limit_w: np.ndarray, default_w: float | np.ndarray, paused: np.ndarray | None = None,
                new_job: np.ndarray | None = None, dt_s: float | np.ndarray = 1.0,
                mean_w: np.ndarray | None = None, cap_reason: np.ndarray | None = None) -> None:
        """One batch of samples: per row its GPU's slot, draw, utilisation, memory utilisation
        and enforced limit (NaN where unknown); `default_w` each GPU's own limit (a site's
        `nvidia-smi -pl 600` or a 400 W part's; under it, a cap is set); `paused`
        per row: idle, its job's memory still held (None: an idle GPU's job is over); `new_job`
        per row: the samples name another job than before (learned afresh, busy or not); `dt_s`
        per row: the seconds since its GPU's sample before (the scrape interval); `mean_w` per row: its
        mean draw since then by its energy counter (NaN, or None: read faster, the instants do); `cap_reason`
        per row: its SW power cap clock reason (0x4), 1 set, 0 clear, NaN (or None) not sent."""
        self.grow(int(slots.max()) + 1 if slots.size else 0)
        power = np.asarray(power_w, np.float64)
        mean = None if mean_w is None else np.asarray(mean_w, np.float64)
        util = np.nan_to_num(np.asarray(util, np.float64))
        mem = np.asarray(util_mem, np.float64)
        has_mem = mem > 0  # (null where the source sends none: a trimmed dcgm-exporter counters file, MIG)
        mem = np.nan_to_num(mem)
        default_w = np.broadcast_to(np.asarray(default_w, np.float64), np.shape(power_w))
        limit = np.asarray(limit_w, np.float64)
        limit = np.where(np.isnan(limit), default_w, limit)
        k = np.where(default_w > 0, self.curve.max_limit_w / np.where(default_w > 0, default_w, 1.0), 1.0)
        self.stretch[slots] = k
        dt_all = np.broadcast_to(np.asarray(dt_s, np.float64), power.shape)
        ok = np.isfinite(power)
        idle = ok & (util < IDLE_UTIL)
        over = idle.copy() if paused is None else idle & ~np.asarray(paused, bool)  # (not idle itself: |= below)
        if new_job is not None:
            over |= np.asarray(new_job, bool)
        self.fresh[slots[over]] = False
        if over.any():  # the job is over: the next one is learned afresh
            gone = slots[over]
            for a in (self.draw, self.draw_w, self.recent, self.ref_mem, self.ref_n, self.ref_s, self.sxx, self.sxy,
                      self.syy, self.points, self.level_sum, self.level_mass):
                a[gone] = 0.0
            self.was_free[gone] = self.was_held[gone] = False  # (a scrape across two jobs is neither's)
            self.held_gap[gone] = np.inf
        busy = ok & ~idle
        capped = limit < default_w - 0.5
        free = busy & ~capped  # the draw's reference needs no util_mem: only the points do
        if free.any():
            s = slots[free]
            self.fresh[s] = False  # (the histogram and the level move: `_levelled` works them out again)
            dt = dt_all[free]
            n = self.ref_n[s] + 1.0
            self.recent[s] += np.maximum(1.0 / n, span_weight(dt, RECENT_S, 2)) * (power[free] - self.recent[s])
            demand_now = self._readings_demand(s)
            stepped = self.recent[s] > demand_now + STEP_UP * default_w[free]
            # util_mem's reference from the samples at the job's demand (a training job computing), the
            # phase a cap holds: a job communicating may move less memory, and blended in, a capped
            # compute sample would read as moving more than the reference (a free cap; a load that rose).
            top = stepped | (power[free] >= demand_now - STEP_UP * default_w[free])
            fade = np.where(stepped, 0.0, 1.0 - span_weight(dt, DEMAND_S, DEMAND_MIN)).astype(np.float32)[:, None]
            self.draw[s] *= fade
            self.draw_w[s] *= fade
            at = (s, np.clip((power[free] * k[free] / self.bin_w).astype(np.int64), 0, DEMAND_BINS - 1))
            np.add.at(self.draw, at, 1.0)
            np.add.at(self.draw_w, at, power[free])
            # The level fades with the readings, and counts only a scrape busy and uncapped from end to end
            # (one a job started, stalled or was capped in holds what it did not draw).
            self.level_sum[s] *= fade[:, 0]
            self.level_mass[s] *= fade[:, 0]
            if mean is not None:
                scraped = np.isfinite(mean[free]) & self.was_free[s]
                np.add.at(self.level_sum, s[scraped], mean[free][scraped])
                np.add.at(self.level_mass, s[scraped], 1.0)
            # A load that stepped up is a new reference for its memory traffic too (blended with the old
            # level, a cap's samples moved more memory than it: learned as a cap that cost nothing).
            a = np.where(stepped, 1.0, np.maximum(1.0 / n, 1.0 / REF_SAMPLES))
            m = has_mem[free] & top
            self.ref_mem[s[m]] += a[m] * (mem[free][m] - self.ref_mem[s[m]])
            self.ref_n[s] = n
            self.ref_s[s] += span_seconds(dt, MIN_REF_S)
        self.was_free[slots] = free
        known = busy & capped & self.referenced(slots)
        ref_p = np.zeros(power.size)
        if known.any():
            ref_p[known] = self.demand_above(slots[known], power[known])
        # A point only where the cap holds the draw (a training job communicating under its cap draws far
        # under it at full speed: taken for held, it read as a cap that cost nothing, s 0.17 for s 0.97).
        # The draw and util_mem are averages over the second before the reading (NVML's and dcgm-exporter's
        # on current GPUs), the clock reason an instant: the first reading after a job's communication
        # reads held with the communication's draw and memory traffic blended in, a cap that costs less
        # than it does (s 0.92 for 0.95). Read HELD_THROUGH_S apart or less, the cap must have held at the
        # reading before too (a GPU's rows come one per batch: the power role cuts its runs so). Read
        # further apart, the reading before tells nothing, so at any interval a point also needs a draw
        # within NOT_BINDING_W of the least its job's held samples drew under their limit: a blend draws
        # further under, as does a load that fell under its cap for part of the second, while a part that
        # settles 15 W under its cap keeps its points. A reading over its limit (a cap lowered within its
        # second) is neither a point nor a gap: as the least, it would shut such a part out for good.
        held_now = ok & held_by_cap(power, limit, cap_reason)
        through = self.was_held[slots] | (dt_all > HELD_THROUGH_S)
        self.was_held[slots] = held_now
        gap = np.where(held_now & known & (power <= limit), limit - power, np.inf)
        np.minimum.at(self.held_gap, slots, gap)
        least = self.held_gap[slots]
        held = (known & held_now & through & np.isfinite(gap) & (gap <= least + NOT_BINDING_W)
                & (power < (1.0 - MIN_SHED) * ref_p) & has_mem & (self.ref_mem[slots] > 0))
        if held.any():
            s = slots[held]
            at_ref = self.curve.at(ref_p[held] * k[held])
            r = np.clip(self.curve.at(power[held] * k[held]) / np.where(at_ref > 0, at_ref, 1.0), 1e-3, 1.0)
            w = np.clip(mem[held] / self.ref_mem[s], 1e-3, 1.0)
            x, y = 1.0 / r - 1.0, 1.0 / w - 1.0
            # A point far under a firm fit is a phase the reference does not describe, not a cheaper cap:
            # read every 30 s, a job of 29.9-s steps is read communicating for 20 minutes on end, and a
            # cap just under its communication's draw holds it there at no cost (0x4, util_mem at the
            # reference) while costing its unseen compute dearly: 40 such points at 1.5 times the cap's
            # x put s 0.97 at 0.33, and 23 GPUs lost 54% under a 50% class. Points over the fit (a
            # dearer cap) always count: the bound errs on the side of the class.
            firm = self.points[s] >= FIRM_POINTS
            fit = self.sensitivity(s)
            spread = self._error_y(s, fit) * np.sqrt(1.0 + x * x / (PRIOR_WEIGHT + self.sxx[s]))  # (at this x)
            counts = ~(firm & (y < fit * x - UNDER_FIT_ERRORS * spread))
            s, x, y = s[counts], x[counts], y[counts]
            np.add.at(self.sxx, s, x * x)
            np.add.at(self.sxy, s, x * y)
            np.add.at(self.syy, s, y * y)
            np.add.at(self.points, s, 1.0)

    def sensitivity(self, slots: np.ndarray | None = None) -> np.ndarray:
        """The least-squares slope with the prior, in [0, 1]."""
        sl = slice(None) if slots is None else slots
        return np.clip((PRIOR_WEIGHT + self.sxy[sl]) / (PRIOR_WEIGHT + self.sxx[sl]), 0.0, 1.0)

    def upper(self, slots: np.ndarray | None = None) -> np.ndarray:
        """The fit plus its standard error, from the points' own scatter about the fit or
        util_mem's resolution where that is larger, times Student's t at 97.5% for the points
        less one (a point alone: 2, the resolution's error being known; the bound rises at the
        second point, then narrows as they come). Read every 30 s, a job's 30-50 points
        scattered by the phases they caught had put its fit under the truth by more than the
        resolution allowed (0.78 for 0.89: its GPUs lost 52% under a 50% class)."""
        sl = slice(None) if slots is None else slots
        fit, n = self.sensitivity(slots), self.points[sl]
        err = self._error_y(slots, fit) / np.sqrt(PRIOR_WEIGHT + self.sxx[sl])
        return np.clip(fit + student_t975(n - 1.0) * err, 0.0, 1.0)

    def _error_y(self, slots: np.ndarray | None, fit: np.ndarray) -> np.ndarray:
        """A point's error about the fit (`sensitivity` of `slots`): the points' own scatter, or
        util_mem's resolution where that is larger."""
        sl = slice(None) if slots is None else slots
        n, sxx, sxy, syy = self.points[sl], self.sxx[sl], self.sxy[sl], self.syy[sl]
        scatter = np.maximum(syy - 2.0 * fit * sxy + fit * fit * sxx, 0.0) / np.maximum(n - 1.0, 1.0)
        return np.sqrt(np.maximum(scatter, NOISE_Y ** 2))
