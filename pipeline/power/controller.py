"""The demand-response loop of a site: plan caps, apply them, verify by the meter, restore.

It follows the site's GPU samples (each GPU's draw, utilisation and enforced limit) and
its facility readings (the site meter; each rack's PDU), and drives each accepted
request through its phases:

  pending     before its start; the meter's readings of the last `power.baseline_s`
              no earlier request's caps held make its baseline (the average before the event, as demand-response
              programs measure it), adjusted during the event for the load Fleetwatch
              does not control (`adjustment_kw`: jobs that start, end or pause, their
              CPUs; a GPU a cap holds counts at what its job would draw uncapped, its
              draw's distribution above the cap: learn.py's `demand_above`); a level to
              hold (`target_kw`) is judged by the meter itself, and its caps shed the
              load that came since too, or give back what left
  active      from its start: caps planned (power/planner.py) for the reduction plus
              headroom on each GPU's learned curve and demand (power/learn.py: a training
              job's compute-phase draw, for the share of its step it draws it), applied,
              then checked every `power.control_interval_s` against the meter (or the
              covered racks' PDUs): a shortfall is planned again on top (feedback: the
              planner's estimate of a GPU's demand is only an estimate), an excess given
              back; and re-planned as the curves learn (the first caps spread the cut
              evenly and show each job's sensitivity; later ones take the cheap watts where
              they are) and as jobs end or pause (a checkpoint: the job keeps its caps);
              a GPU a fault alert names is left out (`observe_alerts`)
  restoring   from its end: the caps rise step by step, no faster than
              `power.restore_rate_kw_s` and never past the site's power cap, so the
              site's power does not spike back (every GPU's job resumes at once otherwise)
  done        every GPU at its default limit again; the outcome is final

Caps go out through an `Actuator` (power/actuator.py: the simulator's in `fleetwatch
eval`; the agents' over the bus is the next step); a cap is never left behind: a request
that ends, or whose controller stops, restores what it set. The outcome of a request
(`Outcome`) is what the eval reads: when the target was reached, the reduction held,
what it cost. One request runs at a time (requests that overlap are refused).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import PowerConfig
from pipeline.counters import MEAN_AFTER_S, Counter, counter_step_j, interval_mean_w
from pipeline.detect.catalog import DETECTOR_ALERTS
from pipeline.feeds import next_interval, silence_allowed_s
from pipeline.model import HW_SLOWDOWN_ANY, SW_POWER_CAP, bad_quality
from pipeline.detect.state import KeyIndex
from pipeline.power.actuator import Actuator
from pipeline.power.classes import FlexClasses, scheduler_entry
from pipeline.power.curve import PowerCurve
from pipeline.power.learn import CurveLearner, held_by_cap, span_seconds
from pipeline.power.planner import IDLE_UTIL, GpuPower, capacity_w, firm_capacity_w, floors, plan, uniform_cost
from pipeline.power.request import PowerRequest

log = logging.getLogger("fleetwatch")

SETTLE_S = 2.0  # after caps change, the meter's 1 s readings show them within this
MINUTE_S = 60.0  # the interval a hold is judged on
MINUTE = timedelta(seconds=MINUTE_S)
SLOPE_SPREAD_KW = 5.0  # the meter's slope on the PDUs is fitted once their sum has varied this much
NEWEST_AHEAD = timedelta(minutes=2)  # a facility reading further ahead of the GPUs' time is not taken as a device's newest
CAPS_HISTORY_S = 600.0  # what the caps changed, kept this long for PDUs polled less often than the meter
MIN_METER_SLOPE = 0.1  # ... and no lower than this where the meter reads less than their sum (one feed of two)
PROBE_SHARE = 0.1      # a job whose curve is not learned yet is capped this share under its draw ...
PROBE_POINTS = 10      # ... until this many of its samples under a cap are learned from
STUCK_READINGS = 30    # identical power readings in a row where they should move: a stuck sensor (detect.stuck_samples;
                       # a count, not seconds: the chance of a repeat is per reading)
PAUSED_MEM = 0.5       # an idle GPU holding this share of its job's memory: the job paused (a checkpoint)
LEVEL_WINDOW_S = 30.0  # a level to hold follows the load not controlled by its median over this long: a
                       # step in 15 s, not a training job's communication phase (a share of its step)
SWING_S = 300.0        # ... as they moved over this long
BIAS_S = 60.0          # the meter's reduction against the caps' expected one: a mean over this long (2
BIAS_PRIOR_S = 10.0    # readings at least), where the mean before the caps last changed counts as this long
                       # (a new plan has its own errors: its first readings move the mean fast)
UNHELD_S = 20.0        # a capped GPU drawing under its cap this long (2 samples at least): its load fell (longer
                       # than a training job's communication phase), its cap is expected to shed nothing
SILENT_S = 60.0        # a GPU with no sample for this long behind the fleet's newest (GpuTable.silent),
SILENT_INTERVALS = 3   # or this many scrape intervals, if longer, is gone from the request: fell off the bus,
                       # its node drained, its agent stopped
SLOW_READINGS_S = 10.0  # GPUs or a meter read further apart than this: requests are met less often (the eval, seeds
                        # 1-3: 21 of 24 at 1 s, 19 at 10 s, 16 at 30 s, where it costs 0.89-0.98x uniform capping)
ROSE_S = 20.0          # a capped GPU moving more memory than its uncapped reference this long (2 samples at least):
ROSE_SHARE = 0.1       # more than this share above it, and MEM_STEP (util_mem's resolution), its load rose (_rose)
MEM_STEP = 0.01
OVER_CAP_RESTORE = 0.1  # a site at or over its cap restores at this share of the rate: slowed, never held (a cap
                        # must not outlive its request; the site's own load over its cap is SitePowerOverCap's)
REFUSED = frozenset({"not_permitted", "out_of_range", "not_supported"})  # an agent's statuses of a cap not set
RELEARNED = 0.05       # a plan is made again when a job's learned sensitivity moved this much since
# A power reading the detectors found stuck: its node is left as it is, like one the controller finds
# stuck itself (STUCK_READINGS, which it can see only on an uncapped GPU): a cap moved there moves a
# GPU's heat against a reading that stays, which its detectors would take for a fault.
FROZEN_ALERTS = frozenset({"GpuPowerSensorStuck"})
# Fault alerts on a GPU or a node (detect's, not demand response's own, nor remediation's about its
# cases): while one fires, the GPUs it names are not capped (Controller.observe_alerts).
SUSPECT_ALERTS = frozenset(a.name for a in DETECTOR_ALERTS if a.scope in ("gpu", "node") and a.family != "power") \
    - FROZEN_ALERTS
ALERTS_READ = SUSPECT_ALERTS | FROZEN_ALERTS


def unix_us(ts: pa.Array) -> np.ndarray:
    """A timestamp column as integer unix microseconds (whatever its unit)."""
    return pc.cast(ts, pa.timestamp("us", ts.type.tz), safe=False).cast(pa.int64()).to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class Firm:
    """The flexible capacity left without its largest job (Controller.firm)."""
    kw: float                 # what is left
    largest: str | None       # "job 1234" (the scheduler's), or "node gpu-a1" (no job known there)
    largest_kw: float         # what that job holds
    largest_gpus: int

    @property
    def flexible_kw(self) -> float:
        """All of it, the largest job's included (Controller.flexible_kw)."""
        return self.kw + self.largest_kw


@dataclass
class Outcome:
    """What a request achieved (kW, s); None before it is known."""
    request: PowerRequest
    baseline_kw: float | None = None
    requested_kw: float | None = None
    reached_s: float | None = None        # from start to the first reading at the target
    achieved_kw: list[tuple[float, float]] = field(default_factory=list)  # (s from start, kW): each reading of
                                                                           # the hold, from reached to end
    shed_kw: list[tuple[float, float]] = field(default_factory=list)  # the same from the start (the ramp's too:
                                                                       # the energy curtailed, a target never reached)
    planned_loss_pct: float | None = None  # the plan's estimate of the work lost
    uniform_loss_pct: float | None = None  # uniform capping's, for the same reduction
    restoring_kw: list[float] = field(default_factory=list)  # the readings while the caps rise (each step's
                                                              # peak of those it took, by their own time)
    restored_kw: list[float] = field(default_factory=list)   # the same in the minute after the last cap went
    restore_from: datetime | None = None  # when the caps began to rise: its end, or the step a cancel took
    restore_done: datetime | None = None  # when the last cap was gone
    read_to: datetime | None = None       # from the restore: the newest covered reading taken, by its own
    meter_to: datetime | None = None      # time (a meter delivered late), and the site meter's
    over_site_cap: bool = False
    gpus_capped: int = 0
    meter_per_it: tuple[float, float] = (1.0, 1.0)  # the meter's kW per kW of the PDUs (cooling) at start:
                                          # (for a rise, for a fall) of the load not controlled
    adjustment_kw: list[tuple[float, float]] = field(default_factory=list)  # (s from start, kW): the
                                          # baseline's adjustment for the load not controlled, each reading
    given_baseline: tuple[float, float | None] | None = None  # (meter, PDUs) kW from a first start (submit)
    base_it_kw: float | None = None       # the PDUs' sum the adjustment counts from (a restart resumes on it)
    it_on_gpus: bool = False              # ... taken on the GPUs' sum (a site whose PDUs send nothing): adjusted
                                          # only while the IT load is read on the same scale

    def hold(self) -> list[tuple[float, float]]:
        """The readings of the hold: from the target reached; one never reached, from its ramp's
        deadline (what it delivered when it was due: a settlement counts it too)."""
        if self.achieved_kw or not self.shed_kw:
            return self.achieved_kw
        return [(t, kw) for t, kw in self.shed_kw if t >= self.request.ramp_s]

    def minute_means(self) -> list[float]:
        """The reduction held, as the mean of each minute of the hold (a demand-response
        program settles on interval means, not on single readings); a last minute shorter
        than half of one is left out."""
        hold = self.hold()
        if not hold:
            return []
        t = np.array([x for x, _ in hold])
        kw = np.array([y for _, y in hold])
        minute = ((t - t[0]) // MINUTE_S).astype(np.int64)
        out = []
        for m in np.unique(minute):
            mine = minute == m
            if m == minute[-1] and m > 0 and t[mine][-1] - t[mine][0] < MINUTE_S / 2:
                continue
            out.append(float(kw[mine].mean()))
        return out

    def _readings_s(self) -> tuple[np.ndarray, float]:
        """The readings' times from the start, in order, and their usual interval (0 before two)."""
        t = np.sort([x for x, _ in self.shed_kw])
        return t, float(np.median(np.diff(t))) if t.size > 1 else 0.0

    def due_s(self) -> float:
        """When the ramp is judged: at its deadline, or by the first reading after it where that
        comes within the readings' usual interval (a meter read every 30 s shows no moment between
        its readings: the first that can show the deadline's is the one that judges it). A ramp
        shorter than that interval is judged at its deadline: no reading of it can show it met."""
        ramp = self.request.ramp_s
        t, gap = self._readings_s()
        after = t[t >= ramp]
        return float(after[0]) if after.size and gap <= ramp and after[0] <= ramp + gap else ramp

    def ramp_judged(self, since_s: float) -> bool:
        """Whether the ramp can be judged `since_s` from the start: its due reading came, or it is
        past the deadline by more than the readings' usual interval."""
        ramp = self.request.ramp_s
        t, gap = self._readings_s()
        return since_s > ramp and (bool(t.size and t[-1] >= ramp) or since_s > ramp + gap)

    @property
    def in_time(self) -> bool:
        """At the target by its ramp's deadline (`due_s`)."""
        return self.reached_s is not None and self.reached_s <= self.due_s()

    @property
    def met(self) -> bool:
        """Reached by the ramp deadline, and held: every minute's mean within 2% of the target."""
        if not self.in_time or not self.achieved_kw:
            return False
        return min(self.minute_means()) >= 0.98 * self.requested_kw

    def shortfall_max_pct(self) -> float:
        """The worst minute of the hold, below the target."""
        if not self.requested_kw:
            return 0.0
        worst = min(self.minute_means() or [0.0])
        return max(0.0, 100.0 * (self.requested_kw - worst) / self.requested_kw)

    @property
    def restore_overshoot_kw(self) -> float | None:
        """How far the power spiked while the caps rose, above the highest it reached in the
        minute after they were gone: a rebound, peaks against peaks (a training job's swing
        peaks in both; the load's own growth is no rebound)."""
        if not self.restoring_kw or not self.restored_kw:
            return None
        return max(0.0, max(self.restoring_kw) - max(self.restored_kw))


class GpuTable:
    """The latest reading of every GPU, by UUID: arrays indexed by slot (detect/state.KeyIndex)."""

    def __init__(self, classes: FlexClasses) -> None:
        self.classes = classes
        self.ids = KeyIndex(on_new=self._register)
        self.uuids: list[str] = []
        self.racks: list[str] = []
        self.nodes: list[str] = []
        self.power_w, self.util, self.limit_w = np.zeros(0), np.zeros(0), np.zeros(0)
        self.util_mem = np.zeros(0)
        self.job_mem = np.zeros(0)          # the memory its job held when last busy, bytes
        self.default_w = np.zeros(0)        # its default limit: the highest enforced limit seen
        self.model_max_w: dict[str | None, float] = {}  # the highest enforced limit seen per GPU model
        self.paused = np.zeros(0, bool)     # idle with its job's memory held: a checkpoint stall, not a job's end
        self.job = np.zeros(0, object)      # the scheduler's jobs the samples name now (their job column), or None
        self.last_job = np.zeros(0, object)  # the last jobs they named (a job's end names none until the next)
        self.new_job = np.zeros(0, bool)    # the last batch's rows: the samples name other jobs than before
        self.flat = np.zeros(0, np.int64)   # identical power readings in a row (a stuck sensor: detect's rule)
        self.forced = np.zeros(0, bool)     # clocks forced down by hardware or heat (a brake, a thermal slowdown)
        self.cap_reason = np.zeros(0)       # its SW power cap clock reason (0x4): 1 set, 0 clear, NaN not sent
        self.energy_j = np.zeros(0)         # its energy counter's latest reading (NaN: none) ...
        self.energy_step_j = np.zeros(0)    # ... its resolution (pipeline/counters.py) ...
        self.mean_w = np.zeros(0)           # ... and its mean draw since the sample before (NaN: read less than
                                            # 5 s apart, or no counter to trust: the instant stands for it)
        self.before_w = np.zeros(0)         # the power its sample before read ...
        self.before_reason = np.zeros(0)    # ... and its SW power cap clock reason (as cap_reason)
        self.node_ix = np.zeros(0, np.int64)  # each GPU's node, numbered
        self._node_ids: dict[str, int] = {}
        self.rack_ix = np.zeros(0, np.int64)  # each GPU's rack, numbered (rack_ids)
        self.rack_ids: dict[str, int] = {}
        self.flex = np.zeros(0, np.int64)
        self.namespace = np.zeros(0, object)  # per slot: the namespace and pod its samples named last, where a
        self.pod = np.zeros(0, object)        # class rule names a workload (a label change reads them again)
        self._classes_version = classes.version
        self.slots = np.zeros(0, np.int64)  # the last batch's rows' slots
        self.seen_us = np.zeros(0, np.int64)  # per slot: its newest sample's time (unix us)
        self.heard_us = np.zeros(0, np.int64)  # per slot: the fleet's newest time (`front`) when it last sent
        self.dt_s = np.zeros(0)             # the last batch's rows: the seconds since their GPU's sample before
        self.interval_s = 1.0               # the fleet's scrape interval: the batches' median dt, smoothed
        self._first_interval = True
        self._batch: pa.RecordBatch | None = None

    def update(self, batch: pa.RecordBatch) -> None:
        self._batch = batch
        slots = self.ids.slots(batch.column("gpu_uuid"))
        power = batch.column("power_w").to_numpy(zero_copy_only=False)
        # A reading that repeats where it should move: a busy GPU's that no cap holds (a cap holds
        # the draw still, and an idle GPU read to whole watts repeats for minutes).
        limit = batch.column("power_limit_w").to_numpy(zero_copy_only=False)
        util = batch.column("util_gpu").to_numpy(zero_copy_only=False)
        # Each GPU's default limit: the highest seen for it or for its model (a fleet mixes models,
        # and a GPU first seen under a cap has not shown its own yet).
        models = pc.dictionary_encode(batch.column("model"))
        names = models.dictionary.to_pylist() + [None]
        codes = pc.fill_null(models.indices, len(names) - 1).to_numpy(zero_copy_only=False)
        top = np.array([self.model_max_w.get(m, np.nan) for m in names])
        np.fmax.at(top, codes, limit)
        self.model_max_w.update(zip(names, top.tolist()))
        by_model = top[codes]
        self.default_w[slots] = np.fmax(np.fmax(self.default_w[slots], limit), by_model)
        busy = util >= IDLE_UTIL
        with np.errstate(invalid="ignore"):
            moves = busy & ~(limit < self.default_w[slots] - 1.0)
        self.flat[slots] = np.where((power == self.power_w[slots]) & moves, self.flat[slots] + 1, 0)
        before_w = self.power_w[slots]
        self.before_w[slots] = before_w
        self.power_w[slots] = power
        reasons = batch.column("clock_event_reasons").to_numpy(zero_copy_only=False).astype(np.float64)  # (null: NaN)
        bits = np.nan_to_num(reasons).astype(np.int64)
        self.forced[slots] = (bits & int(HW_SLOWDOWN_ANY)) != 0
        self.before_reason[slots] = self.cap_reason[slots]
        self.cap_reason[slots] = np.where(np.isnan(reasons), np.nan, (bits & SW_POWER_CAP) != 0)
        self.util[slots] = util
        self.util_mem[slots] = batch.column("util_mem").to_numpy(zero_copy_only=False)
        mem = np.nan_to_num(batch.column("mem_used_bytes").to_numpy(zero_copy_only=False).astype(np.float64))
        self.job_mem[slots] = np.where(busy, mem, self.job_mem[slots])
        # The jobs the samples name (dcgm-exporter's hpc_job, the agent's job mapping): none of the ones
        # named last is a new job, whatever its draw (A, none, B: the epilog ran before the next prolog;
        # A, then A and B sharing the GPU: the same job goes on); not named, the draw and memory tell.
        job = batch.column("job").to_numpy(zero_copy_only=False)
        named = job != None  # noqa: E711 (elementwise on an object array)
        last = self.last_job[slots]
        self.new_job = named & (last != None) & (job != last)  # noqa: E711
        for row in np.flatnonzero(self.new_job):  # (a GPU whose jobs changed: rare)
            self.new_job[row] = set(job[row].split(",")).isdisjoint(last[row].split(","))
        self.job[slots] = job
        self.last_job[slots[named]] = job[named]
        self.paused[slots] = ~busy & (self.job_mem[slots] > 0) & (mem >= PAUSED_MEM * self.job_mem[slots]) \
            & ~self.new_job
        self.job_mem[slots[~busy & ~self.paused[slots]]] = 0.0  # the job freed its memory: over
        self.limit_w[slots] = limit
        self.slots = np.asarray(slots, np.int64)
        ts = batch.column("ts")
        us = unix_us(ts)
        prev = self.seen_us[self.slots]
        dt = (us - prev) / 1e6  # (in integer microseconds first: a 1 s scrape is exactly 1.0)
        ok = (prev > 0) & (dt > 0)
        # The fleet's interval, smoothed, from steps shorter than a GPU gone (a node back after an hour
        # is no new interval).
        steps = dt[ok & (dt <= self.silent_after_s())]
        if steps.size:
            step = float(np.median(steps))
            self.interval_s = step if self._first_interval else self.interval_s + 0.1 * (step - self.interval_s)
            self._first_interval = False
        # A GPU's first sample stands for the fleet's interval; one not newer than its last (a replay, a
        # duplicate) for no time.
        self.dt_s = np.where(ok, dt, np.where(prev > 0, 0.0, self.interval_s))
        self._count_energy(batch, ok | (prev == 0), dt, before_w, power, us)
        np.maximum.at(self.seen_us, self.slots, us)
        self.heard_us[self.slots] = self.front_us()  # (seen_us only grows: so does the front)
        if self.classes.by_workload:  # the job on a GPU changes, and its class with it
            self.namespace[slots] = batch.column("namespace").to_numpy(zero_copy_only=False)
            self.pod[slots] = batch.column("pod").to_numpy(zero_copy_only=False)
        if self.classes.version != self._classes_version:
            # The nodes' labels changed: every GPU's class again, each with the workload it ran last (a GPU
            # of another rack must not lose an inference namespace's class 0 until its own next sample).
            self._classes_version = self.classes.version
            known: dict[tuple, int] = {}
            self.flex[:] = [known[k] if k in known else known.setdefault(k, self.classes.of(*k))
                            for k in zip(self.nodes, self.namespace, self.pod)]
        elif self.classes.by_workload:
            self.flex[slots] = self.classes.of_rows(batch)

    @property
    def known_interval_s(self) -> float | None:
        """The fleet's scrape interval once two scrapes have shown it (None before)."""
        return None if self._first_interval else self.interval_s

    def means(self) -> bool:
        """Whether the fleet is read 5 s apart or more: each reading then stands for its scrape by its
        energy counter's mean (pipeline/counters.py); read faster, the instants do."""
        return self.interval_s >= MEAN_AFTER_S

    def _count_energy(self, batch: pa.RecordBatch, newer: np.ndarray, dt: np.ndarray, before_w: np.ndarray,
                      power: np.ndarray, us: np.ndarray) -> None:
        """Each row's mean draw since its GPU's sample before, by its energy counter (`mean_w`); only rows
        newer than their GPU's last move the counter on (a replayed sample must not rewind it), the
        newest of a GPU's rows last."""
        slots = self.slots
        energy = batch.column("energy_j").to_numpy(zero_copy_only=False).astype(np.float64)
        if self.means():  # (read faster: NaN, and the counter's resolution not worked out, which costs)
            self.energy_step_j[slots] = np.fmin(self.energy_step_j[slots], counter_step_j(energy))
            self.mean_w[slots] = interval_mean_w(energy - self.energy_j[slots], np.where(newer, dt, np.nan),
                                                 self.energy_step_j[slots], before_w, power)
        else:
            self.mean_w[slots] = np.nan
        order = np.argsort(np.where(newer, us, np.iinfo(np.int64).min), kind="stable")
        order = order[newer[order]]
        self.energy_j[slots[order]] = energy[order]

    def _register(self, new: pa.Array, first_rows: np.ndarray) -> None:
        """GPUs never seen before (once per GPU ever): their place, their class."""
        rows = pa.array(first_rows)
        nodes = self._batch.column("node").take(rows).to_pylist()
        self.uuids += new.to_pylist()
        self.racks += self._batch.column("rack").take(rows).to_pylist()
        self.nodes += nodes
        grow = len(nodes)
        self.power_w = np.concatenate([self.power_w, np.zeros(grow)])
        self.util = np.concatenate([self.util, np.zeros(grow)])
        self.util_mem = np.concatenate([self.util_mem, np.zeros(grow)])
        self.job_mem = np.concatenate([self.job_mem, np.zeros(grow)])
        self.default_w = np.concatenate([self.default_w, np.full(grow, np.nan)])
        self.paused = np.concatenate([self.paused, np.zeros(grow, bool)])
        self.job = np.concatenate([self.job, np.full(grow, None, object)])
        self.last_job = np.concatenate([self.last_job, np.full(grow, None, object)])
        self.flat = np.concatenate([self.flat, np.zeros(grow, np.int64)])
        self.forced = np.concatenate([self.forced, np.zeros(grow, bool)])
        for name in ("energy_j", "cap_reason", "energy_step_j", "mean_w", "before_w", "before_reason"):
            setattr(self, name, np.concatenate([getattr(self, name), np.full(grow, np.nan)]))
        racks = self.racks[-grow:]
        self.rack_ix = np.concatenate([self.rack_ix, np.array([self.rack_ids.setdefault(r, len(self.rack_ids))
                                                               for r in racks], np.int64)])
        self.node_ix = np.concatenate([self.node_ix, np.array([self._node_ids.setdefault(n, len(self._node_ids))
                                                               for n in nodes], np.int64)])
        self.limit_w = np.concatenate([self.limit_w, np.full(grow, np.nan)])
        self.seen_us = np.concatenate([self.seen_us, np.zeros(grow, np.int64)])
        self.heard_us = np.concatenate([self.heard_us, np.zeros(grow, np.int64)])
        self.namespace = np.concatenate([self.namespace, np.full(grow, None, object)])
        self.pod = np.concatenate([self.pod, np.full(grow, None, object)])
        self.flex = np.concatenate([self.flex, self.classes.of_rows(self._batch.take(rows))])

    def silent_after_s(self) -> float:
        return max(SILENT_S, SILENT_INTERVALS * self.interval_s)

    def front_us(self) -> int:
        """The fleet's newest time: the newest a tenth of the GPUs (two at least) reached, so that one GPU
        whose clock runs ahead (intake takes 300 s) moves it not."""
        n = self.seen_us.size
        if not n:
            return 0
        k = n - min(n, max(2, n // 10))
        return int(np.partition(self.seen_us, k)[k])

    def silent(self) -> np.ndarray:
        """Per GPU: nothing sent while the fleet's newest time (`front_us`) moved SILENT_S (or SILENT_INTERVALS
        scrapes, if longer), on the data's time: by when it was last heard, not by its own clock (a node whose
        clock ran 90 s behind had been silent for good, left out of every request without a word)."""
        if not self.heard_us.size:
            return np.zeros(0, bool)
        return self.heard_us < self.front_us() - 1e6 * self.silent_after_s()

    def stuck_nodes(self, readings: int) -> np.ndarray:
        """Per GPU: a GPU of its node reports the same power `readings` times in a row. Its
        siblings' heat is read against its power (detect/families/siblings.py): with one
        reading stuck, a cap that moves any of them moves the comparison."""
        stuck = np.zeros(len(self._node_ids), bool)
        stuck[self.node_ix[self.flat >= readings]] = True
        return stuck[self.node_ix]

    def covered(self, racks: tuple[str, ...]) -> np.ndarray:
        if not racks:
            return np.arange(len(self.uuids))
        return np.flatnonzero(np.isin(np.array(self.racks, dtype=object), list(racks)))


class Controller:
    """One site's demand response (see the module doc). `observe` each GPU and facility
    batch, call `step(now)` every control interval."""

    def __init__(self, site: str, curve: PowerCurve, actuator: Actuator, settings: PowerConfig,
                 site_cap_w: float = 0.0) -> None:
        self.site, self.curve, self.actuator, self.s = site, curve, actuator, settings
        self.site_cap_w = site_cap_w  # detect.site_power_cap_w; 0: none
        self.classes = FlexClasses(settings)
        self.gpus = GpuTable(self.classes)
        self.jobs: dict[str, str] = {}                        # node -> its job, as the scheduler says (set_jobs)
        self.learner = CurveLearner(curve)                    # each GPU's sensitivity, from its samples
        # Power readings as the measure takes them: read 5 s apart or more, each the mean since the one
        # before by the device's energy counter (pipeline/counters.py), else the instant, as read.
        self.meter: deque[tuple[datetime, float, float]] = deque()  # site power readings: (ts, kW, instant kW)
        self.it: deque[tuple[datetime, float, float]] = deque()  # (ts, meter kW, the PDUs' sum kW) per scrape
        self.it_from_gpus = False  # ... the GPUs' sum instead, while no PDU has reported (observe_facility)
        self.pdu: dict[str, tuple[datetime, float, float]] = {}  # rack -> its latest PDU reading: (ts, kW, instant kW)
        # rack -> device -> its latest reading (ts, kW, instant kW, its interval s): a rack fed by A and B feeds
        # has two PDUs, each reading its share (self.pdu holds the sum of those still reporting, as old as the
        # oldest of them: _feed)
        self.pdu_feeds: dict[str, dict[str, tuple[datetime, float, float, float]]] = {}
        self.counters: dict[tuple[str, str], Counter] = {}  # (device class, device) -> its energy counter
        # (device class, device, power or counter) -> its newest reading's time: an older one (a BMS gateway's
        # backlog, sent after its live readings) is archived, but not measured here, where time runs forward
        self.newest: dict[tuple[str, str, bool], datetime] = {}
        self.pdu_at = np.zeros(0)            # per rack (GpuTable.rack_ix): self.pdu's time, unix s (_pdu_read_at)
        self.pdu_then: deque[tuple[float, float, float]] = deque()  # at each PDUs' reading: (unix s, their
                                             # sum kW, what the caps changed in it kW during a request)
        self.started_at: datetime | None = None  # when the active request's first plan was made ...
        self.caps_from = 0.0                 # ... (unix s)
        self.caps_then: deque[tuple[float, np.ndarray]] = deque()  # during a request, at each PDUs' reading:
                                             # what the caps changed in each rack's draw then, W (GpuTable.rack_ix);
                                             # a PDU polled less often is read against the caps at its own time
        self.requests: list[tuple[PowerRequest, Outcome]] = []
        # When caps of this controller held the load: (first plan, last cap gone; None: still capped). A
        # later request's baseline leaves them out (demand-response programs' baselines skip event hours):
        # one that starts as the last ends had taken its baseline from the capped meter and asked too little.
        self.capped_spans: deque[tuple[datetime, datetime | None]] = deque()
        self.active: PowerRequest | None = None
        self.phase = "idle"
        self.cancelling = False              # the active request cancelled: restored from the next step
        self.said_over_cap = False           # its restore slowed by a site over its cap: said once a request
        self.cap = np.zeros(0)               # per GPU slot: the cap this controller set (NaN: none)
        self.demand = np.zeros(0)            # per slot: the draw when it was first capped (its demand)
        self.steady = np.zeros(0, bool)      # per slot: its job ran before the request (or has a reference
                                             # since it started) and still runs
        self.mine = np.zeros(0, bool)        # per slot: covered by the active request
        self.unheld = np.zeros(0)            # per slot: seconds in a row a cap set here did not hold it
        self.rose_s = np.zeros(0)            # ... and in which its load rose under the cap (_rose)
        self.base_it_kw = 0.0                # the PDUs' mean over the baseline window
        self.adjust_kw: dict[datetime, float] = {}  # meter reading's ts -> the baseline's adjustment then
        self.extra_w = 0.0                   # feedback: watts planned beyond the target
        self.bias_kw = 0.0                   # the meter's reduction less the caps' expected one, a minute's mean
        self.bias_s = 0.0                    # the readings' seconds since the caps last changed
        self.residual: deque[tuple[float, float]] = deque()  # (s from start, kW): each reading less the
                                             # caps' expected reduction then
        self.recent_adjust: deque[tuple[float, float]] = deque()  # (s from start, kW): the adjustments of
                                             # the last LEVEL_WINDOW_S (a level to hold: load it must shed too)
        # (steady, sensitivities, classes) of the last plan
        self.planned_on: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.changed_at: datetime | None = None
        self.last_step: datetime | None = None
        self.counted: datetime | None = None  # the newest reading of the active request measured (one that
                                              # comes late, stamped before the last step, still counts)
        self.suspects: dict[str, tuple[str, str | None]] = {}  # firing fault alert's fingerprint -> (node, UUID;
                                                                # None: every GPU of the node)
        self.benched: dict[str, tuple[str, str | None]] = {}   # the same, resolved during the active request
        self.frozen: dict[str, str] = {}                        # a FROZEN_ALERTS alert's fingerprint -> its node
        self._masks: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None  # ((version, GPUs), suspect, frozen)
        self._suspects_version = 0
        self.refused: dict[str, tuple[str, str]] = {}  # GPU UUID -> (node, its agent's status) of a cap it refused

    # ---- what the site reports ---------------------------------------------------------

    def observe_gpus(self, batch: pa.RecordBatch) -> None:
        g = self.gpus
        g.update(batch)
        rows = g.slots
        self._fit()
        # An enforced limit the source does not send (dcgm-exporter's default counters leave it out):
        # the cap set here, so that a capped draw is never taken for the job's own.
        limit = np.where(np.isnan(g.limit_w[rows]), self.cap[rows], g.limit_w[rows])
        held = self._held(rows)
        new_job = g.new_job | self._rose(rows, held)
        self.learner.observe(rows, np.where(g.forced[rows], np.nan, g.power_w[rows]), g.util[rows],
                             g.util_mem[rows], limit, self._own_w(rows), g.paused[rows],
                             new_job, g.dt_s, np.where(g.forced[rows], np.nan, g.mean_w[rows]),  # (a slowdown: no sample)
                             g.cap_reason[rows])
        if self.active is not None:
            self._fit()
            self.unheld[rows] = np.where(held | np.isnan(self.cap[rows]), 0.0,
                                         self.unheld[rows] + span_seconds(g.dt_s, UNHELD_S))
            # A job that ended is over for this request (one paused keeps its cap: it resumes under
            # it); a node with a power reading stuck can be neither verified nor moved (its
            # detectors read heat against power, siblings against siblings).
            stuck = self._stuck()[rows]
            self.steady[rows] &= ((g.util[rows] >= IDLE_UTIL) | g.paused[rows]) & ~stuck & ~new_job
            # A job that started since: counted as it draws until it has a reference (its own uncapped
            # draw, the learner's), then the caps may take from it like from any other.
            lr = self.learner
            join = rows[self.mine[rows] & ~self.steady[rows] & (g.util[rows] >= IDLE_UTIL)
                        & ~stuck & lr.referenced(rows)
                        & np.isnan(self.cap[rows])]
            self.steady[join] = True

    def _rose(self, rows: np.ndarray, held: np.ndarray) -> np.ndarray:
        """Per row (`held`: by the cap set here, `_held`): its GPU's load rose under that cap, ROSE_S in
        a row. Held at its cap, it moves more memory than its uncapped reference did, which a cap
        alone never makes a job do (a training job's step up, an inference's traffic). Its cap was
        planned on a draw it no longer has and can take more of its work than its class allows (a
        job at 470 W capped to 200 W stepped up to 700 W: 33% of its work lost, class 2 allowing
        25%), so it is learned afresh, uncapped, like a new job. False outside a request."""
        if self.active is None:
            self.rose_s[rows] = 0.0
            return np.zeros(rows.size, bool)
        g, ref = self.gpus, self.learner.ref_mem[rows]
        with np.errstate(invalid="ignore"):  # (util_mem NaN where the source sends none: never)
            rose = held & (ref > 0) & (g.util_mem[rows] > ref * (1.0 + ROSE_SHARE) + MEM_STEP)
        self.rose_s[rows] = np.where(rose, self.rose_s[rows] + span_seconds(g.dt_s, ROSE_S), 0.0)
        return self.rose_s[rows] >= ROSE_S

    def observe_alerts(self, alerts: Iterable[tuple[str, bool, Mapping[str, str]]]) -> None:
        """Alerts as they fire and resolve: (fingerprint, firing, labels). A GPU a fault alert
        names (a node's: every GPU of it) is left out of plans while the alert fires, and for the
        rest of the request it fired in; its cap is restored at the next plan: a failing GPU does
        not draw by its curve, its node may be drained, and a cap would change the clocks and heat
        the detectors judge it by."""
        for fingerprint, firing, labels in alerts:
            if labels.get("alertname") in FROZEN_ALERTS:
                if firing:
                    self.frozen[fingerprint] = labels.get("node", "")
                elif self.frozen.pop(fingerprint, None) is None:
                    continue
                self._suspects_version += 1
                continue
            if labels.get("alertname") not in SUSPECT_ALERTS:
                continue
            if firing:
                self.suspects[fingerprint] = (labels.get("node", ""), labels.get("UUID"))
            elif (target := self.suspects.pop(fingerprint, None)) is None:
                continue
            elif self.active is not None:
                # Not capped again in this request: uncapped among capped peers, a straggler has no
                # peers to be judged against, and its alert resolves only because its cap went.
                self.benched[fingerprint] = target
            self._suspects_version += 1

    def observe_actions(self, batch: pa.RecordBatch) -> None:
        """The agents' power_actions: a GPU whose cap was refused (an agent not root, a limit out of its
        range, a GPU without power management) is class 0 until a cap of it succeeds or the next request
        tries it again: the plan had counted it as shedding, the request fell short, and the capacity
        promised more than the site could shed."""
        changed = False
        for uuid, node, asked, status, detail in zip(*(batch.column(c).to_pylist() for c in (
                "gpu_uuid", "node", "requested_w", "status", "detail"))):
            if uuid is None or asked is None:
                continue
            if status in REFUSED:
                if uuid not in self.refused:
                    log.warning("power: %s of %s refused its cap (%s: %s): not planned on for the rest of the "
                                "request (tried again at the next)", uuid, node, status, detail)
                    changed = True
                self.refused[uuid] = (node, status)
            elif status == "ok" and self.refused.pop(uuid, None) is not None:
                changed = True
        if changed:
            self._suspects_version += 1

    def flex(self) -> np.ndarray:
        """Each GPU's class now: its own, 0 while a fault alert names it (observe_alerts)."""
        if not self.suspects and not self.benched and not self.refused:
            return self.gpus.flex
        return np.where(self._alert_masks()[0], 0, self.gpus.flex)

    def _stuck(self) -> np.ndarray:
        """Per GPU: its node has a power reading stuck (the controller's rule, or the detectors')."""
        stuck = self.gpus.stuck_nodes(STUCK_READINGS)
        return stuck | self._alert_masks()[1] if self.frozen else stuck

    def _alert_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """Per GPU: named by a suspect alert; on a node of a frozen one (made again as they change)."""
        g = self.gpus
        key = (self._suspects_version, len(g.uuids))
        if self._masks is None or self._masks[0] != key:
            targets = [*self.suspects.values(), *self.benched.values(), *((n, u) for u, (n, _) in self.refused.items())]
            uuids, nodes = np.array(g.uuids, dtype=object), np.array(g.nodes, dtype=object)
            suspect = (np.isin(uuids, [u for _, u in targets if u is not None])
                       | np.isin(nodes, [n for n, u in targets if u is None]))
            self._masks = (key, suspect, np.isin(nodes, list(self.frozen.values())))
        return self._masks[1], self._masks[2]

    def observe_facility(self, batch: pa.RecordBatch) -> None:
        # Only what the BMS vouches for (quality 1, or none given), as detect reads it: a meter whose link is
        # lost may send its last value again, marked bad. A PDU's reading marked bad is heard without its value
        # (its feed reports: no failed-over feed, whose going had read as load the caps shed).
        bad = bad_quality(batch)
        if pc.any(bad).as_py():
            batch = batch.set_column(batch.schema.get_field_index("value"), "value",
                                     pc.if_else(bad, pa.scalar(None, pa.float64()), batch.column("value")))
        metric, device_class = batch.column("metric"), batch.column("device_class")
        pdu_read = None  # the PDU readings' times, if the batch holds some
        # A PDU's counter means only where the GPUs too are read 5 s apart or more (GpuTable.means): the caps'
        # change each PDU reading is set against comes from the GPUs' readings, means or instants like them.
        # The site meter's wherever it is itself read that far apart: a BMS polled every 30-60 s beside GPUs
        # read every second had judged a hold on one or two instants a minute of a load that swings (a false
        # "not met" at 10.5 kW of 11.1 asked, the truth 12.2), where its energy counter gives each
        # reading's whole interval.
        gpu_means = self.gpus.means()
        by_class = {"rack": gpu_means,
                    "meter": gpu_means or (len(self.meter) > 1 and self._meter_interval_s() >= MEAN_AFTER_S)}
        for key in [k for k in self.counters if not by_class.get(k[0], False)]:
            del self.counters[key]
        # The data's time now, by most GPUs' clocks: a reading stamped more than NEWEST_AHEAD ahead of it (a
        # BMS clock that runs ahead, within the intake window) is measured but not remembered as the device's
        # newest, so that it hides none of the device's later readings. (GPU data that runs behind the meter,
        # a slower scrape or a lag, stays well within it.)
        seen = self.gpus.seen_us[self.gpus.seen_us > 0]
        ahead_of = datetime.fromtimestamp(float(np.median(seen)) / 1e6, timezone.utc) + NEWEST_AHEAD \
            if seen.size else None
        for cls, into in (("meter", None), ("rack", self.pdu)):
            means = by_class[cls]
            mine = pc.equal(device_class, cls)
            if into is not None:
                read = batch.filter(pc.and_(mine, pc.equal(metric, "power_w")))
                if read.num_rows:
                    pdu_read = unix_us(read.column("ts"))
            wanted = pa.array(["power_w", "energy_j"] if means else ["power_w"])
            rows = batch.filter(pc.and_(mine, pc.is_in(metric, wanted)))
            # Each device's readings in time order, a counter's before the power read with it (a batch may
            # hold a backlog of several scrapes): a meter and a PDU per rack per scrape.
            for ts, power, device, rack, value in sorted(zip(
                    rows.column("ts").to_pylist(), pc.equal(rows.column("metric"), "power_w").to_pylist(),
                    rows.column("device").to_pylist(), rows.column("rack").to_pylist(),
                    rows.column("value").to_pylist()), key=lambda r: (r[0], r[1])):
                if value is None or not math.isfinite(value):  # (a meter's NaN is no reading: it would
                    if into is not None and power:              # poison every mean it entered)
                        self._heard(rack, device, ts)
                    continue
                if (last := self.newest.get((cls, device, power))) is not None and ts <= last:
                    continue
                if ahead_of is None or ts <= ahead_of:
                    self.newest[(cls, device, power)] = ts
                counter = self.counters.setdefault((cls, device), Counter()) if means else None
                if not power:
                    if counter is not None:
                        counter.count(value, ts.timestamp())
                    continue
                kw = (counter.mean_w(value, ts.timestamp()) if counter is not None else value) / 1000.0
                if into is None:
                    self.meter.append((ts, kw, value / 1000.0))
                else:
                    into[rack] = self._feed(rack, device, ts, kw, value / 1000.0)
                    if (k := self.gpus.rack_ids.get(rack)) is not None and k < self.pdu_at.size:
                        self.pdu_at[k] = into[rack][0].timestamp()
        active = self.active is not None and self.phase == "active"
        if pdu_read is not None:
            # What the PDUs just read, and what the caps changed in it (each PDU reading against the caps
            # at its own time), dated by the PDU readings' median time, the lower of two (one PDU whose
            # clock runs ahead, or a meter's backlog in the batch, must not date it): a meter reading is
            # set against the PDUs at its own time, not at its arrival.
            at = float(np.partition(pdu_read, (pdu_read.size - 1) // 2)[(pdu_read.size - 1) // 2]) / 1e6
            if active:
                self._record_caps(at)
            if self.pdu_then and at == self.pdu_then[-1][0]:  # (the same read, rack by rack: the sum so far)
                self.pdu_then.pop()
            if not self.pdu_then or at > self.pdu_then[-1][0]:
                self.pdu_then.append((at, sum(v for _, v, _ in self.pdu.values()),
                                      self._capped_change_kw(()) if active else 0.0))
        if self.meter and (self.pdu or self.gpus.uuids) and (not self.it or self.it[-1][0] != self.meter[-1][0]):
            ts, kw, instant_kw = self.meter[-1]
            if self.pdu:
                if self.it_from_gpus:  # (the first PDU reading: the GPUs' sums are another scale)
                    self.it.clear()
                    self.it_from_gpus = False
                _, it_kw, capped_kw = self._pdus_at(ts)
                if kw != instant_kw and not by_class["rack"] and len(self.meter) > 1:
                    # The meter's mean over its interval against the PDUs' instants over the same interval, their
                    # mean: against the instant at its time, the cooling slope was fitted low (1.08 for 1.12) and a
                    # job that started within the interval was credited whole (a reading of -15.5 kW for 20.9)
                    lo, hi = self.meter[-2][0].timestamp(), ts.timestamp()
                    span = [e for e in self.pdu_then if lo < e[0] <= hi]
                    if span:
                        it_kw, capped_kw = float(np.mean([e[1] for e in span])), float(np.mean([e[2] for e in span]))
            elif self.gpus.uuids:
                # No PDU has reported (a site that brings only its revenue meter): the GPUs' own draw stands
                # for the IT load that moves (jobs starting and ending), so that the baseline still follows it
                # (it had been left unadjusted: a load that fell by itself was credited to the caps)
                it_kw = float(np.nansum(self.gpus.power_w)) / 1000.0
                capped_kw = float(np.sum(self._capped_now_w())) / 1000.0
                self.it_from_gpus = True
            else:
                it_kw = None
            if it_kw is not None:
                self.it.append((ts, kw, it_kw))
            if it_kw is not None and active and not self.active.racks and \
                    self._outcome(self.active).it_on_gpus == self.it_from_gpus:
                self.adjust_kw[ts] = self._adjustment_kw(self._outcome(self.active), it_kw, capped_kw)
        horizon = self.s.baseline_s + 3600.0
        for q in (self.meter, self.it):
            while q and (q[-1][0] - q[0][0]).total_seconds() > horizon:
                q.popleft()
        while self.pdu_then and self.pdu_then[-1][0] - self.pdu_then[0][0] > horizon:
            self.pdu_then.popleft()

    def _feed(self, rack: str, device: str, ts: datetime, kw: float, instant_kw: float) -> tuple[datetime, float, float]:
        """A PDU's reading of its rack's feed; the rack's reading now: (its time, kW, instant kW) summed over
        its feeds (A and B) that still report (pipeline/feeds.py): a failed-over feed's last reading had stayed
        in the sum, and the doubled other read as new load the caps were credited with."""
        feeds = self.pdu_feeds.setdefault(rack, {})
        was = feeds.get(device)
        interval = next_interval(was[3], (ts - was[0]).total_seconds()) if was is not None else math.nan
        feeds[device] = (ts, kw, instant_kw, interval)
        live = [f for f in feeds.values() if not (ts - f[0]).total_seconds() > silence_allowed_s(f[3])]
        return min(f[0] for f in live), sum(f[1] for f in live), sum(f[2] for f in live)

    def _heard(self, rack: str, device: str, ts: datetime) -> None:
        """A PDU's reading without a value (none, or one its BMS marked bad): its feed reports, its last reading
        stays in its rack's sum (silent, it would have left it as a failed-over feed)."""
        feeds = self.pdu_feeds.get(rack, {})
        if (was := feeds.get(device)) is not None and ts > was[0]:
            feeds[device] = (ts, was[1], was[2], next_interval(was[3], (ts - was[0]).total_seconds()))

    def _pdus_at(self, ts: datetime) -> tuple[float, float, float | None]:
        """The PDUs' reading nearest `ts`: (unix s, their sum kW, what the caps changed in it kW;
        None: not known, work it out now). A meter delivered late (a BMS bridged over MQTT) is
        paired with the PDUs as they read then."""
        t, best = ts.timestamp(), None
        for entry in reversed(self.pdu_then):  # (from the newest: the nearest is a few back at most)
            if best is None or abs(entry[0] - t) < abs(best[0] - t):
                best = entry
            if entry[0] <= t:
                break
        return best if best is not None else (t, sum(v for _, v, _ in self.pdu.values()), None)

    def covered_kw(self, req: PowerRequest, instant: bool = False) -> float | None:
        """The covered load's power now: the site meter, or the covered racks' PDUs (as the measure
        takes them; `instant`: as read)."""
        i = 2 if instant else 1
        if not req.racks:
            return self.meter[-1][i] if self.meter else None
        readings = [self.pdu[r][i] for r in req.racks if r in self.pdu]
        return sum(readings) if len(readings) == len(req.racks) else None

    def baseline_kw(self, now: datetime) -> float | None:
        """The site meter's mean over `power.baseline_s` before `now` while no cap of an earlier
        request held the load: a request's baseline before its adjustment."""
        values = [kw for _, kw, _ in self._in_baseline(self.meter, now)]
        return float(np.mean(values)) if values else None

    def _in_baseline(self, readings: Iterable[tuple], now: datetime) -> list[tuple]:
        """The readings (time first) in the baseline window of a request starting `now`: the last
        `power.baseline_s` before it that no earlier request's caps held (its hold and its restore),
        looking back past them as far as the readings are kept; where none is kept (a request holds caps
        for longer than that), the last `power.baseline_s`, as read. Caps a dry run planned held nothing."""
        applied = getattr(self.actuator, "applies", True)
        spans = [(start, now if end is None else min(end, now)) for start, end in self.capped_spans
                 if start < now and applied]
        need, cursor = timedelta(seconds=self.s.baseline_s), now
        for start, end in reversed(spans):  # (newest first: one request at a time, in order)
            if end < cursor:
                if cursor - end >= need:
                    break
                need -= cursor - end
            cursor = min(cursor, start)
        since = cursor - need
        kept = [r for r in readings if since <= r[0] <= now and not any(s <= r[0] <= e for s, e in spans)]
        if kept or not spans:
            return kept
        recent = now - timedelta(seconds=self.s.baseline_s)  # (judging a later request's size while one holds:
        return [r for r in readings if recent <= r[0] <= now]  # it had been left pending until that one ended)

    def meter_per_it(self) -> tuple[float, float]:
        """The meter's kW per kW of the PDUs' sum (its cooling): the slope fitted over the
        history once the IT load has varied enough; until then bounds that never credit a
        change the meter may not show: 1 for a rise (cooling never falls as the load rises),
        the meter's mean over the PDUs' for a fall (the site's fixed load does not fall).
        A meter that reads less than the PDUs' sum does not see all of their load (one feed of
        two, a meter behind part of the site): its slope may be under 1, and until it is
        fitted, it shows its mean share of a change (at most that, its fixed load being none)."""
        if not self.it:
            return 1.0, 1.0
        m = np.array([x[1] for x in self.it])
        it = np.array([x[2] for x in self.it])
        share = float(m.mean() / it.mean()) if it.mean() > 0 else 1.0
        if len(self.it) >= 30 and np.ptp(it) >= SLOPE_SPREAD_KW:
            floor = 1.0 if share >= 1.0 else MIN_METER_SLOPE
            slope = float(np.clip(np.cov(it, m, bias=True)[0, 1] / np.var(it), floor, 2.0))
            return slope, slope
        if self.it_from_gpus:  # (the GPUs are a part of the IT load: the meter's share of them bounds nothing)
            return 1.0, 1.0
        return (1.0, share) if share >= 1.0 else (share, share)

    def _adjustment_kw(self, out: Outcome, it_kw: float, capped_kw: float | None = None) -> float:
        """What the load Fleetwatch does not control added since the baseline window, at the
        meter: the PDUs' change less what the caps changed (`capped_kw`; None: at the PDUs'
        latest readings), each GPU a cap holds (a steady job drawing at its cap) from its job's
        uncapped draw (the learner's reference, which follows the job while no cap holds it)."""
        if capped_kw is None:
            capped_kw = self._capped_change_kw(out.request.racks)
        change = (it_kw - (self.base_it_kw if out.base_it_kw is None else out.base_it_kw)) - capped_kw
        rise, fall = out.meter_per_it
        return (rise if change >= 0 else fall) * change

    def _capped_now_w(self) -> np.ndarray:
        """Per rack (GpuTable.rack_ix): what the caps set here change in its GPUs' draw now, each
        GPU a cap holds (a steady job drawing at its cap) from its job's uncapped draw (the
        learner's reference, which follows the job while no cap holds it); <= 0."""
        g = self.gpus
        # Under a hardware or thermal slowdown the GPU's demand fell for its own reasons (under a
        # deep cap a power brake does not show in the draw): what it sheds is not the cap's.
        capped = self.steady & ~np.isnan(self.cap) & ~g.forced
        # Scraped 5 s apart or more: over the scrape, by its energy counter's mean (an instant of a training
        # job may catch it communicating, when its cap sheds nothing, or computing, when it sheds all).
        slow = np.flatnonzero(capped & np.isfinite(g.mean_w))
        held = np.flatnonzero(capped & np.isnan(g.mean_w))
        held = held[self._held(held)]
        change = np.concatenate([g.power_w[held] - self.learner.demand_above(held, g.power_w[held]),
                                 -self._shed_over_w(slow)])
        return np.bincount(g.rack_ix[np.concatenate([held, slow])], weights=change, minlength=len(g.rack_ids))

    def _pdu_read_at(self) -> np.ndarray:
        """Per rack (GpuTable.rack_ix): its PDU's latest reading's time (unix s; NaN: none yet)."""
        grow = len(self.gpus.rack_ids) - self.pdu_at.size
        if grow > 0:
            self.pdu_at = np.concatenate([self.pdu_at, np.full(grow, np.nan)])
            for rack, k in self.gpus.rack_ids.items():  # (a rack's GPUs seen after its PDU)
                if k >= self.pdu_at.size - grow and rack in self.pdu:
                    self.pdu_at[k] = self.pdu[rack][0].timestamp()
        return self.pdu_at

    def _record_caps(self, at: float) -> None:
        """What the caps change in each rack's draw now, dated `at` (unix s)."""
        if self.caps_then and at <= self.caps_then[-1][0]:
            return  # (a batch late behind the last: the caps then were the record's before it)
        self.caps_then.append((at, self._capped_now_w()))
        while at - self.caps_then[0][0] > CAPS_HISTORY_S:
            self.caps_then.popleft()

    def _capped_change_kw(self, racks: tuple[str, ...]) -> float:
        """What the caps changed in the draw of `racks` (none: every rack a PDU reads) when their
        PDUs last read: at each reading's own time (the record nearest it; none before the
        request's plan; now, without records), so a PDU polled less often than the GPUs and the
        meter is read against the caps it saw."""
        if not self.caps_then:
            return float(np.sum(self._capped_now_w())) / 1000.0
        read = self._pdu_read_at()
        if racks:
            ids = self.gpus.rack_ids
            rack = np.array([ids[r] for r in racks if r in ids], np.int64)
            rack = rack[np.isfinite(read[rack])]
        else:
            rack = np.flatnonzero(np.isfinite(read))
        if not rack.size:
            return 0.0
        t = read[rack]
        at = np.fromiter((a for a, _ in self.caps_then), np.float64, len(self.caps_then))
        right = np.minimum(np.searchsorted(at, t), at.size - 1)
        left = np.maximum(right - 1, 0)
        nearest = np.where(np.abs(at[left] - t) <= np.abs(at[right] - t), left, right)
        saw = t >= self.caps_from  # (a reading from before the plan saw none)
        total = 0.0
        for n in np.unique(nearest[saw]):  # (a few: PDUs read in rounds since the last)
            then = self.caps_then[int(n)][1]
            k = rack[saw & (nearest == n)]
            total += float(np.sum(then[k[k < then.size]]))
        return total / 1000.0

    # ---- the requests --------------------------------------------------------------

    def submit(self, req: PowerRequest, baseline: tuple[float, float | None] | None = None) -> Outcome:
        """Take `req`; `baseline`: (the meter's, the PDUs' kW) it was given at its first start,
        for a request a restart resumes (the meter now is held down by the caps the agents still
        hold for their lease: a baseline taken on it would ask nothing of them)."""
        outcome = Outcome(req, given_baseline=baseline)
        self.requests.append((req, outcome))
        return outcome

    def step(self, now: datetime) -> None:
        try:
            self._step(now)
        finally:
            self.last_step = now

    def _fit(self) -> None:
        """The per-GPU arrays of this controller, grown to the GPUs seen so far."""
        grow = len(self.gpus.uuids) - self.cap.size
        if grow > 0:
            self.cap = np.concatenate([self.cap, np.full(grow, np.nan)])
            self.demand = np.concatenate([self.demand, np.full(grow, np.nan)])
            self.steady = np.concatenate([self.steady, np.zeros(grow, bool)])
            new = np.zeros(grow, bool)
            if self.active is not None:  # a GPU first seen during a request it covers (a board replaced, a node back)
                racks = self.active.racks
                new[:] = [not racks or r in racks for r in self.gpus.racks[self.cap.size - grow:]]
            self.mine = np.concatenate([self.mine, new])
            self.unheld = np.concatenate([self.unheld, np.zeros(grow)])
            self.rose_s = np.concatenate([self.rose_s, np.zeros(grow)])
        self.learner.grow(self.cap.size)

    def _step(self, now: datetime) -> None:
        self._fit()
        for req, o in self.requests:  # after a restore: its rise's readings that came late, the minute after
            if req is not self.active and o.restore_done is not None and now < o.restore_done + 3 * MINUTE \
                    and (o.read_to is None or o.read_to < self._rise_end(o) + MINUTE):
                self._after_hold(req, o)
        if self.active is None:
            if (due := next(self._due(now), None)) is not None:
                self._start(due, now)
            return
        req, out = self.active, self._outcome(self.active)
        if self.phase == "active":
            self._drop_silent()
        if self.phase == "active" and not req.racks:  # the caps themselves move the IT load: a fit soon
            out.meter_per_it = self.meter_per_it()
        if self.phase == "active":
            achieved, seen = None, self.counted
            # Every reading not measured yet (the site meter's), in order, late ones too (a BMS polled
            # slower than the GPUs, a reconnect); the covered racks' sum once each has a newer one. None
            # new (a meter gone silent): nothing measured, no correction (the last reading again would
            # be a hold nobody saw; the role reports the silence).
            readings = [(t, kw) for t, kw, _ in self._covered_since(req, seen) if req.start <= t <= now]
            if readings:
                # The seconds each reading stands for: the meter's interval (a BMS polls every 1-60 s),
                # the covered racks' since the last sum measured.
                every_s = self._meter_interval_s() if not req.racks else \
                    (readings[-1][0] - seen).total_seconds() if seen is not None else self.s.control_interval_s
                self.counted = readings[-1][0]
                values = []
                for t, kw in readings:
                    at_s, value, adjust = self._measure(req, out, t, kw)
                    values.append((at_s, value))
                    self.recent_adjust.append((at_s, adjust))
                level = req.target_kw is not None
                while self.recent_adjust and self.recent_adjust[-1][0] - self.recent_adjust[0][0] > LEVEL_WINDOW_S:
                    self.recent_adjust.popleft()
                expected = self._expected_kw(req, out)
                if level:  # what the caps shed less the load that came since (its recent median: no swing)
                    expected -= float(np.median([a for _, a in self.recent_adjust]))
                # (the readings of the request's start, taken before its first caps, do count: they make
                # the first correction strong, which the first minute's mean needs: 21 of 24 met at 1 s on
                # seeds 1-3, 19 without; with a meter 20 s late they over-shed, 1.23x at most, 1.17x without)
                changed_s = -math.inf if self.changed_at is None or self.changed_at <= self.started_at else \
                    (self.changed_at - req.start).total_seconds()
                for at_s, v in values:
                    self.residual.append((at_s, v - expected))
                    if at_s < changed_s:
                        continue  # (read before the caps it would be set against: a meter delivered late)
                    self.bias_s += every_s
                    self.bias_kw += (v - expected - self.bias_kw) * min(every_s / min(self.bias_s + BIAS_PRIOR_S, BIAS_S),
                                                                        0.5)
                achieved = expected + self.bias_kw
            self.adjust_kw = {t: v for t, v in self.adjust_kw.items() if t > now}
            if now >= req.end or self.cancelling:
                self.phase, self.cancelling = "restoring", False
            elif achieved is not None and self._settled(now):
                self._correct(req, out, achieved, now)
        if self.phase == "restoring":
            if out.restore_from is None:
                out.restore_from = min(now, req.end)
                out.read_to = out.meter_to = self.counted
            self._after_hold(req, out)
            if (after := self._takes_over(now)) is not None:
                self._restored(out, now)
                self._start(after, now)
            elif self._restore_step(now):
                self._restored(out, now)

    def _restored(self, out: Outcome, now: datetime) -> None:
        """The active request's caps are gone (or taken over by the next request's plan)."""
        out.restore_done = now
        self.capped_spans[-1] = (self.capped_spans[-1][0], now)
        self.active, self.phase = None, "idle"
        self.benched.clear()
        self._suspects_version += 1

    def _takes_over(self, now: datetime) -> PowerRequest | None:
        """A site's request due now: it starts from the caps being restored (its plan moves them, and
        it covers every GPU), not after the restore, which had made it start late (at a large site's
        restore rate, a minute and more). One on racks waits for the restore: its baseline is its
        PDUs as they read when it starts, which the caps would hold down."""
        for req in self._due(now):
            if not req.racks and self._baseline_of(req) is not None:
                log.info("power request %s: starts from the caps of request %s, which were being restored",
                         req.id, self.active.id if self.active is not None else "-")
                return req
        return None

    def _due(self, now: datetime) -> Iterator[PowerRequest]:
        """The requests whose time has come and that have not started, in the order they came."""
        return (req for req, _ in self.requests if req.start <= now < req.end and not self._started(req))

    def _covered_since(self, req: PowerRequest, since: datetime | None) -> list[tuple[datetime, float, float]]:
        """The covered load's readings stamped after `since` (None: every one kept), oldest first: the
        site meter's, or the covered racks' sum once each has read again (stamped by the oldest).
        None new (a meter gone silent): nothing (the last reading again would be a hold nobody saw)."""
        if not req.racks:
            return self._meter_since(since)
        covered = self.covered_kw(req)
        if covered is None:
            return []
        newest = min(self.pdu[r][0] for r in req.racks)
        return [(newest, covered, self.covered_kw(req, instant=True))] if since is None or newest > since else []

    def _meter_since(self, since: datetime | None) -> list[tuple[datetime, float, float]]:
        """The site meter's readings stamped after `since`, in the order they came (one resent or
        delivered out of order hides no newer one)."""
        return [r for r in self.meter if since is None or r[0] > since]

    def _measure(self, req: PowerRequest, out: Outcome, t: datetime, kw: float) -> tuple[float, float, float]:
        """One reading of the covered load as the reduction it shows: (s from start, kW, the baseline's
        adjustment kW), kept in the outcome. A level to hold (target_kw, a firm service level) is
        judged by the meter itself: the load that came since the baseline must be shed too, the load
        that left gives caps back. An amount to shed is judged against the adjusted baseline."""
        adjust = self.adjust_kw.pop(t, None) if req is self.active else None  # (worked out on arrival
        if adjust is None:  # for the active request; a meter reading that came late, the racks' sum)
            adjust = self._adjustment_kw(out, self._covered_it_kw(req)) if req.racks else \
                self._adjustment_kw(out, *self._pdus_at(t)[1:])
        value = out.baseline_kw + (0.0 if req.target_kw is not None else adjust) - kw
        at_s = (t - req.start).total_seconds()
        if out.reached_s is None and value >= 0.98 * out.requested_kw:
            out.reached_s = at_s
        if t < req.end:
            out.shed_kw.append((at_s, value))
            if out.reached_s is not None:
                out.achieved_kw.append((at_s, value))
                out.adjustment_kw.append((at_s, adjust))
        return at_s, value, adjust

    def _rise_end(self, out: Outcome) -> datetime:
        """Until when the readings show the caps rising: a step after the last one went."""
        return out.restore_done + timedelta(seconds=self.s.control_interval_s)

    def caught_up(self, out: Outcome, now: datetime) -> bool:
        """Whether a restore's rise has all its readings in, by their own time (a meter delivered late
        sends its last ones after the last cap went), or a minute has passed waiting (a meter gone
        silent): its report can go."""
        if out.restore_done is None:
            return False
        return (out.read_to is not None and out.read_to >= self._rise_end(out)) or now >= out.restore_done + MINUTE

    def _after_hold(self, req: PowerRequest, out: Outcome) -> None:
        """The readings since the last taken, each where its own time puts it (a meter delivered late
        sends the hold's last seconds while the caps rise, and the rise's after the last cap went):
        the hold's measured, the rise's peak (a spike is short: each step's highest), the peak of the
        minute after the last cap went; a site reading over the site's power cap while they rose."""
        new = self._covered_since(req, out.read_to)
        if new:
            out.read_to = new[-1][0]
        for t, kw, _ in new:
            if t < out.restore_from and (self.counted is None or t > self.counted) and t >= req.start:
                self._measure(req, out, t, kw)
        end = None if out.restore_done is None else self._rise_end(out)

        def rising_at(t: datetime) -> bool:
            return t >= out.restore_from and (end is None or t <= end)
        rising = [kw for t, _, kw in new if rising_at(t)]  # (peaks: the instants)
        if rising:
            out.restoring_kw.append(max(rising))
        after = [] if end is None else [kw for t, _, kw in new if end < t <= end + MINUTE]
        if after:
            out.restored_kw.append(max(after))
        meter = new if not req.racks else self._meter_since(out.meter_to)
        if meter:
            out.meter_to = meter[-1][0]
        if self.site_cap_w and any(kw * 1000.0 > self.site_cap_w for t, _, kw in meter if rising_at(t)):
            out.over_site_cap = True

    def readings_interval_s(self) -> tuple[float | None, float | None]:
        """How often the GPUs and the site meter are read (s; None before two readings)."""
        return self.gpus.known_interval_s, self._meter_interval_s() if len(self.meter) > 1 else None

    def slow_readings(self) -> str:
        """Why requests here are met less often than the loop can, in words: the GPUs or the
        meter read further apart than SLOW_READINGS_S ('' when neither is)."""
        slow = [f"{what} read every {every:.0f} s" for what, every in zip(("GPUs", "the site meter"),
                                                                          self.readings_interval_s())
                if every is not None and every > SLOW_READINGS_S + 0.5]
        if not slow:
            return ""
        return (f"{' and '.join(slow)}: a hold is judged on a few readings a minute and corrected a reading "
                f"late; read them every {SLOW_READINGS_S:.0f} s or faster (agent.interval_s, dcgm.interval_s with "
                f"dcgm-exporter's --collect-interval, the BMS's poll)")

    def _meter_interval_s(self) -> float:
        """The site meter's interval: its last readings' median step (1 s before any)."""
        times = [t for t, *_ in itertools.islice(reversed(self.meter), 11)][::-1]
        steps = [(b - a).total_seconds() for a, b in zip(times, times[1:]) if b > a]
        return float(np.median(steps)) if steps else 1.0

    def _covered_it_kw(self, req: PowerRequest) -> float:
        """The covered IT load now: every PDU (the site), or the covered racks' (their sum is
        the covered power itself)."""
        if req.racks:
            return self.covered_kw(req) or 0.0
        return sum(v for _, v, _ in self.pdu.values())

    def _started(self, req: PowerRequest) -> bool:
        return self._outcome(req).baseline_kw is not None

    def _outcome(self, req: PowerRequest) -> Outcome:
        return next(o for r, o in self.requests if r is req)

    def _baseline_of(self, req: PowerRequest) -> float | None:
        """`req`'s baseline: the one it was given (resumed), the site meter's (baseline_kw), or
        its racks' PDUs now (None: no reading)."""
        given = self._outcome(req).given_baseline
        return given[0] if given else self.baseline_kw(req.start) if not req.racks else self.covered_kw(req)

    def _start(self, req: PowerRequest, now: datetime) -> None:
        out = self._outcome(req)
        given = out.given_baseline
        baseline = self._baseline_of(req)
        if baseline is None:
            log.warning("power request %s: no meter reading to baseline %s on; it is not run", req.id, req.where())
            out.baseline_kw = float("nan")
            return
        out.baseline_kw = baseline
        out.requested_kw = req.reduction_w(baseline) / 1000.0
        # The adjustment's reference: the IT load over the same window, and each GPU whose job ran
        # before the request at that job's own uncapped draw (a job that started within the window
        # counts from its level, not the window's mean).
        self._fit()
        if req.racks:
            self.base_it_kw, out.meter_per_it = baseline, (1.0, 1.0)
        else:
            window = [it for _, _, it in self._in_baseline(self.it, req.start)]
            self.base_it_kw = float(np.mean(window)) if window else self._covered_it_kw(req)
            out.meter_per_it = self.meter_per_it()
        out.it_on_gpus = self.it_from_gpus
        if given and given[1] is not None:  # (resumed: taken on the PDUs, the usual scale; a site without them
            self.base_it_kw, out.it_on_gpus = given[1], False  # resumes unadjusted)
        out.base_it_kw = self.base_it_kw
        self.mine = np.zeros(self.cap.size, bool)
        self.mine[self.gpus.covered(req.racks)] = True
        lr = self.learner
        self.steady = (self.mine & (self.gpus.util >= IDLE_UTIL) & lr.referenced()
                       & ~self._stuck())
        self.adjust_kw, self.counted = {}, None
        self.active, self.phase, self.extra_w, self.bias_kw = req, "active", 0.0, 0.0
        self.said_over_cap = False
        if self.refused:  # (each request tries them again: an agent since run as root takes its caps)
            self.refused.clear()
            self._suspects_version += 1
        self.residual.clear()
        self.recent_adjust.clear()
        self.caps_then.clear()
        self.started_at, self.caps_from = now, now.timestamp()
        self.capped_spans.append((now, None))
        while len(self.capped_spans) > 1 and self.capped_spans[0][1] < now - timedelta(
                seconds=self.s.baseline_s + 3600.0):  # (past the readings kept: observe_facility's horizon)
            self.capped_spans.popleft()
        self._record_caps(self.caps_from)  # (none yet)
        snapshot = self._snapshot(req.racks)
        p = self._plan(req, out, now)
        cost_w = out.requested_kw * 1000.0
        _, uniform = uniform_cost(snapshot, cost_w, self.curve)
        out.planned_loss_pct = p.loss_pct
        out.uniform_loss_pct = 100.0 * uniform / p.work_now if p.work_now > 0 else 0.0
        log.info("power request %s: %s of %s from a baseline of %.1f kW: %d GPUs capped, %.1f%% of their work "
                 "(uniform capping: %.1f%%)", req.id, req.goal(), req.where(), baseline, out.gpus_capped,
                 p.loss_pct, out.uniform_loss_pct)

    def flexible_kw(self, racks: tuple[str, ...] = ()) -> float:
        """What the GPUs of `racks` (none: the site) can shed now within every class."""
        return capacity_w(self._snapshot(racks), self.curve) / 1000.0

    def set_jobs(self, jobs: dict[str, str]) -> None:
        """Which job runs on each node now, as the scheduler says (power/node_labels.py)."""
        self.jobs = jobs

    def firm(self, racks: tuple[str, ...] = ()) -> Firm | None:
        """What the GPUs of `racks` (none: the site) can shed now within every class if the
        job that holds the most of it ends or pauses: what a site can promise (N-1). A GPU's
        job is the one its samples name (the first of several sharing it), else the scheduler's
        on its node (set_jobs); a node without a known job counts as a job of its own. None
        before any GPU reports."""
        mine = self.gpus.covered(racks)
        if not mine.size:
            return None
        of = [(self.gpus.job[i] or "").split(",")[0] or scheduler_entry(self.jobs, self.gpus.nodes[i]) for i in mine]
        names, job = np.unique(np.array([f"job {j}" if j else f"node {self.gpus.nodes[i]}" for i, j in zip(mine, of)],
                                        dtype=object), return_inverse=True)
        left_w, largest, held_w = firm_capacity_w(self._snapshot(racks), self.curve, job)
        if largest < 0:
            return Firm(0.0, None, 0.0, 0)
        return Firm(left_w / 1000.0, str(names[largest]), held_w / 1000.0, int(np.sum(job == largest)))

    def work_lost(self, racks: tuple[str, ...] = ()) -> tuple[float, float]:
        """What the caps on the GPUs of `racks` (none: the site) cost now, and what one cap on
        every one of them would cost for the same watts: (lost, uniform), in full-load GPUs'
        worth of work, on the planner's model (each GPU's learned curve)."""
        snap = self._snapshot(racks)
        mine = self.gpus.covered(racks)
        cap = self.cap[mine] if self.cap.size else np.full(mine.size, np.nan)
        lost = float(np.sum(snap.work(np.full(mine.size, np.nan), self.curve) - snap.work(cap, self.curve)))
        shed_w = float(np.sum(snap.shed(cap)))
        uniform = uniform_cost(snap, shed_w, self.curve)[1] if shed_w > 0 else 0.0
        return max(lost, 0.0), max(uniform, 0.0)

    def _snapshot(self, racks: tuple[str, ...]) -> GpuPower:
        """The covered GPUs as the planner sees them: a GPU capped here at its demand then, each
        at its learned sensitivity's pessimistic side."""
        self._fit()
        g = self.gpus
        mine = g.covered(racks)
        own = self._own_w()
        max_w = np.where(np.isnan(g.limit_w), own, g.limit_w)
        busy = g.util >= IDLE_UTIL
        # A job's draw when it draws (a training job between its communication phases), not this sample's,
        # for the share of the time it draws it.
        known = busy & self.learner.referenced()
        demand = self.learner.demand()
        now_w = np.where(known, np.fmax(g.power_w, np.fmin(demand, max_w)), g.power_w)
        draw = np.where(np.isnan(self.demand), now_w, np.fmax(self.demand, g.power_w))
        flex = np.where(g.silent(), 0, self.flex())  # a GPU gone silent is no capacity: nothing would show its cap
        if self.active is not None:  # only a steady job's saving is the request's: the baseline's
            flex = np.where(self.steady, flex, 0)  # adjustment counts the rest (idle GPUs, new jobs) as drawn
        duty = np.where(known, self.learner.duty(demand, own), 1.0)
        # A GPU of a higher limit than the curve's goes as low as the curve stretched to it; one of a lower
        # limit no lower than the curve's minimum (a site's -pl 600 H100 still refuses under 200 W).
        lowest = np.fmax(self.curve.min_limit_w, self.curve.min_limit_w * own / self.curve.max_limit_w)
        full = GpuPower(draw, busy, flex, lowest, own, self.learner.upper(), duty)
        return GpuPower(*(a[mine] for a in (full.power_w, full.busy, full.flex_class, full.min_limit_w,
                                            full.max_limit_w, full.sensitivity, full.duty)))

    def _plan(self, req: PowerRequest, out: Outcome, now: datetime):
        mine = self.gpus.covered(req.racks)
        snapshot = self._snapshot(req.racks)
        want = out.requested_kw * 1000.0
        p = plan(snapshot, want + self.extra_w, self.curve, headroom_w=want * self.s.headroom_pct / 100.0)
        self.planned_on = (self._shedding(), self.learner.upper(), self.flex().copy())
        caps = {}
        new = np.full(self.cap.size, np.nan)
        new[mine] = self._probe(snapshot, p.cap_w, mine)
        stuck = self._stuck()
        new[stuck] = self.cap[stuck]  # the node as it is (none stays none)
        paused = self.gpus.paused & self.steady
        new[paused] = self.cap[paused]  # a job paused resumes as it was capped (it sheds nothing meanwhile)
        for slot in np.flatnonzero(~np.isnan(new) | ~np.isnan(self.cap)):
            old, cap = self.cap[slot], new[slot]
            if np.isnan(cap):
                caps[self.gpus.uuids[slot]] = None
            elif np.isnan(old) or abs(old - cap) >= 1.0:
                caps[self.gpus.uuids[slot]] = round(float(cap), 1)
                if np.isnan(self.demand[slot]):
                    self.demand[slot] = snapshot.power_w[np.searchsorted(mine, slot)]
            else:
                new[slot] = old  # (a change under a watt is not sent: the cap stays what the GPU has)
        self.cap = new
        self.demand[np.isnan(new)] = np.nan
        out.gpus_capped = int(np.count_nonzero(~np.isnan(new)))
        if caps:
            self.actuator.apply(caps)
            self.changed_at, self.bias_s = now, 0.0
        return p

    def _probe(self, snapshot: GpuPower, cap_w: np.ndarray, mine: np.ndarray) -> np.ndarray:
        """The plan's caps, and a light one on each steady job the plan leaves alone and whose
        curve is not learned yet: PROBE_SHARE under its draw (within its class), so that its
        samples show what a cap costs it; the watts it sheds count like any others."""
        lr = self.learner
        unknown = (self.steady[mine] & (lr.points[mine] < PROBE_POINTS) & np.isnan(cap_w) & snapshot.busy
                   & (snapshot.flex_class > 0))
        if not unknown.any():
            return cap_w
        probe = np.fmax((1.0 - PROBE_SHARE) * snapshot.power_w, np.fmax(floors(snapshot, self.curve),
                                                                        snapshot.min_limit_w))
        return np.where(unknown & (probe < snapshot.power_w - 1.0), probe, cap_w)

    def _drop_silent(self) -> None:
        """A GPU gone silent (GpuTable.silent) leaves the request: no longer steady (its change is the
        load not controlled, which the PDUs show), its cap lifted (a restore its agent takes if it
        still runs; a lease lapses otherwise). Back, it joins again like a new job."""
        gone = np.flatnonzero(self.gpus.silent() & (self.steady | ~np.isnan(self.cap)))
        if not gone.size:
            return
        self.steady[gone] = False
        capped = gone[~np.isnan(self.cap[gone])]
        if capped.size:
            self.actuator.apply({self.gpus.uuids[i]: None for i in capped})
            self.cap[capped] = self.demand[capped] = np.nan
            log.info("power request %s: %d GPUs sent no sample for %.0f s: left out, their caps lifted",
                     self.active.id if self.active else "-", len(gone), SILENT_S)

    def _own_w(self, slots=slice(None)) -> np.ndarray:
        """Per GPU: its own limit, which a cap is under and a restore returns to: the highest
        it (or its model) enforced (a site's `nvidia-smi -pl 600`, a 400 W part's default), the
        recorded H100's where nothing is known yet."""
        own = self.gpus.default_w[slots]
        return np.where(np.isnan(own), self.curve.max_limit_w, own)

    def _held(self, slots=slice(None)) -> np.ndarray:
        """Per GPU: held by the cap set here (learn.held_by_cap; no cap: never)."""
        cap = self.cap[slots]
        return ~np.isnan(cap) & held_by_cap(self.gpus.power_w[slots], cap, self.gpus.cap_reason[slots])

    def _shed_over_w(self, slots: np.ndarray) -> np.ndarray:
        """What the cap each GPU of `slots` enforced (the one set here where the source sends none) took
        from its draw over its last scrape, by its energy counter's mean (CurveLearner.shed_over); held
        at either end of the scrape by learn.held_by_cap."""
        g = self.gpus
        limit = np.where(np.isnan(g.limit_w[slots]), self.cap[slots], g.limit_w[slots])
        held = held_by_cap(g.power_w[slots], limit, g.cap_reason[slots]) \
            | held_by_cap(g.before_w[slots], limit, g.before_reason[slots])
        return self.learner.shed_over(slots, limit, g.mean_w[slots], held)

    def _shedding(self) -> np.ndarray:
        """Per GPU: its job's saving counts for the request now (steady, not paused by a checkpoint)."""
        return self.steady & ~self.gpus.paused

    def _minute_swing_kw(self) -> float:
        """How much the reduction's mean over a minute moves by itself: the spread (a robust sd:
        a job's stall is no swing) of the means of every minute of readings in the last
        `SWING_S`, less what the caps were expected to shed at each (the plan's own changes are
        no swing). A training job's shed comes and goes with its step, and a minute holds more
        or fewer of its communication phases; 0 before a minute and a half of the hold."""
        while self.residual and self.residual[-1][0] - self.residual[0][0] > SWING_S:
            self.residual.popleft()
        if len(self.residual) < 2 or self.residual[-1][0] - self.residual[0][0] < 1.5 * MINUTE_S:
            return 0.0
        t, v = (np.array(x) for x in zip(*self.residual))
        end = np.searchsorted(t, t + MINUTE_S)  # from each reading, the readings of a minute on
        i = np.flatnonzero(end < t.size)
        c = np.concatenate([[0.0], np.cumsum(v)])
        means = (c[end[i]] - c[i]) / (end[i] - i)
        return float(1.4826 * np.median(np.abs(means - np.median(means))))

    def _expected_kw(self, req: PowerRequest, out: Outcome) -> float:
        """What the caps set shed at the meter by the plan's model: each steady GPU's duty of
        its demand above its cap (a paused job's, or one whose load fell under its cap for
        longer than a communication phase: nothing), with the site's cooling."""
        snap = self._snapshot(req.racks)
        mine = self.gpus.covered(req.racks)
        on = self._shedding()[mine] & (self.unheld[mine] < UNHELD_S)
        return float(np.sum(snap.shed(self.cap[mine])[on])) / 1000.0 * (out.meter_per_it[1] if not req.racks else 1.0)

    def _settled(self, now: datetime) -> bool:
        """The caps last set have settled, and the meter has read since (a meter delivered late
        tells nothing yet of caps set after its readings: correcting on it again would correct
        the same shortfall twice)."""
        return self.changed_at is None or ((now - self.changed_at).total_seconds() >= SETTLE_S
                                           and self.counted is not None and self.counted >= self.changed_at)

    def _correct(self, req: PowerRequest, out: Outcome, achieved_kw: float, now: datetime) -> None:
        """Feedback (integral): plan a shortfall on top, give an excess beyond the headroom
        back; the load moves under a request (jobs start and end), the caps follow it. The
        plan is made again every step: the curves learn as the caps show each job's cost.
        `achieved_kw` is the caps' expected reduction now plus the meter's mean bias against it
        (not the last readings: a training job's shed comes and goes with its step, and caps
        that chased it would swing with it); the headroom grows to `power.headroom_sd` sd of the minute
        means, which a hold is judged on."""
        want = out.requested_kw
        margin = max(want * self.s.headroom_pct / 100.0, 2.0 * self.s.headroom_sd * self._minute_swing_kw())
        error = want + margin / 2 - achieved_kw  # aim inside the headroom
        if abs(error) <= margin / 2 and not self._relearned():
            return  # the caps stay: one moved back and forth heats and cools a GPU for nothing
        # A meter read 5 s apart or more: an excess is not given back in the hold's last minute and the two
        # readings it takes to correct one (a give-back that overshoots shows a scrape later, and its correction
        # after the last minute is judged).
        every_s = self._meter_interval_s()
        late = every_s >= MEAN_AFTER_S and (req.end - now).total_seconds() < MINUTE_S + 2 * every_s
        if abs(error) > margin / 2 and not (error < 0 and late):
            self.extra_w = max(-want * 1000.0, self.extra_w + error * 1000.0)
        elif not self._relearned():
            return
        p = self._plan(req, out, now)
        # Anti-windup: at the classes' capacity a shortfall stays, and more asked only waits to
        # over-shed the moment capacity returns (a job starts).
        self.extra_w = min(self.extra_w, max(0.0, p.capacity_w - want * 1000.0))

    def _relearned(self) -> bool:
        """Whether the plan's inputs moved: jobs that joined or ended, curves learned since."""
        if self.planned_on is None:
            return True
        steady, sens, flex = self.planned_on
        now = self._shedding()
        if steady.size != now.size or np.any(steady != now) or np.any(flex != self.flex()[:flex.size]):
            return True  # (a class changed: a node's labels said so, or a job of another class came)
        return bool(np.any(np.abs(self.learner.upper()[: sens.size] - sens) > RELEARNED))

    def _restore_step(self, now: datetime) -> bool:
        """Raise every cap by one step: the uniform rise whose added draw (at most each
        GPU's demand) is the restore rate times the interval, and stays under the site cap.
        Whether every cap is gone."""
        capped = np.flatnonzero(~np.isnan(self.cap))
        budget_w = self.s.restore_rate_kw_s * 1000.0 * self.s.control_interval_s
        if self.site_cap_w and self.meter:
            under_cap_w = self.site_cap_w - self.meter[-1][2] * 1000.0
            if under_cap_w < OVER_CAP_RESTORE * budget_w and not self.said_over_cap:
                self.said_over_cap = True
                log.warning("power: the site reads %.1f kW against its cap of %.1f kW while request %s restores: its "
                            "caps rise at %g of power.restore_rate_kw_s (slowed, not held: a cap does not outlive "
                            "its request)", self.meter[-1][2], self.site_cap_w / 1000.0,
                            self.active.id if self.active is not None else "?", OVER_CAP_RESTORE)
            budget_w = max(OVER_CAP_RESTORE * budget_w, min(budget_w, under_cap_w))
        cap, demand = self.cap[capped], self.demand[capped]
        # A job that started under a cap (during the request or its restore): its demand is not known.
        new_job = (self.gpus.util[capped] >= IDLE_UTIL) & ~self.steady[capped]
        limit = self._own_w(capped)  # back to each GPU's own limit (a site's policy, or its model's)
        demand = np.where(new_job, np.fmax(demand, limit), demand)

        def added(rise: float) -> float:
            return float(np.sum(np.minimum(demand, np.minimum(cap + rise, limit)) - np.minimum(demand, cap)))
        lo, hi = 0.0, float(np.max(limit - cap)) if capped.size else 0.0
        if added(hi) <= budget_w:
            rise = hi
        else:
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if added(mid) <= budget_w else (lo, mid)
            rise = lo
        new = np.minimum(cap + rise, limit)
        done = new >= limit - 1e-6
        caps: dict[str, float | None] = {}
        for slot, c, d in zip(capped, new, done):
            caps[self.gpus.uuids[slot]] = None if d else round(float(c), 1)
        self.cap[capped] = np.where(done, np.nan, new)
        self.demand[capped[done]] = np.nan
        if caps:
            self.actuator.apply(caps)
            self.changed_at, self.bias_s = now, 0.0
        return not np.any(~np.isnan(self.cap))

    def cancel(self, request_id: str) -> str:
        """End a request early (`fleetwatch power cancel`): one not started yet is dropped
        ("dropped"); the active one goes to its staged restore at the next step
        ("restoring"); one over or unknown is left as it is ("")."""
        for i, (req, out) in enumerate(self.requests):
            if req.id != request_id:
                continue
            if req is self.active:
                if self.phase != "active" or self.cancelling:
                    return ""
                self.cancelling = True  # (until the step, the caps hold: the readings meanwhile are the hold's)
                return "restoring"
            if out.baseline_kw is None:
                del self.requests[i]
                return "dropped"
            return ""
        return ""

    def forget(self, request_id: str) -> None:
        """Drop a request that is over (its owner reported it): a long-running controller keeps
        only what it still drives. The active one stays until its caps are restored."""
        self.requests = [(r, o) for r, o in self.requests if r.id != request_id or r is self.active]

    def stop(self) -> None:
        """Restore every cap set (a cap never outlives its controller)."""
        capped = np.flatnonzero(~np.isnan(self.cap))
        if capped.size:
            self.actuator.apply({self.gpus.uuids[s]: None for s in capped})
            self.cap[capped] = np.nan
