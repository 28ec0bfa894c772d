"""Per-GPU power caps that shed a requested number of watts at the least lost work.

Each GPU's cost of a cap is read off the measured power -> throughput curve
(power/curve.py), shaped by its job's sensitivity s (power/learn.py: the compute-bound
share of the job's time, learned from the fleet's samples; 1 = the recorded matmul's,
where nothing is learned yet), relative to the work it does now:

  - a busy GPU drawing D W, capped to c < D, runs its compute at r = curve(c) / curve(D)
    of its rate and keeps 1 / (s / r + 1 - s) of its work (`keep`: the memory-bound rest
    of its time does not slow down); it saves D - c W. A GPU drawing less than a cap
    saves nothing from it (a watt it does not draw is not a saving), so savings count
    from the draw, never the limit;
  - an idle GPU does no work: capping it costs nothing and saves what it draws above
    the cap (about nothing), but it keeps a job that starts during the event from
    taking the watts back. Idle GPUs are capped first, to their minimum limit;
  - a GPU that draws its demand D only part of the time (its duty: a training job
    between its communication phases, when it draws far less and no cap binds) saves
    duty x (D - c) from a cap, and loses work only that share of the time: its price per
    watt is the same, what it delivers is scaled;
  - a flexibility class bounds each GPU's loss: 0 never capped, 1/2/3 at most
    10/25/50% of its work (`CLASS_MAX_LOSS`), and no cap goes below the GPU's
    minimum limit;
  - a GPU whose own limit is not the curve's (a 1,000 W B200, a 400 W A100) is read off the
    curve stretched to its limit (`GpuPower.stretch`: the same share of its limit costs the
    same share of its work), as the capacity report reads it; on the H100's watts a B200's
    top 300 W would look free.

The plan takes the cheapest watts first across the fleet. Each GPU's work as a function
of its cap is concave (the curve's upper concave hull, composed with `keep`, which is
concave and increasing), so its next watt never costs less than its previous one:
cutting every GPU's range into segments (between the hull's vertices, and every
`GRID_W` watts where the hull is the measured curve, as `keep` bends it), sorting all segments by work lost per watt and
taking them in order until the target is met is optimal (a fractional knapsack on the
segments' chords), and the last segment taken is cut where the target is met. Equal
prices go to the shallowest segments first, so GPUs alike share a cut evenly. The
target is the request plus headroom for the meter's error. `uniform_cost` is what one
cap on every GPU would cost for the same reduction, on the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.power.curve import PowerCurve

CLASS_MAX_LOSS = np.array([0.0, 0.10, 0.25, 0.50])  # by flexibility class 0..3: the most work a cap may cost
IDLE_UTIL = 0.05  # utilisation under which a GPU does no work worth counting
GRID_W = 10.0     # segment length where keep() bends the curve: the plan's chords are within ~0.1% of it


def keep(sensitivity, rate) -> np.ndarray:
    """The share of its work a job of `sensitivity` (its compute-bound share) keeps when its
    compute runs at `rate` (0..1) of its uncapped rate: 1 / (s / r + 1 - s)."""
    s = np.asarray(sensitivity, np.float64)
    r = np.clip(np.asarray(rate, np.float64), 0.0, 1.0)
    out = r / np.maximum(s + (1.0 - s) * r, 1e-12)
    return np.where(r >= 1.0, 1.0, out)


def rate_for(sensitivity, kept) -> np.ndarray:
    """The compute rate at which a job of `sensitivity` keeps `kept` of its work: keep's inverse."""
    s = np.asarray(sensitivity, np.float64)
    k = np.asarray(kept, np.float64)
    return s * k / np.maximum(1.0 - (1.0 - s) * k, 1e-12)


@dataclass(frozen=True)
class GpuPower:
    """The GPUs a plan may cap, one entry per GPU (numpy arrays of one length)."""
    power_w: np.ndarray        # what each draws now (its demand, as far as anyone knows)
    busy: np.ndarray           # bool: doing work (utilisation above IDLE_UTIL)
    flex_class: np.ndarray     # int 0..3
    min_limit_w: np.ndarray    # the lowest limit each takes (NVML constraints)
    max_limit_w: np.ndarray    # its own limit (its default, or a site's): the curve is stretched to it
    sensitivity: np.ndarray | None = None  # its job's compute-bound share, 0..1 (None: 1, the H100 curve's)
    duty: np.ndarray | None = None  # the share of the time it draws power_w, 0..1 (None: 1, all of it)

    def __len__(self) -> int:
        return len(self.power_w)

    @property
    def sens(self) -> np.ndarray:
        return np.ones(len(self)) if self.sensitivity is None else np.clip(self.sensitivity.astype(np.float64), 0.0, 1.0)

    @property
    def on(self) -> np.ndarray:
        return np.ones(len(self)) if self.duty is None else np.clip(self.duty.astype(np.float64), 0.0, 1.0)

    def stretch(self, curve: PowerCurve) -> np.ndarray:
        """Per GPU: the curve's watts per watt of its own (1 for a GPU whose own limit is the
        curve's; 0.7 for a 1,000 W GPU on the H100's 700 W curve)."""
        own = self.max_limit_w.astype(np.float64)
        return np.where(own > 0, curve.max_limit_w / np.where(own > 0, own, 1.0), 1.0)

    def work(self, cap_w, curve: PowerCurve) -> np.ndarray:
        """Each GPU's work held to `cap_w` (NaN: uncapped), in full-load GPUs' worth (the true
        curve): the cap holds it back only for its duty."""
        draw = self.power_w.astype(np.float64)
        k = self.stretch(curve)
        at = curve.at(draw * k)
        held = np.where(np.isnan(cap_w), draw, np.minimum(cap_w, draw))
        r = curve.at(held * k) / np.where(at > 0, at, 1.0)
        return np.where(self.busy, at * (1.0 - self.on * (1.0 - keep(self.sens, r))), 0.0)

    def shed(self, cap_w) -> np.ndarray:
        """Each GPU's expected saving under `cap_w` (NaN: uncapped): its duty times its draw above the cap."""
        draw = self.power_w.astype(np.float64)
        return self.on * np.maximum(draw - np.where(np.isnan(cap_w), draw, cap_w), 0.0)


@dataclass(frozen=True)
class Plan:
    cap_w: np.ndarray          # per GPU: the cap to set; NaN = leave it as it is
    saving_w: float            # the reduction the plan expects (from the draws)
    wanted_w: float            # what it was asked for, headroom included
    work_lost: float           # expected, in GPUs' worth of full-load work (the true curve)
    work_now: float            # the work the GPUs do now, same unit
    capacity_w: float          # the most any plan could shed, within every class

    @property
    def met(self) -> bool:
        return self.saving_w >= self.wanted_w - 1e-6

    @property
    def loss_pct(self) -> float:
        return 100.0 * self.work_lost / self.work_now if self.work_now > 0 else 0.0


def floors(gpus: GpuPower, curve: PowerCurve) -> np.ndarray:
    """Per GPU, the lowest cap its class allows (NaN: class 0, never capped). On the true
    curve: the class is a promise about the work actually lost."""
    max_loss = CLASS_MAX_LOSS[np.clip(gpus.flex_class.astype(np.int64), 0, len(CLASS_MAX_LOSS) - 1)]
    k = gpus.stretch(curve)
    lowest = rate_for(gpus.sens, 1.0 - max_loss) * curve.at(gpus.power_w * k)
    floor = np.where(gpus.busy, curve.power_for(lowest) / k, gpus.min_limit_w)
    floor = np.maximum(floor, gpus.min_limit_w)
    return np.where(max_loss > 0, floor, np.nan)


def capacity_w(gpus: GpuPower, curve: PowerCurve) -> float:
    """The most the GPUs can shed within every class: the site's flexible capacity."""
    return float(np.nansum(gpus.shed(floors(gpus, curve))))


def firm_capacity_w(gpus: GpuPower, curve: PowerCurve, job: np.ndarray) -> tuple[float, int, float]:
    """What the GPUs can shed within every class once the job that sheds the most of it
    has ended or paused (N-1, as a grid plans for losing its largest unit): a job's GPUs
    share their flexible load's fate. `job` numbers each GPU's job (0..k-1). Returns the
    watts left, the largest job's number (-1: none) and the watts it held."""
    by_job = np.bincount(job, weights=np.nan_to_num(gpus.shed(floors(gpus, curve))), minlength=1)
    largest = int(np.argmax(by_job))
    if by_job[largest] <= 0:
        return 0.0, -1, 0.0
    return float(by_job.sum() - by_job[largest]), largest, float(by_job[largest])


def plan(gpus: GpuPower, reduction_w: float, curve: PowerCurve, headroom_w: float = 0.0) -> Plan:
    """Caps that shed `reduction_w` + `headroom_w` at the least work lost; as much as
    the classes allow when that is less (`Plan.met` says which)."""
    wanted = max(0.0, reduction_w) + max(0.0, headroom_w)
    hull = curve.hull()
    n = len(gpus)
    floor = floors(gpus, curve)
    cappable = ~np.isnan(floor)
    draw = gpus.power_w.astype(np.float64)
    cap = np.full(n, np.nan)
    idle = cappable & ~gpus.busy
    cap[idle] = gpus.min_limit_w[idle]  # idle first: free, and no job takes the watts back
    saved_idle = gpus.shed(cap)[idle]
    need = wanted - saved_idle.sum()
    busy = np.flatnonzero(cappable & gpus.busy & (draw > floor))
    if need > 0 and busy.size:
        # Each busy GPU's breakpoints from its draw down to its floor: the hull's vertices and
        # the grid strictly between, as an (n, k) array padded with the floor (zero-width segments).
        # The grid only where the hull is the curve itself: across a chord over a measured point
        # under the hull (350 W) a cap inside would cost the curve's dip, not the chord's; there
        # the cut stays whole, vertex to vertex (GPUs alike at both ends, one cut between).
        grid = np.arange(GRID_W, curve.max_limit_w, GRID_W)
        grid = grid[np.abs(curve.at(grid) - hull.at(grid)) < 1e-9]
        k = gpus.stretch(curve)[busy][:, None]
        inner = np.union1d(hull.power_w[1:], grid)[None, :] / k  # in each GPU's own watts
        lo, hi = floor[busy], draw[busy]
        points = np.where((inner > lo[:, None]) & (inner < hi[:, None]), inner, lo[:, None])
        points = np.concatenate([hi[:, None], -np.sort(-points, axis=1), lo[:, None]], axis=1)
        on = gpus.on[busy][:, None]
        watts = on * (points[:, :-1] - points[:, 1:])          # what each segment saves (its duty of the time)
        top = hull.at(hi[:, None] * k)                         # the work now, on the hull
        worth = top * keep(gpus.sens[busy][:, None], hull.at(points * k) / top)  # concave in the cap, per GPU
        work = on * (worth[:, :-1] - worth[:, 1:])             # what each segment costs
        price = np.where(watts > 0, np.round(work / np.where(watts > 0, watts, 1.0), 12), np.inf)
        step = np.broadcast_to(np.arange(watts.shape[1]), watts.shape)
        order = np.lexsort((step.ravel(), price.ravel()))     # cheapest first; the shallowest of equals
        flat_w = watts.ravel()[order]
        taken = np.cumsum(flat_w)
        last = int(np.searchsorted(taken, need))              # the segment where the target is met
        take = np.zeros(flat_w.size)
        take[:last] = flat_w[:last]
        if last < flat_w.size:
            take[last] = need - (taken[last - 1] if last else 0.0)
        shed = np.zeros(watts.size)
        shed[order] = take
        shed = shed.reshape(watts.shape).sum(axis=1)
        chosen = shed > 1e-9
        cap[busy[chosen]] = draw[busy][chosen] - shed[chosen] / np.maximum(on[chosen, 0], 1e-9)
    saving = float(np.sum(gpus.shed(cap)))
    work_now = float(gpus.work(np.full(n, np.nan), curve).sum())
    kept = float(gpus.work(cap, curve).sum())
    return Plan(cap, saving, wanted, work_now - kept, work_now, capacity_w(gpus, curve))


def uniform_cost(gpus: GpuPower, reduction_w: float, curve: PowerCurve) -> tuple[float, float]:
    """One cap on every GPU, the highest that sheds `reduction_w`: (that cap, the work it
    costs, in the unit of Plan.work_lost). The cap is at its floor (the minimum limit)
    when even that does not shed enough. GPUs of other limits get the same share of
    theirs (the cap is in the curve's watts)."""
    k = gpus.stretch(curve)
    draw = gpus.power_w.astype(np.float64) * k
    lo, hi = float(np.max(gpus.min_limit_w * k)), float(np.max(draw)) if draw.size else 0.0

    def shed(c: float) -> float:
        return float(gpus.shed(np.full(len(gpus), c) / k).sum())
    if draw.size == 0 or shed(lo) <= reduction_w:
        c = lo
    else:
        for _ in range(60):  # bisection: shed() falls as the cap rises
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if shed(mid) >= reduction_w else (lo, mid)
        c = lo
    lost = gpus.work(np.full(len(gpus), np.nan), curve) - gpus.work(np.full(len(gpus), c) / k, curve)
    return c, float(lost.sum())
