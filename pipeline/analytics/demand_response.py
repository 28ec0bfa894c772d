"""`fleetwatch eval --power-requests N`: demand-response events on the simulated fleet.

N requests, evenly spread over the run after a baseline window, each asking the site to
shed 10-40% (drawn from the run's seed) of its GPUs' power at the time (the flexible part
of its load; the rest of the site, CPUs and cooling base, is not capped), for 10 minutes
or the time left, with a 30 s ramp. The site's controller (power/controller.py) plans,
applies the caps to the simulated GPUs (power/actuator.py), verifies them by the site
meter and restores them in steps; the detectors run on the same samples meanwhile, so a
capped GPU that raises a fault alert shows up as a false alert in the eval's scores.

Scored (the JSON's `demand_response`):
  requests, met                       met: at the target by its ramp deadline, and held
                                      (every minute's mean of the hold within 2% of it), as
                                      the controller measures it: the site meter against the
                                      baseline adjusted for the load it does not control
  rejected                            refused when asked (more than the flexibility
                                      classes allow; the refusal is logged)
  over_firm, met_over_firm            accepted requests that asked more than the firm
                                      capacity (what the classes allow once the job holding
                                      the most of it ends or pauses: N-1, Controller.firm),
                                      and how many of those were met anyway
  class_bound_exceeded                GPUs, summed over the requests, that lost more of their work
                                      from start to end than their flexibility class allows
                                      (CLASS_MAX_LOSS, with 1% of slack), by the truth: a class is
                                      a promise about work
  time_to_target_p99_s                from start to the first meter reading at the target
  reduction_shortfall_max_pct         the worst minute of a hold, below its target
  reduction_true_min_pct              the same worst minute by the simulator's truth: what the
                                      caps shed (each GPU's draw were no cap set, less what it
                                      drew, plus cooling), as % of the target; under 98 the
                                      adjusted baseline claimed more than the caps did
  credit_error_max_pct                the largest gap, in any minute of a hold, between the
                                      reduction the controller measured and what the caps shed
                                      by the simulator's truth, as % of the target: how far the
                                      adjusted baseline can be trusted
  throughput_cost_pct                 the work the fleet's GPUs lost from start to end,
                                      measured (the simulator's work done against uncapped)
  uniform_cap_cost_pct                what one cap on every flexible GPU an agent reaches (for
                                      the oracle too) would have lost over the same seconds,
                                      each second shedding the watts the caps really shed then,
                                      on the same work model (each job's own sensitivity, which
                                      Fleetwatch only learns); at a scrape slower than the
                                      simulator's 1-s physics, each scrape's mean shed against
                                      the uncapped draws of its instant
  oracle_cap_cost_pct                 what the planner would have lost for the same watts each
                                      scrape, handed each GPU's draw and its job's true
                                      sensitivity at that instant and replanning every scrape:
                                      the planner's optimum on the fleet's mix of jobs, a
                                      reference, not a bound (its model of the curve is concave;
                                      the simulator's dips under it near 350 W). At a scrape
                                      slower than 1 s, the scrape's mean shed against the draws
                                      of its instant, which it cannot always shed within the
                                      classes (up to 5% of the watts at 30 s)
  restore_overshoot_max_kw            the highest meter reading while the caps rose (to a
                                      step after the last went), above the highest of the
                                      minute after (a rebound; a swing peaks in both), by
                                      the readings' own time
  restore_over_site_cap               restores with a reading above detect.site_power_cap_w
  cap_not_binding_alerts              PowerCapNotBinding alerts raised (a job's load fell under
                                      its cap); not fault alerts, so not false ones
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.power.actuator import SimulatorActuator
from pipeline.power.controller import Controller, Outcome
from pipeline.power.curve import from_recording
from pipeline.power.planner import CLASS_MAX_LOSS, GpuPower, plan
from pipeline.power.request import PowerRequest, Rejected, validate
from pipeline.sources.simulate import COOLING_OVERHEAD, FleetSimulator

log = logging.getLogger("fleetwatch")

SHARE_RANGE = (0.10, 0.40)
EVENT_S = 600.0
RAMP_S = 30.0
CLASS_SLACK = 0.01  # a class's bound is kept if a GPU loses no more than this beyond it


@dataclass
class _Event:
    start_s: float
    share: float
    duration_s: float
    request: PowerRequest | None = None
    outcome: Outcome | None = None
    work_at_start: tuple[np.ndarray, np.ndarray] | None = None  # per GPU, the simulator's work done and
    work_at_end: tuple[np.ndarray, np.ndarray] | None = None    # uncapped (its truth), at start and end
    uniform_lost: float = 0.0                 # what one cap on every flexible GPU would have cost, same watts
    oracle_lost: float = 0.0                  # the least any caps could have cost, same watts (the truth known)
    true_kw: list[tuple[float, float]] = field(default_factory=list)  # (s from start, kW): the reduction
                                              # against the simulator's own uncapped power, each second
    rejected: str = ""
    over_firm: bool = False                   # it asked more than is left if the largest job ends or pauses


@dataclass
class DemandResponse:
    """The eval's events on one simulator: `tick` after each step, `score` at the end."""
    cfg: Config
    sim: FleetSimulator
    duration_s: float
    n: int
    events: list[_Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.curve = from_recording()
        self.controller = Controller(self.cfg.fleet.site, self.curve, SimulatorActuator(self.sim), self.cfg.power,
                                     self.cfg.detect.site_power_cap_w)
        rng = np.random.default_rng(self.cfg.fleet.seed + 15)
        first = self.cfg.power.baseline_s
        slot = (self.duration_s - first) / max(self.n, 1)
        for i in range(self.n):
            length = min(EVENT_S, slot / 2)  # room after each for its restore
            self.events.append(_Event(first + i * slot, float(rng.uniform(*SHARE_RANGE)), length))
        self.step_every = max(1, int(round(self.cfg.power.control_interval_s / self.cfg.fleet.sample_interval_s)))
        self.ticks = 0
        classes = self.controller.classes
        self.flex_class = np.array([classes.of(self.sim.node_names[n]) for n in self.sim.gpu_node])
        self.flexible = self.flex_class > 0

    def tick(self, gpu, facility) -> None:
        ctl, now = self.controller, self.sim.now
        ctl.observe_gpus(gpu)
        if facility is not None:
            ctl.observe_facility(facility)
        elapsed = self.ticks * self.cfg.fleet.sample_interval_s
        running = [e for e in self.events if e.work_at_start is not None and e.work_at_end is None]
        if running:
            self._truth(running, now)
        for e in self.events:
            if e.request is None and not e.rejected and elapsed >= e.start_s:
                self._ask(e, now)
            if e.outcome is not None and e.work_at_end is None and now >= e.request.end:
                e.work_at_end = self._work()
        if self.ticks % self.step_every == 0:
            ctl.step(now)
        self.ticks += 1

    def alerts(self, alerts) -> None:
        """The detectors' alerts as they change: the GPUs they name are left out of plans."""
        self.controller.observe_alerts((a.fingerprint, a.ends_at is None, a.labels) for a in alerts)

    def _truth(self, running: list[_Event], now) -> None:
        """This scrape, by the simulator's hidden truth: the watts the caps shed (each GPU's
        draw were no cap set, less what it drew), what uniform capping would have cost for
        the same watts (one cap on every flexible GPU), and what the planner would have cost
        for them within the classes, handed every GPU's draw and its job's sensitivity as
        they are this instant (its optimum on this fleet's mix: a reference, not a bound),
        both on the same work model the measured cost comes from."""
        sim, dt = self.sim, self.cfg.fleet.sample_interval_s
        free = sim.power_uncapped
        shed = sim.scrape_shed_j / dt  # the scrape's mean: every physics step since the last counts
        work_free = sim.work_rate(free)
        # Neither may cap a GPU no agent reaches (fallen off the bus, resetting): it draws and does no
        # work, and counted, its watts were free for both.
        flexible = self.flexible & ~sim.unreachable
        cap = uniform_cap(free[flexible], shed, self.curve.min_limit_w)
        held = np.where(flexible, np.minimum(free, cap), free)
        lost = float(np.sum(work_free - sim.work_rate(held))) * dt
        oracle = 0.0
        if shed > 0:
            n = len(free)
            best = plan(GpuPower(power_w=free, busy=work_free > 0, flex_class=np.where(flexible, self.flex_class, 0),
                                 min_limit_w=np.full(n, self.curve.min_limit_w),
                                 max_limit_w=np.full(n, self.cfg.fleet.power_limit_w),
                                 sensitivity=sim.group_sens[sim.gpu_job]), shed, self.curve)
            oracle = float(np.sum(work_free - sim.work_rate(np.fmin(free, best.cap_w)))) * dt
        for e in running:
            e.uniform_lost += lost
            e.oracle_lost += oracle
            if now < e.request.end:
                e.true_kw.append(((now - e.request.start).total_seconds(), (1.0 + COOLING_OVERHEAD) * shed / 1000.0))

    def _over_class(self, e: _Event) -> int:
        """The GPUs that lost more of their work over the request than their class allows (the
        classes' promise, by the truth; CLASS_SLACK beyond it)."""
        if e.work_at_start is None:
            return 0
        (done0, free0), (done1, free1) = e.work_at_start, e.work_at_end or self._work()
        done, free = done1 - done0, free1 - free0
        allowed = CLASS_MAX_LOSS[np.clip(self.flex_class, 0, len(CLASS_MAX_LOSS) - 1)]
        worked = free > 0
        lost = 1.0 - done[worked] / free[worked]
        return int(np.count_nonzero(lost > allowed[worked] + CLASS_SLACK))

    def _work(self) -> tuple[np.ndarray, np.ndarray]:
        return self.sim.work_done.copy(), self.sim.work_uncapped.copy()

    def _ask(self, e: _Event, now) -> None:
        g = self.controller.gpus
        req = PowerRequest(site=self.cfg.fleet.site, start=now, duration_s=e.duration_s,
                           reduction_kw=round(e.share * float(g.power_w.sum()) / 1000.0, 1), ramp_s=RAMP_S,
                           source="eval", id=f"eval-{len(self.controller.requests) + 1}", ts=now)
        baseline = self.controller.baseline_kw(now)
        # The scheduler's word on jobs (Slurm's squeue in a fleet): the simulator's, per node.
        sim = self.sim
        self.controller.set_jobs({name: str(int(sim.job_of_group[sim.node_group[n]]))
                                  for n, name in enumerate(sim.node_names)})
        firm = self.controller.firm()
        try:
            validate(req, now, [r for r, o in self.controller.requests if now < r.end + timedelta(minutes=5)],
                     baseline, self.controller.flexible_kw())
        except Rejected as why:
            e.rejected = str(why)
            log.warning("eval: power request refused: %s", why)
            return
        e.request, e.outcome, e.work_at_start = req, self.controller.submit(req), self._work()
        e.over_firm = firm is not None and req.reduction_kw > firm.kw

    def score(self) -> dict[str, Any]:
        done = [e for e in self.events if e.outcome is not None and e.outcome.baseline_kw is not None]
        outcomes = [e.outcome for e in done]
        reached = [o.reached_s for o in outcomes if o.reached_s is not None]
        lost = uncapped = uniform_lost = oracle_lost = 0.0
        for e in done:
            (done0, free0), (done1, free1) = e.work_at_start, e.work_at_end or self._work()
            # (totals first, then their difference: the fleet's sums as they were at each end)
            free = float(free1.sum()) - float(free0.sum())
            lost += free - (float(done1.sum()) - float(done0.sum()))
            uncapped += free
            uniform_lost += e.uniform_lost
            oracle_lost += e.oracle_lost
        true_min, credit_error = [], []
        for e in done:
            truth = _minute_means(e.true_kw, e.outcome.reached_s, self.cfg.fleet.sample_interval_s)
            measured = e.outcome.minute_means()
            if e.outcome.requested_kw and truth:
                true_min.append(min(truth) / e.outcome.requested_kw)
                credit_error += [abs(m - t) / e.outcome.requested_kw for m, t in zip(measured, truth)]
        return {
            "requests": len(self.events),
            "met": sum(o.met for o in outcomes),
            "rejected": sum(bool(e.rejected) for e in self.events),
            "over_firm": sum(e.over_firm for e in done),
            "met_over_firm": sum(e.over_firm and e.outcome.met for e in done),
            "class_bound_exceeded": sum(self._over_class(e) for e in done),
            "time_to_target_p99_s": round(float(np.percentile(reached, 99)), 1) if reached else None,
            "reduction_shortfall_max_pct": round(max((o.shortfall_max_pct() for o in outcomes), default=0.0), 2),
            "throughput_cost_pct": round(100.0 * lost / uncapped, 2) if uncapped else None,
            "uniform_cap_cost_pct": round(100.0 * uniform_lost / uncapped, 2) if uncapped else None,
            "oracle_cap_cost_pct": round(100.0 * oracle_lost / uncapped, 2) if uncapped else None,
            "reduction_true_min_pct": round(100.0 * min(true_min), 1) if true_min else None,
            "credit_error_max_pct": round(100.0 * max(credit_error), 1) if credit_error else None,
            "restore_overshoot_max_kw": round(max((o.restore_overshoot_kw or 0.0 for o in outcomes), default=0.0), 1),
            "restore_over_site_cap": sum(o.over_site_cap for o in outcomes),
        }


def uniform_cap(draw_w: np.ndarray, shed_w: float, min_w: float) -> float:
    """The one cap that sheds `shed_w` from GPUs drawing `draw_w` (W) each, no lower than `min_w`."""
    if draw_w.size == 0 or shed_w <= 0:
        return float(np.max(draw_w, initial=min_w))
    f = -np.sort(-draw_w)
    csum = np.cumsum(f)
    at = csum - np.arange(1, f.size + 1) * f      # what a cap at each draw would shed (nondecreasing)
    j = int(np.searchsorted(at, shed_w))
    cap = (csum[j - 1] - shed_w) / j if j > 0 else float(f[0])
    return max(float(cap), min_w)


def _minute_means(readings: list[tuple[float, float]], reached_s: float | None, interval_s: float) -> list[float]:
    """A hold's minute means (Outcome.minute_means' rule) of the truth's readings from the scrape
    the meter's reading at `reached_s` shows on (the meter's clock may run up to half an
    interval ahead of the truth's: 30 s late, each minute had been set against the next)."""
    if reached_s is None:
        return []
    from pipeline.power.controller import Outcome
    out = Outcome(None, achieved_kw=[(t, kw) for t, kw in readings  # type: ignore[arg-type]
                                     if t >= reached_s - interval_s / 2])
    return out.minute_means()
