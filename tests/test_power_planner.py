"""The power planner (issue 15, item 2): per-GPU caps from the recorded H100's curve that
shed the target at the least work, within every flexibility class and limit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.power.curve import from_recording
from pipeline.power.planner import CLASS_MAX_LOSS, GpuPower, capacity_w, firm_capacity_w, plan, uniform_cost
from tests.conftest import REPO

CURVE = from_recording()


def test_the_curve_is_the_recorded_h100s():
    # The recording's steady states (its README): 500 W keeps 84% of the work for 71% of the power.
    assert CURVE.min_limit_w == 200 and CURVE.max_limit_w == 700
    assert CURVE.at(700) == pytest.approx(1.0) and CURVE.at(500) == pytest.approx(0.84, abs=0.01)
    assert CURVE.at(350) == pytest.approx(0.50, abs=0.02) and CURVE.at(200) == pytest.approx(0.26, abs=0.01)
    assert CURVE.clock_at(500) == pytest.approx(1153, abs=20)
    # On the hull, a watt never costs less than the watt above it; 350 W lies under it.
    hull = CURVE.hull()
    slopes = np.diff(hull.throughput[1:]) / np.diff(hull.power_w[1:])  # (from the minimum limit up)
    assert np.all(np.diff(slopes) <= 1e-12) and 350 > hull.power_w[1] and not np.any(np.abs(hull.power_w - 349.4) < 1)


def test_a_real_h200_recorded_by_gpu_check_is_a_curve_and_the_h100_prior_is_close_to_it():
    """scripts/gpu-check's recording of a real H200 (tests/data/h200, its README) reads as a
    curve; the planner's prior for every GPU, the H100's hull, is within 0.03 of it."""
    h200 = from_recording(REPO / "tests" / "data" / "h200")
    assert (h200.min_limit_w, h200.max_limit_w) == (200, 700)
    assert h200.at(h200.power_w[1:]).tolist() == pytest.approx([0.26, 0.57, 0.84, 1.0], abs=0.01)
    # held to its 200 W minimum, the H200 drew more: its clock was at its 345 MHz floor
    assert h200.power_w[1] > 204 and h200.sm_clock_mhz[1] == 345
    prior = CURVE.hull()
    assert np.abs(prior.at(h200.power_w[1:]) - h200.throughput[1:]).max() < 0.03


fleets = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.floats(60, 700), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.lists(st.integers(0, 3), min_size=n, max_size=n)))


def gpus_of(power, busy, classes) -> GpuPower:
    n = len(power)
    busy = np.array(busy) & (np.array(power) > 100)  # a busy GPU draws more than an idle one
    return GpuPower(np.array(power, float), busy, np.array(classes), np.full(n, 200.0), np.full(n, 700.0))


@settings(max_examples=300, deadline=None)
@given(fleets, st.floats(0, 1.2))
def test_a_plan_keeps_every_promise(fleet, share):
    gpus = gpus_of(*fleet)
    cap = capacity_w(gpus, CURVE)
    p = plan(gpus, share * cap, CURVE)
    capped = ~np.isnan(p.cap_w)
    assert not np.any(capped & (gpus.flex_class == 0))                     # class 0: never capped
    assert np.all(p.cap_w[capped] >= gpus.min_limit_w[capped] - 1e-6)      # never below the minimum limit
    assert np.all(p.cap_w[capped] <= gpus.max_limit_w[capped] + 1e-6)
    busy = gpus.busy
    kept = CURVE.at(np.minimum(np.where(capped, p.cap_w, gpus.power_w), gpus.power_w))
    loss = np.where(busy, 1 - kept / CURVE.at(gpus.power_w), 0.0)
    assert np.all(loss <= CLASS_MAX_LOSS[gpus.flex_class] + 1e-6)          # each class's bound on lost work
    assert np.all(~capped[~busy & (gpus.flex_class > 0)] == False)  # noqa: E712  (idle ones capped first)
    assert p.saving_w <= cap + 1e-6
    assert p.met == (share * cap <= cap + 1e-6)
    idle = np.maximum(gpus.power_w - p.cap_w, 0)[capped & ~busy].sum()
    if p.met:  # no more than asked, beyond what the idle GPUs shed for free
        assert share * cap - 1e-3 <= p.saving_w <= max(share * cap, idle) + 1e-3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(250, 700), min_size=2, max_size=3), st.floats(0.1, 0.9))
def test_no_other_caps_shed_as_much_for_less_work(power, share):
    """Against every combination of caps on a 5 W grid (on the hull the planner optimises on)."""
    n = len(power)
    gpus = GpuPower(np.array(power), np.ones(n, bool), np.full(n, 3), np.full(n, 200.0), np.full(n, 700.0))
    need = share * capacity_w(gpus, CURVE)
    p = plan(gpus, need, CURVE)
    hull = CURVE.hull()
    chosen = np.where(np.isnan(p.cap_w), gpus.power_w, p.cap_w)
    cost = float(np.sum(hull.at(gpus.power_w) - hull.at(chosen)))
    from pipeline.power.planner import floors
    lows = floors(gpus, CURVE)
    grids = [np.append(np.arange(np.ceil(lo / 5) * 5, d, 5.0), d) for lo, d in zip(lows, gpus.power_w)]
    for caps in itertools.product(*grids):
        caps = np.array(caps)
        if np.sum(gpus.power_w - caps) >= need:
            assert cost <= np.sum(hull.at(gpus.power_w) - hull.at(caps)) + 1e-9


def test_watts_a_gpu_does_not_draw_are_not_savings():
    # A GPU at 300 W under a 700 W limit: a 500 W cap saves nothing; idle GPUs are capped
    # first (free) but count only what they draw above their cap.
    gpus = GpuPower(np.array([300.0, 650.0, 80.0]), np.array([True, True, False]), np.array([3, 3, 3]),
                    np.full(3, 200.0), np.full(3, 700.0))
    p = plan(gpus, 100.0, CURVE)
    assert p.met and p.saving_w == pytest.approx(100.0)
    assert p.cap_w[2] == 200.0                        # idle: to its minimum, for nothing
    assert p.cap_w[1] == pytest.approx(550.0)         # the cheap watts: the top of the busy GPU at 650 W
    assert np.isnan(p.cap_w[0])                       # 300 W: its watts cost more


def test_more_than_the_classes_allow_is_not_met_and_says_how_much_is_possible():
    gpus = GpuPower(np.array([700.0, 700.0]), np.array([True, True]), np.array([0, 1]),
                    np.full(2, 200.0), np.full(2, 700.0))
    p = plan(gpus, 500.0, CURVE)
    assert not p.met and p.saving_w == pytest.approx(p.capacity_w)
    assert 0 < p.capacity_w < 150  # class 1 loses at most 10% of its work: ~110 W of one GPU


@settings(max_examples=200, deadline=None)
@given(fleets, st.lists(st.integers(0, 3), min_size=12, max_size=12))
def test_the_firm_capacity_is_what_is_left_without_the_job_that_holds_the_most(fleet, jobs):
    """N-1: whichever single job ends or pauses, at least the firm capacity is left."""
    gpus = gpus_of(*fleet)
    job = np.array(jobs[:len(gpus)])
    left, largest, held = firm_capacity_w(gpus, CURVE, job)
    total = capacity_w(gpus, CURVE)
    assert left + held == pytest.approx(total, abs=1e-6)
    for j in np.unique(job):
        rest = GpuPower(*(a[job != j] for a in (gpus.power_w, gpus.busy, gpus.flex_class, gpus.min_limit_w,
                                                gpus.max_limit_w)))
        assert capacity_w(rest, CURVE) >= left - 1e-6
    assert (largest == -1) == (total == 0)


def test_the_firm_capacity_of_two_jobs_is_the_smaller_ones():
    # Job 0: three GPUs at 700 W; job 1: one. Class 3: each may lose half its work.
    gpus = GpuPower(np.full(4, 700.0), np.full(4, True), np.full(4, 3), np.full(4, 200.0), np.full(4, 700.0))
    left, largest, held = firm_capacity_w(gpus, CURVE, np.array([0, 0, 0, 1]))
    assert largest == 0 and held == pytest.approx(3 * left)
    assert firm_capacity_w(gpus, CURVE, np.zeros(4, np.int64))[0] == 0.0  # one job holds it all: nothing is firm


def test_uniform_capping_sheds_the_same_watts_and_the_plan_costs_no_more():
    rng = np.random.default_rng(1)
    n = 512
    busy = rng.random(n) < 0.8
    gpus = GpuPower(np.where(busy, rng.uniform(300, 700, n), 75.0), busy, np.full(n, 3), np.full(n, 200.0),
                    np.full(n, 700.0))
    for share in (0.1, 0.2, 0.3, 0.4):
        need = share * gpus.power_w.sum()
        cap, uniform = uniform_cost(gpus, need, CURVE)
        assert np.maximum(gpus.power_w - cap, 0).sum() == pytest.approx(need, rel=1e-6)
        p = plan(gpus, need, CURVE)
        assert p.met and p.work_lost <= uniform * 1.001


# ---- per-GPU curves: a job's sensitivity (power/learn.py) ----------------------------------------

from pipeline.power.planner import GRID_W, floors, keep, rate_for  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(0.01, 1))
def test_keep_and_rate_for_are_inverses_and_a_memory_bound_job_keeps_more(s, r):
    k = keep(s, r)
    assert r - 1e-12 <= k <= 1.0 + 1e-12                     # never less than a compute-bound job keeps
    if s >= 0.05:  # (a job all memory-bound keeps everything at any rate: no inverse)
        assert rate_for(s, k) == pytest.approx(r, rel=1e-6, abs=1e-9)
    assert keep(1.0, r) == pytest.approx(r) and keep(0.0, r) == 1.0 and keep(s, 1.0) == 1.0


sensitive_fleets = st.integers(1, 10).flatmap(lambda n: st.tuples(
    st.lists(st.floats(60, 700), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.lists(st.floats(0, 1), min_size=n, max_size=n)))


@settings(max_examples=300, deadline=None)
@given(sensitive_fleets, st.floats(0, 1.2))
def test_with_learned_curves_a_plan_keeps_every_promise(fleet, share):
    power, busy, classes, sens = fleet
    base = gpus_of(power, busy, classes)
    gpus = GpuPower(base.power_w, base.busy, base.flex_class, base.min_limit_w, base.max_limit_w, np.array(sens))
    cap = capacity_w(gpus, CURVE)
    assert cap >= capacity_w(base, CURVE) - 1e-6             # a job that loses less may give more
    p = plan(gpus, share * cap, CURVE)
    capped = ~np.isnan(p.cap_w)
    assert not np.any(capped & (gpus.flex_class == 0))
    assert np.all(p.cap_w[capped] >= gpus.min_limit_w[capped] - 1e-6)
    loss = np.where(gpus.busy, 1 - gpus.work(p.cap_w, CURVE) / np.maximum(gpus.work(np.full(len(gpus), np.nan), CURVE),
                                                                          1e-12), 0.0)
    assert np.all(loss <= CLASS_MAX_LOSS[gpus.flex_class] + 1e-6)  # the class's bound, on the job's own curve
    assert p.saving_w <= cap + 1e-6 and p.met == (share * cap <= cap + 1e-6)
    assert p.work_lost == pytest.approx(float(np.sum(gpus.work(np.full(len(gpus), np.nan), CURVE)
                                                     - gpus.work(p.cap_w, CURVE))), abs=1e-9)


def _model_costs(gpus: GpuPower, grids: list[np.ndarray]) -> list[np.ndarray]:
    """Per GPU, what each cap of its grid costs on the planner's model: its work on the hull,
    shaped by its sensitivity, interpolated between the planner's breakpoints (hull vertices;
    the grid where the hull is the curve)."""
    hull = CURVE.hull()
    grid = np.arange(GRID_W, CURVE.max_limit_w, GRID_W)
    grid = grid[np.abs(CURVE.at(grid) - hull.at(grid)) < 1e-9]
    out = []
    for d, s, lo, caps in zip(gpus.power_w, gpus.sens, floors(gpus, CURVE), grids):
        pts = np.union1d(np.union1d(hull.power_w[1:], grid), [lo, d])
        pts = pts[(pts >= lo) & (pts <= d)]
        work = hull.at(d) * keep(s, hull.at(pts) / hull.at(d))
        out.append(hull.at(d) - np.interp(caps, pts, work))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(250, 698), st.floats(0, 1)), min_size=2, max_size=3), st.floats(0.1, 0.9))
def test_with_learned_curves_no_other_caps_shed_as_much_for_less_work(gpus_sens, share):
    """Against every combination of caps on a 5 W grid, on the planner's model of each GPU's work."""
    power, sens = (np.array(x) for x in zip(*gpus_sens))
    n = len(power)
    gpus = GpuPower(power, np.ones(n, bool), np.full(n, 3), np.full(n, 200.0), np.full(n, 700.0), sens)
    need = share * capacity_w(gpus, CURVE)
    p = plan(gpus, need, CURVE)
    chosen = np.where(np.isnan(p.cap_w), power, p.cap_w)
    cost = sum(float(c[0]) for c in _model_costs(gpus, [np.array([c]) for c in chosen]))
    grids = [np.append(np.arange(np.ceil(lo / 5) * 5, d, 5.0), d) for lo, d in zip(floors(gpus, CURVE), power)]
    costs = _model_costs(gpus, grids)
    shed = sum(np.meshgrid(*[d - g for d, g in zip(power, grids)], indexing="ij"))
    total = sum(np.meshgrid(*costs, indexing="ij"))
    assert cost <= total[shed >= need].min() + 1e-9


def test_the_cheap_watts_are_a_memory_bound_jobs():
    # Two GPUs at 698 W: the compute-bound one loses the curve's share, the memory-bound one
    # (a fifth of its time on compute) a fifth of that at the top: the plan takes its watts.
    gpus = GpuPower(np.array([698.0, 698.0]), np.ones(2, bool), np.full(2, 3), np.full(2, 200.0),
                    np.full(2, 700.0), np.array([1.0, 0.2]))
    p = plan(gpus, 150.0, CURVE)
    assert np.isnan(p.cap_w[0]) and p.cap_w[1] == pytest.approx(548.0)
    _, uniform = uniform_cost(gpus, 150.0, CURVE)
    assert p.work_lost < 0.4 * uniform


def test_gpus_alike_share_a_cut_evenly():
    # The same curve and draw everywhere: the plan is uniform capping (the first event of a
    # fleet whose curves are not learned yet caps every job a little, and learns them all).
    n = 16
    gpus = GpuPower(np.full(n, 698.0), np.ones(n, bool), np.full(n, 3), np.full(n, 200.0), np.full(n, 700.0))
    p = plan(gpus, 0.1 * 698.0 * n, CURVE)
    assert np.ptp(p.cap_w) <= GRID_W + 1e-6 and not np.isnan(p.cap_w).any()


@settings(max_examples=200, deadline=None)
@given(sensitive_fleets, st.floats(0.05, 1.2), st.data())
def test_a_gpu_that_draws_its_demand_part_of_the_time_delivers_and_costs_its_share(fleet, share, data):
    """A training job draws its demand only between its communication phases (its duty): a cap
    sheds duty x (demand - cap) and costs work that share of the time, so the price of its
    watts, and the order the plan takes them in, are the same; what the plan counts is scaled."""
    power, busy, classes, sens = fleet
    base = gpus_of(power, busy, classes)
    duty = np.array(data.draw(st.lists(st.floats(0.2, 1.0), min_size=len(power), max_size=len(power))))
    gpus = GpuPower(base.power_w, base.busy, base.flex_class, base.min_limit_w, base.max_limit_w, np.array(sens), duty)
    cap = capacity_w(gpus, CURVE)
    p = plan(gpus, share * cap, CURVE)
    expected = duty * np.maximum(gpus.power_w - np.where(np.isnan(p.cap_w), gpus.power_w, p.cap_w), 0.0)
    assert p.saving_w == pytest.approx(float(expected.sum()), abs=1e-6)
    assert p.met == (share * cap <= cap + 1e-6) and p.saving_w <= cap + 1e-6
    capped = ~np.isnan(p.cap_w)
    assert np.all(p.cap_w[capped] >= floors(gpus, CURVE)[capped] - 1e-6)  # every class's bound still holds
    # One duty for every GPU: the same caps as the plan for the watts it stands for at full duty.
    same = GpuPower(*(getattr(gpus, f) for f in ("power_w", "busy", "flex_class", "min_limit_w", "max_limit_w",
                                               "sensitivity")), np.full(len(power), 0.5))
    full = GpuPower(*(getattr(gpus, f) for f in ("power_w", "busy", "flex_class", "min_limit_w", "max_limit_w",
                                               "sensitivity")))
    want = share * capacity_w(same, CURVE)
    np.testing.assert_allclose(plan(same, want, CURVE).cap_w, plan(full, 2 * want, CURVE).cap_w, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(fleets, st.floats(0.05, 1.0), st.sampled_from([400.0, 1000.0, 1200.0]))
def test_a_gpu_of_another_limit_is_planned_on_the_curve_stretched_to_it(fleet, share, own_w):
    """A fleet of 1,000 W GPUs (B200) drawing 1000/700 of what an H100 fleet draws: the same plan,
    every cap and saving stretched by 1000/700, the same work lost; the same for uniform capping.
    On the H100's watts a B200's top 300 W would cost nothing (the curve ends at 700 W)."""
    h100 = gpus_of(*fleet)
    f = own_w / 700.0
    other = GpuPower(h100.power_w * f, h100.busy, h100.flex_class, h100.min_limit_w * f, np.full(len(h100), own_w))
    want = share * capacity_w(h100, CURVE)
    a, b = plan(h100, want, CURVE), plan(other, want * f, CURVE)
    assert capacity_w(other, CURVE) == pytest.approx(capacity_w(h100, CURVE) * f, rel=1e-9, abs=1e-6)
    assert np.allclose(b.cap_w, a.cap_w * f, equal_nan=True, atol=1e-6)
    assert b.work_lost == pytest.approx(a.work_lost, rel=1e-6, abs=1e-9) and b.saving_w == pytest.approx(a.saving_w * f)
    assert uniform_cost(other, want * f, CURVE)[1] == pytest.approx(uniform_cost(h100, want, CURVE)[1], rel=1e-6,
                                                                      abs=1e-9)


def test_the_top_watts_of_a_1000_w_gpu_are_not_free():
    b200 = GpuPower(np.array([1000.0]), np.array([True]), np.array([3]), np.array([286.0]), np.array([1000.0]))
    p = plan(b200, 300.0, CURVE)
    assert p.cap_w[0] == pytest.approx(700.0) and p.loss_pct == pytest.approx(100 * (1 - CURVE.at(490.0)), rel=1e-3)
