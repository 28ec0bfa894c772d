"""The demand-response loop against the simulated fleet (issue 15): caps planned, applied,
verified by the site meter, and restored in steps; a cap never outlives its request."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.analytics.evaluate import EVAL_EPOCH
from pipeline.config import FleetConfig, FlexRule, PowerConfig
from pipeline.power.actuator import SimulatorActuator
from pipeline.power.classes import FlexClasses
from pipeline.power.controller import STUCK_READINGS, Controller, GpuTable, Outcome
from pipeline.power.curve import from_recording
from pipeline.power.request import PowerRequest
from pipeline.sources.simulate import FleetSimulator
from tests.feeds import a_and_b_feeds, marked_bad

CURVE = from_recording()
INTERVAL = 5


def fleet(power_limit_w: float = 700.0, **settings) -> tuple[FleetSimulator, Controller]:
    """The simple normal's 2-rack fleet, steady and fault-free, and its controller (class 3 unless told)."""
    sim = FleetSimulator(FleetConfig(racks=2, seed=4, fault_interval_s=0, gpu_reset_interval_s=0, normal="simple",
                                     power_limit_w=power_limit_w), start=EVAL_EPOCH)
    return sim, Controller(sim.cfg.site, CURVE, SimulatorActuator(sim), PowerConfig(**{"default_class": 3, **settings}))


def advance(sim: FleetSimulator, ctl: Controller, i: int, jobs: dict[str, str] | None = None) -> None:
    """Second `i`: the fleet's readings into the controller (naming `jobs`, by UUID: `named`),
    and its step every INTERVAL."""
    tick = sim.step()
    ctl.observe_gpus(tick.gpu if jobs is None else named(tick.gpu, jobs))
    ctl.observe_facility(tick.facility)
    if i % INTERVAL == 0:
        ctl.step(sim.now)


def run(seconds: int, requests: list[PowerRequest], power_limit_w: float = 700.0, **settings):
    sim, ctl = fleet(power_limit_w, **settings)
    actuator = ctl.actuator
    outcomes = [ctl.submit(r) for r in requests]
    meter, caps = [], []
    for i in range(seconds):
        advance(sim, ctl, i)
        meter.append(ctl.meter[-1][1])
        caps.append(sim.caps)
    return sim, ctl, outcomes, np.array(meter), np.array(caps), actuator


def request(start_s: float, pct: float, duration_s: float = 300, **kw) -> PowerRequest:
    return PowerRequest(site="site-a", start=EVAL_EPOCH + timedelta(seconds=start_s), duration_s=duration_s,
                        reduction_pct=pct, **kw)


def test_a_request_is_reached_within_its_ramp_held_by_the_meter_and_then_restored():
    sim, ctl, (out,), meter, caps, _ = run(1000, [request(400, 10)])
    assert out.met and out.reached_s <= 30, (out.reached_s, out.shortfall_max_pct())
    start, end = 400, 700
    hold = meter[start + 30:end]
    assert np.all(out.baseline_kw - hold >= 0.98 * out.requested_kw)       # what the meter saw, every second
    assert np.any(caps[start + 10] < 700) and np.all(caps[-1] == 700)      # capped, then every cap restored
    assert out.planned_loss_pct < 100 and out.uniform_loss_pct > 0
    lost = 1 - sim.work_done.sum() / sim.work_uncapped.sum()
    assert 0 < lost < out.planned_loss_pct / 100  # lost during the event only (a third of the run)


@pytest.mark.parametrize("own_w", [600, 400])
def test_gpus_under_their_own_limit_are_capped_under_it_and_restored_to_it(own_w):
    """A site's `nvidia-smi -pl 600` (or a 400 W part): the GPUs' own limit is not the recorded
    H100's 700 W. They are learned, capped under their own limit and restored to it, never
    stepped above it (the agent would refuse it as out of range)."""
    sim, ctl, (out,), meter, caps, actuator = run(1000, [request(400, 10)], power_limit_w=own_w)
    assert out.met and out.gpus_capped > 0, (out.minute_means(), out.requested_kw)
    assert np.any(caps[420] < own_w) and np.all(caps[-1] == own_w)
    sent = [w for c in actuator.calls for w in c.values() if w is not None]
    assert sent and max(sent) < own_w


def test_a_meter_reading_of_nan_is_no_reading():
    """A site meter that sends NaN (a BMS's "no value") once before the request and once in
    its hold: the baseline, the measure and the meter's slope on the PDUs stay numbers."""
    sim, ctl = fleet()
    out = ctl.submit(request(300, 10))
    for i in range(700):
        tick = sim.step()
        facility = tick.facility
        if i in (250, 340):
            meter = pc.equal(facility.column("device_class"), "meter")
            value = pc.if_else(meter, pa.scalar(float("nan"), facility.schema.field("value").type),
                               facility.column("value"))
            facility = facility.set_column(facility.schema.get_field_index("value"), "value", value)
        ctl.observe_gpus(tick.gpu)
        ctl.observe_facility(facility)
        if i % INTERVAL == 0:
            ctl.step(sim.now)
    assert np.isfinite(out.baseline_kw) and all(np.isfinite(out.minute_means()))
    assert out.met and np.all(np.isfinite(ctl.meter_per_it()))


def test_a_meter_reading_its_bms_marks_bad_is_no_reading():
    """A meter whose link to the BMS is lost: the gateway repeats its last value, marked bad (quality 0), for
    90 s of a hold. As no reading, those 90 s are no reduction measured (they had been taken at face value)."""
    sim, ctl = fleet()
    out = ctl.submit(request(300, 10))
    for i in range(700):
        tick = sim.step()
        facility = tick.facility
        if 450 <= i < 540:
            facility = marked_bad(facility, pc.equal(facility.column("device_class"), "meter"))
        ctl.observe_gpus(tick.gpu)
        ctl.observe_facility(facility)
        if i % INTERVAL == 0:
            ctl.step(sim.now)
    assert not [s for s, _ in out.achieved_kw if 151 <= s < 240] and out.achieved_kw[-1][0] > 240


def half_feeds_from(at: int, change):
    """`drive`'s feeds: each rack's PDU as an A and a B feed carrying half each, `change` made to them from
    tick `at` on."""
    def feeds(i, tick):
        f = a_and_b_feeds(tick.facility, 0.5)
        return tick.gpu, f if i < at else change(f)
    return feeds


def test_a_pdu_feed_its_bms_marks_bad_is_heard_not_failed_over():
    """Rack r01's A-feed PDU still reads its half, marked bad (its BMS link lost); B reads its half. Left out
    as silent, A had read as a failed-over feed: the rack's sum halved, which the loop took for load the caps
    shed, capping twice as deep as asked (23.3 kW shed for 11.0) and reporting the request not met."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10))

    feeds = half_feeds_from(520, lambda f: marked_bad(f, pc.equal(f.column("device"), "pdu-r01-a")))
    truth = drive(sim, ctl, 760, feeds, truth_in=range(550, 700))
    assert out.met and np.mean(truth) == pytest.approx(out.requested_kw, rel=0.15)


def test_a_meter_gone_silent_is_no_hold_seen():
    """The site meter sends nothing for 90 s of a hold (the PDUs and the GPUs go on): no
    reading of those 90 s is the reduction's, and the caps stay as they were (nothing
    measured, nothing corrected), where its last reading had counted again at every step."""
    sim, ctl = fleet()
    out = ctl.submit(request(300, 10))
    caps_at = {}
    for i in range(700):
        tick = sim.step()
        facility = tick.facility
        if 450 <= i < 540:
            facility = facility.filter(pc.not_equal(facility.column("device_class"), "meter"))
        ctl.observe_gpus(tick.gpu)
        ctl.observe_facility(facility)
        if i % INTERVAL == 0:
            ctl.step(sim.now)
        if i in (460, 535):
            caps_at[i] = sim.caps.copy()
    silent = [s for s, _ in out.achieved_kw if 151 <= s < 240]  # (s from the start: 451-539)
    assert not silent and out.achieved_kw[-1][0] > 240
    assert np.array_equal(caps_at[460], caps_at[535])


def test_the_restore_is_staged_at_the_rate_and_under_the_site_cap():
    rate = 0.5  # kW/s
    _, _, (out,), meter, caps, actuator = run(1100, [request(400, 15)], restore_rate_kw_s=rate)
    after = meter[700:]
    # Each step adds at most rate x interval of GPU draw (the meter: plus its cooling overhead and noise).
    rises = np.diff(after[::INTERVAL])
    assert rises.max() <= rate * INTERVAL * 1.12 + 1.5, rises.max()
    assert sum(1 for c in actuator.calls if any(w is not None for w in c.values())) > 3  # in several steps
    assert np.all(caps[-1] == 700) and out.restore_overshoot_kw < 0.05 * out.baseline_kw


def test_a_request_that_starts_as_the_last_ends_takes_its_caps_over_and_is_baselined_on_the_load_uncapped():
    """Back to back (a grid event extended by a second one): B had waited for A's staged restore (at a
    large site's rate, 76 s: its first minute at 0.6 kW of 8.8) and taken its baseline from the meter A's
    caps held down (88 kW for 110: asked too little). B now starts from A's caps at its start, on the
    load before A. One a minute after A's restore is baselined on the 300 s before it that no cap held."""
    _, _, (a, b), meter, _, _ = run(1000, [request(400, 15), request(700, 10)], restore_rate_kw_s=0.2)
    assert a.met and b.met and b.reached_s <= 30, (b.minute_means(), b.requested_kw)
    assert a.restore_done <= b.request.start + timedelta(seconds=INTERVAL)  # (handed over, not restored)
    assert abs(b.baseline_kw - a.baseline_kw) < 0.02 * a.baseline_kw, (a.baseline_kw, b.baseline_kw)
    _, _, (a, c), meter, caps, _ = run(1200, [request(400, 15), request(760, 10)])
    capped_s = (a.restore_done - a.request.start).total_seconds()
    assert a.restore_done < c.request.start and capped_s < 320
    uncapped = [meter[i] for i in range(760) if not 400 <= i <= 400 + capped_s][-300:]  # (the last 300 s of them)
    assert abs(c.baseline_kw - np.mean(uncapped)) < 0.01 * c.baseline_kw, (c.baseline_kw, np.mean(uncapped))
    assert np.mean(meter[460:760]) < c.baseline_kw - 0.5 * c.requested_kw  # (what it had been baselined on)
    assert c.met and np.all(caps[-1] == 700)
    # On a rack: it waits for the restore (its baseline is its PDUs when it starts, which the caps held down)
    _, _, (a, d), _, _, _ = run(1000, [request(400, 15, racks=("r01",)), request(700, 10, racks=("r01",))],
                                restore_rate_kw_s=0.2)
    assert a.restore_done < d.request.start + timedelta(seconds=90) and d.baseline_kw > 0.97 * a.baseline_kw


@pytest.mark.parametrize("span,expected", [((600, 800), [*range(500, 600), *range(801, 1001)]),
                                           ((100, 800), [*range(0, 100), *range(801, 1001)]),
                                           ((950, None), [*range(650, 950)]),
                                           ((0, None), [*range(700, 1001)])])
def test_a_baseline_is_the_last_300_s_no_earlier_request_capped(span, expected):
    """An earlier request's caps (from its first plan to its last cap gone; None: still capped) leave the
    window, which reaches back past them: a span that began before the window had left it 199 s long. Where none
    is kept (caps held longer than the readings go back), the last 300 s as read: a later request's size
    judged meanwhile had waited for the holding one's end."""
    from collections import deque
    _, ctl = fleet()
    at = lambda s: EVAL_EPOCH + timedelta(seconds=s)  # noqa: E731
    ctl.meter = deque((at(s), float(s), float(s)) for s in range(1001))
    ctl.capped_spans = deque([(at(span[0]), None if span[1] is None else at(span[1]))])
    assert ctl.baseline_kw(at(1000)) == pytest.approx(np.mean(expected))


def test_never_capped_class_0_and_a_stopped_controller_leaves_no_cap():
    sim, ctl, (out,), _, caps, _ = run(500, [request(400, 8, duration_s=600)], classes=[FlexRule("r01-*", 0)])
    r01 = np.array([n.startswith("r01-") for n in (sim.node_names[i] for i in sim.gpu_node)])
    assert np.all(caps[:, r01] == 700) and np.any(caps[-1][~r01] < 700)
    ctl.stop()
    assert np.all(sim.caps == 700)


@pytest.mark.parametrize("pct", [10, 20])
def test_the_plan_costs_no_more_work_than_uniform_capping(pct):
    _, _, (out,), _, _, _ = run(800, [request(400, pct)])
    assert out.met and out.planned_loss_pct <= out.uniform_loss_pct * 1.05


def test_a_hold_is_judged_on_each_minute_s_mean_of_the_meter_s_readings():
    from pipeline.power.controller import Outcome
    out = Outcome(request(0, 10), baseline_kw=100.0, requested_kw=10.0, reached_s=5.0)
    # 1 s readings for 149 s: at the target, but 8 kW through most of the second minute.
    out.achieved_kw = [(5.0 + t, 8.0 if 70 <= t < 110 else 10.5) for t in range(149)]
    assert out.minute_means() == pytest.approx([10.5, 8.0 * 40 / 60 + 10.5 * 20 / 60])  # the last 29 s: no minute
    assert not out.met and out.shortfall_max_pct() == pytest.approx(100 * (10 - 8.8333333) / 10)
    out.achieved_kw = [(5.0 + t, 10.5) for t in range(149)]
    assert out.met and out.shortfall_max_pct() == 0.0


def _true_reduction_kw(sim) -> float:
    """What the caps shed this second by the simulator's hidden truth, at the meter."""
    from pipeline.sources.simulate import COOLING_OVERHEAD
    return (1.0 + COOLING_OVERHEAD) * float(np.sum(sim.power_uncapped - sim.last_power)) / 1000.0


def drive(sim, ctl, seconds: int, transform=None, truth_in: range = range(0)) -> list[float]:
    """Second by second: the fleet's readings into the controller (`transform(i, tick)` -> the GPU
    and facility batches it sees), its step every INTERVAL; the simulator's true reduction at
    each second of `truth_in`."""
    truth = []
    for i in range(seconds):
        tick = sim.step()
        gpu, facility = transform(i, tick) if transform else (tick.gpu, tick.facility)
        ctl.observe_gpus(gpu)
        ctl.observe_facility(facility)
        if i % INTERVAL == 0:
            ctl.step(sim.now)
        if i in truth_in:
            truth.append(_true_reduction_kw(sim))
    return truth


@pytest.mark.parametrize("change", ["start", "end"])
def test_a_job_that_starts_or_ends_during_a_request_moves_the_baseline_not_the_reduction(change):
    """The load Fleetwatch does not control moves under a request: a job group starts (or
    ends) half-way. The baseline follows it (its GPUs and CPUs, through the PDUs), so the
    request is still met, and what it claims is what the caps really shed."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10))
    group = int(np.flatnonzero(~sim.group_busy if change == "start" else sim.group_busy)[0])
    truth = []
    for i in range(720):
        if i == 550:
            sim.group_until[group] = sim.t  # flips at the next step
        advance(sim, ctl, i)
        if 430 <= i < 700:
            truth.append(_true_reduction_kw(sim))
    moved = [kw for t, kw in out.adjustment_kw if t > 160]
    assert abs(np.mean(moved)) > 10  # the group's load: over 10 kW either way
    assert out.met, (out.minute_means(), out.requested_kw)
    claimed = np.array([kw for t, kw in out.achieved_kw if t >= 30])
    assert np.mean(truth) == pytest.approx(np.mean(claimed[: len(truth)]), rel=0.03)


@pytest.mark.parametrize("change", ["start", "end"])
def test_a_level_to_hold_is_held_by_the_meter_itself_when_jobs_start_or_end(change):
    """target_kw is a level (a firm service level), not an amount: a job group that starts
    half-way must be shed too, so the meter stays at the level; one that ends gives caps back
    (the meter is under the level by itself), where an amount to shed would hold its caps."""
    sim, ctl = fleet()
    baseline = []
    for i in range(400):
        advance(sim, ctl, i)
        baseline.append(ctl.meter[-1][1])
    level = round(float(np.mean(baseline[-300:])) * 0.9, 1)
    out = ctl.submit(PowerRequest(site="site-a", start=sim.now, duration_s=400, target_kw=level))
    group = int(np.flatnonzero(~sim.group_busy if change == "start" else sim.group_busy)[0])
    meter, held_w = [], []
    for i in range(400, 800):
        if i == 550:
            sim.group_until[group] = sim.t  # flips at the next step
        advance(sim, ctl, i)
        meter.append(ctl.meter[-1][1])
        held_w.append(float(np.sum(sim.power_uncapped - sim.last_power)))
    after = np.array(meter[250:400])  # from 100 s after the change to the end of the hold
    if change == "start":
        # The minute of the step is short (the group came on at once, the caps follow within
        # seconds); every minute after it holds the level.
        minutes = out.minute_means()
        assert min(minutes[3:]) >= 0.98 * out.requested_kw, (minutes, out.requested_kw)
        assert np.mean(after) <= level + 0.02 * out.requested_kw, (np.mean(after), level)
        assert np.mean(held_w[250:400]) > np.mean(held_w[100:150]) + 10e3  # the group's load shed on top
    else:
        assert out.met, (out.minute_means(), out.requested_kw)
        assert np.mean(after) < level - 10  # under the level by itself
        assert np.mean(held_w[250:400]) < 0.5 * np.mean(held_w[100:150])  # the caps given back


def test_a_node_whose_power_reading_is_stuck_is_left_as_it_is():
    """A stuck power sensor: the caps can neither be verified nor moved on its node (the
    detectors read its GPUs' heat against their power, and against each other)."""
    sim2, ctl2 = fleet()
    ctl2.submit(request(400, 10))
    node = int(sim2.gpu_node[np.flatnonzero(sim2.group_busy[sim2.node_group][sim2.gpu_node])[0]])
    for i in range(700):
        if i == 300:
            sim2.inject("stuck_power_sensor", gpu=int(node * 8 + 3), duration_s=1000)
        advance(sim2, ctl2, i)
        if i > 300:
            assert np.all(sim2.caps[sim2.gpu_node == node] == 700), i
    assert np.any(sim2.caps < 700)


def test_a_reading_held_still_by_a_cap_or_idle_is_no_stuck_sensor_but_a_busy_uncapped_one_is():
    """GPU power read to whole watts: a capped GPU holds its cap (the same reading for
    minutes), an idle one its 71 W; neither takes its node out of a request. A busy GPU with
    no cap whose reading does not move for STUCK_READINGS scrapes does."""
    sim = FleetSimulator(FleetConfig(racks=1, nodes_per_rack=3, normal="simple"))
    table = GpuTable(FlexClasses(PowerConfig()))
    base = sim.step().gpu
    node = np.array(base.column("node").to_pylist())
    first, second, third = sorted(set(node))
    power = np.where(node == first, 500.0, np.where(node == second, 71.0, 690.0))
    limit = np.where(node == first, 500.0, 700.0)
    util = np.where(node == second, 0.0, 1.0)
    for i in range(STUCK_READINGS + 5):
        batch = base.set_column(base.schema.get_field_index("power_w"), "power_w", pa.array(power))
        batch = batch.set_column(batch.schema.get_field_index("power_limit_w"), "power_limit_w", pa.array(limit))
        batch = batch.set_column(batch.schema.get_field_index("util_gpu"), "util_gpu", pa.array(util))
        table.update(batch)
    stuck = table.stuck_nodes(STUCK_READINGS)[table.ids.slots(base.column("gpu_uuid"))]
    assert not stuck[node == first].any() and not stuck[node == second].any()
    assert stuck[node == third].all()


def test_in_a_fleet_of_two_models_each_gpu_is_judged_against_its_own_default_limit():
    """An A100 at its 400 W default next to H100s at 700 W is not capped: its reading stuck
    while busy takes its node out of a request (against the batch's 700 W it looked capped,
    held still, and the stuck sensor went unseen)."""
    sim = FleetSimulator(FleetConfig(racks=1, nodes_per_rack=2, normal="simple"))
    table = GpuTable(FlexClasses(PowerConfig()))
    base = sim.step().gpu
    node = np.array(base.column("node").to_pylist())
    a100 = node == sorted(set(node))[1]
    columns = {"power_w": np.where(a100, 390.0, 690.0), "power_limit_w": np.where(a100, 400.0, 700.0),
               "util_gpu": np.ones(len(node)),
               "model": pa.array(np.where(a100, "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3").tolist())}
    batch = base
    for name, values in columns.items():
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values))
    for _ in range(STUCK_READINGS + 1):
        table.update(batch)
    stuck = table.stuck_nodes(STUCK_READINGS)[table.ids.slots(base.column("gpu_uuid"))]
    assert stuck.all()  # both nodes: every busy, uncapped GPU whose reading never moves


def test_the_firm_capacity_is_what_is_left_if_the_scheduler_s_largest_job_goes():
    """What a site can promise (N-1): the flexible capacity less the job that holds the most
    of it, as the scheduler groups the nodes; a node no job is known on stands alone."""
    sim, ctl, _, _, _, _ = run(30, [])
    flexible = ctl.flexible_kw()
    alone = ctl.firm()
    assert alone.largest.startswith("node ") and alone.largest_gpus == 8  # no jobs known: the largest node
    assert alone.kw == pytest.approx(flexible - alone.largest_kw)
    nodes = sim.node_names
    half = len(nodes) // 2
    ctl.set_jobs({n: "1234" for n in nodes[:half]} | {n: "99" for n in nodes[half:half + 2]})
    firm = ctl.firm()
    assert firm.largest == "job 1234" and firm.largest_gpus == 8 * half and firm.kw < alone.kw
    assert firm.kw == pytest.approx(flexible - firm.largest_kw)
    ctl.set_jobs({n: "1" for n in nodes})
    assert ctl.firm().kw == 0.0 and ctl.firm().largest == "job 1"
    ctl.gpus.nodes[:] = [f"{n}.dc1.example.com" for n in ctl.gpus.nodes]  # samples with the full host name
    assert ctl.firm().largest == "job 1"


def test_a_gpu_or_node_a_fault_alert_names_is_uncapped_while_it_fires_and_the_target_still_held():
    """A failing GPU does not draw by its curve and its node may be drained: while a fault
    alert names it (a node alert: every GPU of the node) its cap is restored and the others
    shed its share; demand response's and remediation's own alerts change nothing. Resolved, it is not capped
    again in that request, and may be in the next."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=600))

    def alert(name: str, fingerprint: str, firing: bool, slot: int, gpu: bool = True):
        labels = {"alertname": name, "site": sim.cfg.site, "node": ctl.gpus.nodes[slot]}
        if gpu:
            labels["UUID"] = ctl.gpus.uuids[slot]
        ctl.observe_alerts([(fingerprint, firing, labels)])

    index = {u: i for i, u in enumerate(sim.gpu_uuids)}
    victim = other = -1
    for i in range(1300):
        advance(sim, ctl, i)
        caps = sim.caps
        if i == 500:  # mid-hold: two capped GPUs on different nodes
            capped = [s for s in range(len(ctl.gpus.uuids)) if caps[index[ctl.gpus.uuids[s]]] < 700]
            victim = capped[0]
            other = next(s for s in capped if ctl.gpus.nodes[s] != ctl.gpus.nodes[victim])
            alert("PowerCapNotBinding", "not-binding", True, victim)  # demand response's own: no fault
            alert("GpuStraggler", "straggler", True, victim)
            alert("NodePowerBrake", "brake", True, other, gpu=False)
            alert("RemediationDrainOverdue", "overdue", True, capped[-1], gpu=False)  # remediation's own: no fault
            assert set(ctl.suspects) == {"straggler", "brake"}
        if 510 <= i < 800:
            assert caps[index[ctl.gpus.uuids[victim]]] == 700, i
            node = [index[u] for u, n in zip(ctl.gpus.uuids, ctl.gpus.nodes) if n == ctl.gpus.nodes[other]]
            assert np.all(caps[node] == 700), i
        if i == 800:  # resolved: not capped again in this request (uncapped, it had no capped peers' clock)
            alert("GpuStraggler", "straggler", False, victim)
            alert("NodePowerBrake", "brake", False, other, gpu=False)
            assert ctl.suspects == {} and set(ctl.benched) == {"straggler", "brake"}
        if 800 <= i < 1000:
            assert caps[index[ctl.gpus.uuids[victim]]] == 700, i
    assert out.met, (out.minute_means(), out.requested_kw)
    assert np.all(sim.caps == 700) and ctl.benched == {}  # every cap restored after the request, the bench emptied
    assert ctl.flex()[victim] == 3


def test_a_node_whose_power_sensor_the_detectors_found_stuck_is_left_as_it_is():
    """GpuPowerSensorStuck on a capped GPU (the controller's own rule sees a stuck reading only
    on an uncapped one): its node's caps are neither lifted nor moved while it fires, since a
    cap moved there moves its GPUs' heat against a reading that stays."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=600))
    index = {u: i for i, u in enumerate(sim.gpu_uuids)}
    held = None
    for i in range(1000):
        advance(sim, ctl, i)
        if i == 450:
            slot = next(s for s in range(len(ctl.gpus.uuids)) if sim.caps[index[ctl.gpus.uuids[s]]] < 700)
            node = [index[u] for u, n in zip(ctl.gpus.uuids, ctl.gpus.nodes) if n == ctl.gpus.nodes[slot]]
            ctl.observe_alerts([("stuck", True, {"alertname": "GpuPowerSensorStuck", "node": ctl.gpus.nodes[slot],
                                                 "UUID": ctl.gpus.uuids[slot]})])
            held = sim.caps[node].copy()
            assert ctl.flex()[slot] == 3  # not a suspect: left as it is, not uncapped
        if held is not None and i < 1000:
            assert np.array_equal(sim.caps[node], held), i
    assert out.met, (out.minute_means(), out.requested_kw)


def named(batch: pa.RecordBatch, jobs: dict[str, str]) -> pa.RecordBatch:
    """The batch with the job column the samples would carry (dcgm-exporter's hpc_job), by UUID."""
    column = pa.array([jobs.get(u) for u in batch.column("gpu_uuid").to_pylist()], pa.string())
    return batch.set_column(batch.schema.get_field_index("job"), batch.schema.field("job"), column)


def test_the_job_the_samples_name_is_a_gpus_job_before_the_scheduler_s_and_another_one_is_learned_afresh():
    sim, ctl = fleet()
    uuids = sim.gpu_uuids
    three_quarters = {u: "7001" for u in uuids[len(uuids) // 4:]}  # (the first quarter is idle on this seed)
    three_quarters[uuids[-1]] = "7001,7002"  # a GPU the job shares (sharding): it counts in the first
    ctl.set_jobs({n: "1234" for n in sim.node_names})  # the scheduler says one job everywhere
    ctl.submit(request(400, 10, duration_s=600))
    for i in range(460):
        advance(sim, ctl, i, three_quarters)
    firm = ctl.firm()
    assert firm.largest == "job 7001" and firm.largest_gpus == len(three_quarters)
    slots = ctl.gpus.ids.slots(pa.array(uuids))
    capped = [u for u, s in zip(uuids, slots) if three_quarters.get(u) == "7001" and not np.isnan(ctl.cap[s])]
    assert capped, "the request capped some of job 7001's GPUs"
    moved, slot = capped[0], int(slots[uuids.index(capped[0])])
    assert ctl.learner.ref_n[slot] > 10 and ctl.steady[slot]
    # The scheduler gives that GPU to another job, with no idle gap between: learned afresh, and
    # out of the request's plan (its cap lifted) until it has a reference of its own.
    capped_at = ctl.cap[slot]
    tick = sim.step()
    ctl.observe_gpus(named(tick.gpu, three_quarters | {moved: "7002"}))
    assert ctl.learner.ref_n[slot] <= 1 and not ctl.steady[slot]
    ctl.observe_facility(tick.facility)
    ctl.step(sim.now)
    assert not np.isnan(capped_at) and np.isnan(ctl.cap[slot])
    assert ctl.firm().largest == "job 7001" and ctl.firm().largest_gpus == len(three_quarters) - 1


def test_a_new_job_is_one_that_shares_none_of_the_jobs_the_gpu_had():
    """The job mapping as Slurm keeps it: the epilog removes a GPU's file before the next job's
    prolog writes it (A, none, B: a new job); a job that comes to share the GPU (B, then B and
    C) and the first one's end (then C) are the same work going on."""
    sim = FleetSimulator(FleetConfig(racks=1, nodes_per_rack=1, normal="simple"))
    table = GpuTable(FlexClasses(PowerConfig()))
    base = sim.step().gpu
    uuid = base.column("gpu_uuid").to_pylist()[0]
    seen = []
    for job in ("A", None, "B", "B,C", "C", "C", "D", None, None, "D"):
        table.update(named(base, {uuid: job} if job else {}))
        seen.append(bool(table.new_job[0]))
    assert seen == [False, False, True, False, False, False, True, False, False, False]


def test_a_label_change_keeps_each_gpus_workload_class():
    """An admin labels one node: every GPU's class is taken again, each with the workload its
    samples named last; an inference GPU (class 0 by its namespace) on another rack stays 0,
    where its node alone said 3 until its own rack's next batch."""
    from datetime import datetime, timezone

    from pipeline.model import GPU_SAMPLE
    from tests.archives import batch
    from tests.conftest import make_config
    cfg = make_config(power={"default_class": 3, "node_labels": "slurm", "classes": [
        {"namespace": "inference*", "flex_class": 0}, {"feature": "flex1", "flex_class": 1}]})
    classes = FlexClasses(cfg.power)
    table = GpuTable(classes)

    def sample(node: str, rack: str, namespace: str):
        return batch(GPU_SAMPLE, {"ts": [datetime(2026, 12, 1, tzinfo=timezone.utc)], "site": ["s"], "rack": [rack],
                                  "node": [node], "gpu": [0], "gpu_uuid": [f"GPU-{node}"], "power_w": [600.0],
                                  "util_gpu": [0.9], "power_limit_w": [700.0], "namespace": [namespace],
                                  "pod": ["p-0"]})
    classes.set_node_labels({"a1": frozenset(), "b1": frozenset(), "c1": frozenset()})
    for node, rack, ns in (("a1", "r1", "inference-prod"), ("b1", "r2", "inference-prod"), ("c1", "r3", "batch")):
        table.update(sample(node, rack, ns))
    assert table.flex.tolist() == [0, 0, 3]
    classes.set_node_labels({"a1": frozenset({"flex1"}), "b1": frozenset(), "c1": frozenset({"flex1"})})
    table.update(sample("a1", "r1", "inference-prod"))  # rack r1's next batch, before r2's and r3's
    assert table.flex.tolist() == [0, 0, 1]


def test_a_target_never_reached_still_reports_what_it_shed():
    """Class 1 (at most 10% of a job's work) cannot shed 30% of the site: the target is never
    reached, and the report says what was shed after the ramp and the energy from the start
    (before, p50, min and energy were all null while GPUs were capped)."""
    from pipeline.power.store import Entry
    from pipeline.power.report import Tracked, report_row
    req = request(300, 30)
    sim, ctl, (out,), _, _, _ = run(700, [req], default_class=1)
    assert out.reached_s is None and not out.achieved_kw and out.gpus_capped > 0
    hold = out.hold()
    assert hold and hold[0][0] >= req.ramp_s and all(t < req.duration_s for t, _ in hold)
    row = report_row(Tracked(Entry(req.to_dict()), req, out, state="done"), sim.now, dry_run=False)
    assert 0 < row["reduction_min_kw"] <= row["reduction_p50_kw"] < out.requested_kw
    assert row["energy_curtailed_kwh"] > row["reduction_p50_kw"] * (req.duration_s - req.ramp_s) / 3600 * 0.9
    assert not row["met"]


def test_meter_readings_that_come_late_are_measured():
    """The site meter's readings reach the controller 6 s after the PDUs' and GPUs' (a BMS poller
    of its own, a reconnect): each is measured when it comes (every one stamped before the last
    step was skipped: 6 s late, none was, and the request was never reached)."""
    from collections import deque

    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=300))
    late: deque = deque()
    for i in range(720):
        tick = sim.step()
        meter = pc.equal(tick.facility.column("device_class"), "meter")
        late.append(tick.facility.filter(meter))
        ctl.observe_gpus(tick.gpu)
        ctl.observe_facility(tick.facility.filter(pc.invert(meter)))
        if len(late) > 6:
            ctl.observe_facility(late.popleft())
        if i % INTERVAL == 0:
            ctl.step(sim.now)
    assert len(out.shed_kw) >= 290 and out.met, (len(out.shed_kw), out.reached_s)


@pytest.mark.parametrize("gpu_lag, back", [(0, 60), (10, 5)])
def test_a_meter_backlog_sent_behind_its_live_readings_is_not_measured_again(gpu_lag, back):
    """A BMS gateway back from an outage sends its backlog behind its live readings (the
    facility collector takes it, for the archive): the meter's older readings had entered the
    measure as if they were new, and the site's power was read from one a minute old. So too
    where the GPUs' data comes 10 s behind the meter's (a slower scrape, a consumer's lag)."""
    from collections import deque
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=300))
    sent = []
    gpus: deque = deque()
    for i in range(720):
        tick = sim.step()
        meter = tick.facility.filter(pc.equal(tick.facility.column("device_class"), "meter"))
        sent.append(meter)
        gpus.append(tick.gpu)
        if len(gpus) > gpu_lag:
            ctl.observe_gpus(gpus.popleft())
        ctl.observe_facility(tick.facility)
        if 400 <= i < 460:  # in the hold: each second, an older reading again
            ctl.observe_facility(sent[i - back])
        if i % INTERVAL == 0:
            ctl.step(sim.now)
    times = [t for t, _, _ in ctl.meter]
    assert times == sorted(times) and times[-1] == max(sent[-1].column("ts").to_pylist())
    assert out.met and all(np.isfinite(out.minute_means()))


def test_one_meter_reading_stamped_ahead_hides_none_of_the_later_ones():
    """A BMS clock that runs ahead (within the intake's window) stamps one meter reading 4
    minutes ahead: the readings after it, older than it, are measured all the same (the site's
    power had been frozen at that one reading for 4 minutes of a hold)."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=300))
    for i in range(720):
        tick = sim.step()
        ctl.observe_gpus(tick.gpu)
        if i == 420:
            meter = tick.facility.filter(pc.equal(tick.facility.column("device_class"), "meter"))
            ahead = pc.add(meter.column("ts"), pa.scalar(timedelta(seconds=240)))
            ctl.observe_facility(meter.set_column(meter.schema.get_field_index("ts"), "ts", ahead))
            measured = len(ctl.meter)
        ctl.observe_facility(tick.facility)
        if i % INTERVAL == 0:
            ctl.step(sim.now)
    assert len(ctl.meter) - measured >= 290 and out.met


@pytest.mark.parametrize("change", ["gone", "replaced"])
def test_gpus_that_stop_reporting_leave_the_request_and_new_ones_join_it(change):
    """Mid-hold a capped node's GPUs stop reporting (its job ends as its node is drained: "gone"),
    or its boards are replaced (new UUIDs: "replaced"). The silent GPUs leave the request and its
    capacity (they stayed steady, credited and counted for good: 11.1 kW claimed where 7.2 were
    shed), and the new ones join it; what is claimed is what the caps shed."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=400))
    hidden, rename = None, {}

    def seen(i: int, tick):
        nonlocal hidden, rename
        if i == 549:  # (after this second: the next step flips the job)
            node = int(sim.gpu_node[np.flatnonzero(sim.caps < 700)[0]])
            if change == "gone":
                group = int(sim.gpu_job[np.flatnonzero(sim.gpu_node == node)[0]])
                sim.group_until[group] = sim.t  # its job ends at the next step, and its GPUs go silent
                hidden = pa.array([u for u, j in zip(sim.gpu_uuids, sim.gpu_job) if j == group])
            else:
                rename = {sim.gpu_uuids[p]: sim.gpu_uuids[p].replace("GPU-", "GPU-NEW")
                          for p in np.flatnonzero(sim.gpu_node == node)}
                ctl.actuator.apply({u: None for u in rename})  # the new boards come up at their default limit
                for old, new in rename.items():
                    ctl.actuator.index[new] = ctl.actuator.index[old]
        gpu = tick.gpu
        if hidden is not None and i >= 550:
            gpu = gpu.filter(pc.invert(pc.is_in(gpu.column("gpu_uuid"), value_set=hidden)))
        if rename and i >= 550:
            gpu = gpu.set_column(gpu.schema.get_field_index("gpu_uuid"), "gpu_uuid",
                                 pa.array([rename.get(u, u) for u in gpu.column("gpu_uuid").to_pylist()]))
        return gpu, tick.facility
    truth = drive(sim, ctl, 820, seen, range(650, 800))
    claimed = [kw for t, kw in out.achieved_kw if 250 <= t < 400]
    assert np.mean(claimed) == pytest.approx(np.mean(truth), rel=0.05) and out.met
    old = ctl.gpus.ids.slots(hidden if hidden is not None else pa.array(list(rename)))
    assert not ctl.steady[old].any() and np.isnan(ctl.cap[old]).all()
    if rename:
        assert ctl.steady[ctl.gpus.ids.slots(pa.array(list(rename.values())))].all()


@pytest.mark.parametrize("every_s", [1, 30])
def test_a_gpu_is_silent_after_a_minute_or_three_scrapes_without_a_sample_on_the_datas_time(every_s):
    """A GPU is gone after 60 s without a sample behind the fleet's newest, on a fleet scraped
    every second; on one scraped every 30 s (dcgm-exporter under Prometheus), after three
    scrapes missed (one late scrape is no GPU gone)."""
    sim = FleetSimulator(FleetConfig(racks=1, nodes_per_rack=2, normal="simple"), start=EVAL_EPOCH)
    table = GpuTable(FlexClasses(PowerConfig()))
    first = sim.step().gpu
    table.update(first)
    half = first.num_rows // 2
    after_s = max(60, 3 * every_s)
    for seconds in range(every_s, after_s + 2 * every_s, every_s):  # the first half reports, the other does not
        later = first.slice(0, half)
        ts = pa.array([t + timedelta(seconds=seconds) for t in later.column("ts").to_pylist()], later.schema.field("ts").type)
        table.update(later.set_column(0, "ts", ts))
        silent = table.silent()[table.ids.slots(first.column("gpu_uuid"))]
        assert not silent[:half].any() and silent[half:].all() == (seconds > after_s), seconds


@pytest.mark.parametrize("column", ["power_limit_w", "util_mem"])
def test_a_column_the_source_does_not_send_leaves_the_loop_working(column):
    """A stock dcgm-exporter sends no enforced limit (not a default counter), and no memory
    utilisation on a MIG GPU. Without the limit a capped draw was taken for the job's own (it
    shed 1.85x the target and called it missed); without util_mem no GPU was ever learned or
    capped. Now the loop meets the target and claims what it sheds."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=400))

    def without(i: int, tick):
        f = tick.gpu.schema.field(column)
        return tick.gpu.set_column(tick.gpu.schema.get_field_index(column), f, pa.nulls(tick.gpu.num_rows, f.type)), \
            tick.facility
    truth = drive(sim, ctl, 820, without, range(460, 800))
    assert out.met, (out.minute_means(), out.requested_kw)
    claimed = [kw for t, kw in out.achieved_kw if 60 <= t < 400]
    assert np.mean(claimed) == pytest.approx(np.mean(truth), rel=0.05)
    assert np.mean(truth) < 1.3 * out.requested_kw


@pytest.mark.parametrize("change", ["start", "end"])
def test_a_meter_that_reads_one_feed_of_two_counts_its_own_share_of_the_load_not_controlled(change):
    """The site meter reads one of the site's two feeds: half of the site, less than the PDUs'
    sum. A job group that starts (or ends) half-way moves the baseline by the meter's share of
    its load, not all of it (the meter's slope on the PDUs was held at 1 or more: a start was
    credited about 1.5x what the meter could show), so what the request claims is what the
    caps shed at that meter."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10))
    group = int(np.flatnonzero(~sim.group_busy if change == "start" else sim.group_busy)[0])

    def one_feed(i, tick):
        if i == 549:
            sim.group_until[group] = sim.t  # flips at the next step
        f = tick.facility
        meter = pc.equal(f.column("device_class"), "meter")
        half = pc.if_else(meter, pc.multiply(f.column("value"), 0.5), f.column("value"))
        return tick.gpu, f.set_column(f.schema.get_field_index("value"), "value", half)
    truth = 0.5 * np.array(drive(sim, ctl, 720, one_feed, range(430, 700)))
    assert ctl.meter_per_it()[0] < 0.8  # (the site's slope, about 1.3, at half)
    moved = [kw for t, kw in out.adjustment_kw if t > 160]
    assert abs(np.mean(moved)) > 5  # the group's load at the meter: over 5 kW either way
    claimed = np.array([kw for t, kw in out.achieved_kw if t >= 30])
    assert np.mean(claimed[: len(truth)]) == pytest.approx(np.mean(truth), rel=0.05)
    assert out.met, (out.minute_means(), out.requested_kw)


def test_a_rack_fed_by_two_pdus_counts_both():
    """Each rack's A and B feeds are two PDUs, each reading its share: the last one read had replaced
    the other as the rack's power, so the PDUs' sum (what the baseline is adjusted by, and a rack set's
    covered load) was about half the IT load."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10))
    truth = []

    def two_feeds(i, tick):
        f = tick.facility
        power = pc.and_(pc.equal(f.column("device_class"), "rack"), pc.equal(f.column("metric"), "power_w"))
        truth.append(pc.sum(f.filter(power).column("value")).as_py() / 1000.0)
        return tick.gpu, a_and_b_feeds(f)
    drive(sim, ctl, 720, two_feeds)
    assert ctl.it[-1][2] == pytest.approx(truth[-1], rel=0.02)
    assert out.met, (out.minute_means(), out.requested_kw)


def test_gpus_whose_caps_are_refused_are_planned_on_no_more_nor_counted_as_capacity(caplog):
    """Half the nodes' agents refuse every cap (not root: NVML_ERROR_NO_PERMISSION, nothing set). The
    controller had never been told (the power role read no power_actions): it counted their GPUs as capped
    and the site's capacity at 18.9 kW where the GPUs that take a cap shed 12.3, so later requests were
    accepted against watts no one could shed. Told by the agents' actions, they are class 0 until a cap
    of theirs succeeds; the request is met by the others."""
    import pyarrow as pa

    from pipeline.power.actuator import apply_to_simulator
    sim, ctl = fleet()
    nodes = sorted(set(sim.node_names))
    refusing = set(nodes[:len(nodes) // 2])
    index = {u: i for i, u in enumerate(sim.gpu_uuids)}

    class Agents:  # apply what the agents may; the power role passes their power_actions on
        def apply(self, caps):
            ok = {u: w for u, w in caps.items() if w is None or sim.node_names[sim.gpu_node[index[u]]] not in refusing}
            apply_to_simulator(sim, index, list(ok), [np.nan if w is None else w for w in ok.values()])
            no = [(u, w) for u, w in caps.items() if u not in ok]
            if no:
                ctl.observe_actions(pa.RecordBatch.from_pydict({
                    "gpu_uuid": [u for u, _ in no], "node": [sim.node_names[sim.gpu_node[index[u]]] for u, _ in no],
                    "requested_w": [w for _, w in no], "status": ["not_permitted"] * len(no),
                    "detail": ["run the agent as root"] * len(no)}))
    ctl.actuator = Agents()
    out = ctl.submit(request(400, 10))
    drive(sim, ctl, 760)
    assert out.met, (out.minute_means(), out.requested_kw)
    assert ctl.flexible_kw() < 13.0  # what the GPUs that take a cap can shed (18.9 believed before)
    assert ctl.refused and {n for n, _ in ctl.refused.values()} <= refusing
    assert caplog.text.count("refused its cap") == len(ctl.refused)  # (said once a GPU)


def test_a_node_whose_clock_runs_behind_is_capped_like_the_others():
    """A node whose agent's clock runs 90 s behind (NTP not running): its samples come on time, stamped 90 s
    early. It had been judged silent for good, its GPUs never capped and out of the site's capacity, without
    a word. Silence is judged by when a GPU was last heard."""
    sim, ctl = fleet()
    node = sorted(set(sim.node_names))[-1]

    def behind(i, tick):
        g = tick.gpu
        ts = g.column("ts")
        late = pc.if_else(pc.equal(g.column("node"), node), pc.subtract(ts, pa.scalar(timedelta(seconds=90))), ts)
        return g.set_column(g.schema.get_field_index("ts"), "ts", late.cast(ts.type)), tick.facility
    ctl.submit(request(400, 10))
    drive(sim, ctl, 600, behind)
    on = np.array([n == node for n in ctl.gpus.nodes])
    assert not ctl.gpus.silent()[on].any() and (~np.isnan(ctl.cap[on])).all()


def test_a_site_with_a_meter_and_no_pdus_adjusts_its_baseline_by_the_gpus():
    """Many sites bring only their revenue meter into monitoring, no rack PDUs: the baseline had been left
    unadjusted, so a job group that ended mid-request was credited to the caps and the loop gave them back
    (and one that started was shed over again, three times what was asked). The GPUs' own draw stands for
    the IT load: what the meter credits is what the caps shed."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10))
    group = int(np.flatnonzero(sim.group_busy)[0])

    def meter_only(i, tick):
        if i == 549:
            sim.group_until[group] = sim.t  # a job group ends
        f = tick.facility
        return tick.gpu, f.filter(pc.equal(f.column("device_class"), "meter"))
    truth = drive(sim, ctl, 760, meter_only, truth_in=range(580, 700))
    claimed = [kw for t, kw in out.achieved_kw if t >= 180]
    assert np.mean(claimed) == pytest.approx(np.mean(truth), rel=0.1)
    assert out.met, (out.minute_means(), out.requested_kw)


def test_a_feed_that_fails_mid_request_leaves_its_rack_s_sum_and_the_other_carries_the_rack():
    """Rack r01's A-feed PDU stops reporting mid-request and its B feed carries the whole rack (a failover):
    the dead feed's last reading had stayed in the sum, B's doubled reading read as new load not controlled,
    and the loop credited the caps with it: met, claiming 20 kW while the caps shed 0.7."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10))

    def failover(f):
        device, value = f.column("device"), f.schema.get_field_index("value")
        f = f.filter(pc.invert(pc.equal(device, "pdu-r01-a")))
        b = pc.equal(f.column("device"), "pdu-r01-b")
        return f.set_column(value, f.schema.field(value),
                            pc.if_else(b, pc.multiply(f.column("value"), 2.0), f.column("value")))
    truth = drive(sim, ctl, 760, half_feeds_from(520, failover), truth_in=range(550, 700))
    claimed = [kw for t, kw in out.achieved_kw if t >= 150]
    assert np.mean(claimed) == pytest.approx(np.mean(truth), rel=0.1)
    assert out.met, (out.minute_means(), out.requested_kw)


def test_pdus_polled_less_often_than_the_meter_are_matched_with_the_caps_at_their_own_time():
    """The site meter reads every second, the racks' PDUs every 30 s (a BMS polls them in
    rounds). A PDU reading from before the caps came down was read against the caps now, as if
    the load not controlled had risen by all they shed: the first half-minute claimed about twice
    the reduction. Each PDU reading is now matched with what the caps changed at its own time."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10))

    def slow_pdus(i, tick):
        f = tick.facility
        if i % 30 != 17:
            f = f.filter(pc.not_equal(f.column("device_class"), "rack"))
        return tick.gpu, f
    truth = np.array(drive(sim, ctl, 720, slow_pdus, range(400, 700)))
    at = {round(t): kw for t, kw in out.shed_kw}
    claimed = np.array([at.get(s, np.nan) for s in range(300)])
    ok = ~np.isnan(claimed)
    assert ok.sum() > 250
    error = np.abs(claimed[ok] - truth[ok])
    assert np.max(error[3:60]) < 0.25 * out.requested_kw, (claimed[:40], truth[:40])  # (from the caps' first reading)
    # Over the hold it claims no more than it shed (a sum read every 30 s is a coarse baseline: it
    # claims less, on the safe side).
    assert 0.85 * np.mean(truth[ok]) <= np.mean(claimed[ok]) <= 1.03 * np.mean(truth[ok])
    assert out.met, (out.minute_means(), out.requested_kw)


def test_a_fleet_scraped_every_30_s_is_held_like_one_sampled_every_second():
    """dcgm-exporter under Prometheus: the GPUs, the meter and the PDUs read every 30 s. The
    loop's spans are seconds, not samples: its mean of the meter against the caps followed a
    new plan over 30 minutes' readings instead of one, and the hold sat 6% under the target for
    four minutes."""
    sim = FleetSimulator(FleetConfig(racks=2, seed=4, fault_interval_s=0, gpu_reset_interval_s=0, normal="simple",
                                     sample_interval_s=30), start=EVAL_EPOCH)
    ctl = Controller(sim.cfg.site, CURVE, SimulatorActuator(sim), PowerConfig(default_class=3))
    out = ctl.submit(request(600, 15, duration_s=600))
    for _ in range(1500 // 30):
        tick = sim.step()
        ctl.observe_gpus(tick.gpu)
        ctl.observe_facility(tick.facility)
        ctl.step(sim.now)
    assert ctl.gpus.interval_s == 30.0
    assert out.met, (out.minute_means(), out.requested_kw)


def test_a_pdu_whose_clock_runs_ahead_leaves_the_other_racks_credit_as_it_was():
    """One rack's PDU stamps its readings 120 s ahead (intake takes up to 300 s): the caps'
    records are dated by each facility batch's median, so the other rack's PDU is still read
    against the caps it saw (dated by the batch's newest, every record was 120 s late, and the
    request claimed 6-9 kW under what it shed and missed)."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10))

    def ahead(i, tick):
        f = tick.facility
        late = pc.and_(pc.equal(f.column("device_class"), "rack"), pc.equal(f.column("rack"), "r02"))
        ts = pc.if_else(late, pa.array([t + timedelta(seconds=120) for t in f.column("ts").to_pylist()],
                                       f.schema.field("ts").type), f.column("ts"))
        return tick.gpu, f.set_column(f.schema.get_field_index("ts"), "ts", ts)
    truth = np.array(drive(sim, ctl, 720, ahead, range(400, 700)))
    at = {round(t): kw for t, kw in out.shed_kw}
    claimed = np.array([at.get(s, np.nan) for s in range(5, 300)])
    assert np.nanmax(np.abs(claimed - truth[5:])) < 0.1 * out.requested_kw
    assert out.met, (out.minute_means(), out.requested_kw)


def test_the_fleet_s_interval_and_silence_hold_against_one_node_back_late_and_one_clock_ahead():
    """A fleet scraped every 30 s: one node's message back after an hour is no new interval (it
    had made the fleet's 390 s, and a GPU gone was found after 20 minutes); a replayed batch
    stands for no time; one GPU whose clock runs 120 s ahead silences no other GPU."""
    sim = FleetSimulator(FleetConfig(racks=1, nodes_per_rack=4, normal="simple", sample_interval_s=30),
                         start=EVAL_EPOCH)
    table = GpuTable(FlexClasses(PowerConfig()))

    def shifted(b, seconds):
        return b.set_column(0, "ts", pa.array([t + timedelta(seconds=seconds) for t in b.column("ts").to_pylist()],
                                              b.schema.field("ts").type))
    first = sim.step().gpu
    node = pc.equal(first.column("node"), first.column("node")[0])
    table.update(shifted(first.filter(node), -3600))  # (its last sample an hour before)
    for _ in range(3):
        table.update(sim.step().gpu.filter(pc.invert(node)))
    b = sim.step().gpu
    table.update(b.filter(node))  # back: 3,720 s after its last
    assert table.interval_s == 30.0 and np.all(table.dt_s == 3720.0)
    table.update(b.filter(pc.invert(node)))
    table.update(b.filter(pc.invert(node)))  # (delivered twice)
    assert np.all(table.dt_s == 0.0)
    table.update(shifted(b.slice(8, 1), 120))
    silent = table.silent()[table.ids.slots(b.column("gpu_uuid"))]
    assert not silent.any()


def test_a_restore_overshoot_is_the_rise_s_peak_against_the_peak_of_the_minute_after():
    """A training job's swing peaks while the caps rise and in the minute after they are gone
    alike: no rebound. The overshoot had been the rise's peak against the minute's mean, so a
    fleet's own swing read as a 16.5 kW rebound here (46-64 kW in the eval)."""
    out = Outcome(request(0, 10))
    out.restoring_kw = [100.0, 131.0, 104.0]       # each step's peak while the caps rise
    out.restored_kw = [101.0, 130.0, 99.0, 128.0]  # ... and in the minute after
    assert out.restore_overshoot_kw == pytest.approx(1.0)
    out.restoring_kw = [100.0, 151.0]              # a rebound: 21 kW over the swing's own peak
    assert out.restore_overshoot_kw == pytest.approx(21.0)


def meter_late(seconds: int):
    """A `drive` transform: the site meter's readings delivered `seconds` after they were read
    (a BMS bridged over MQTT), the PDUs' and GPUs' on time."""
    late: list[pa.RecordBatch] = []

    def transform(i, tick):
        f = tick.facility
        meter = pc.equal(f.column("device_class"), "meter")
        late.append(f.filter(meter))
        f = f.filter(pc.invert(meter))
        return tick.gpu, pa.concat_batches([f, late.pop(0)]) if len(late) > seconds else f
    return transform


def test_a_meter_delivered_20_s_late_is_set_against_the_pdus_and_caps_of_its_own_time():
    """The site meter's readings come 20 s after they were read (a BMS bridged over MQTT), the
    PDUs' and the GPUs' on time. Each reading is set against the PDUs as they read then, a
    reading from before the caps last changed says nothing of them, and the loop corrects again
    only once the meter has read since: the request is met and sheds about what it asked. Paired
    with the PDUs at its arrival, the late meter had shed 1.7x the request (by the simulator's
    truth) and still called a minute short."""
    sim = FleetSimulator(FleetConfig(racks=2, seed=2, fault_interval_s=0, gpu_reset_interval_s=0, normal="realistic"),
                         start=EVAL_EPOCH)
    ctl = Controller(sim.cfg.site, CURVE, SimulatorActuator(sim), PowerConfig(default_class=3))
    out = ctl.submit(request(400, 15))
    truth = drive(sim, ctl, 800, meter_late(20), range(430, 700))
    assert out.met, (out.minute_means(), out.requested_kw)
    assert np.mean(truth) < 1.25 * out.requested_kw, (np.mean(truth), out.requested_kw)


def test_a_meter_delivered_20_s_late_has_its_hold_and_restore_read_by_their_own_time():
    """The site meter's readings come 20 s after they were read: the hold's last 20 s come while
    the caps rise, and the rise's last readings after the last cap went. Each is taken where its
    own time puts it: the hold's measured (they had been dropped), the rise's peak over the rise's
    readings (those that came after the last cap went had counted as the minute after it)."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=300))
    drive(sim, ctl, 900, meter_late(20))
    assert out.met and out.achieved_kw[-1][0] >= 298, out.achieved_kw[-1]
    assert out.restore_done is not None and ctl.caught_up(out, sim.now)
    end = out.restore_done + timedelta(seconds=ctl.s.control_interval_s)
    rise = [kw for t, _, kw in ctl.meter if out.restore_from <= t <= end]  # (the instants: a spike's peak)
    after = [kw for t, _, kw in ctl.meter if end < t <= end + timedelta(seconds=60)]
    assert max(out.restoring_kw) == max(rise) and max(out.restored_kw) == max(after)
    assert max(rise) > max(kw for t, _, kw in ctl.meter if out.restore_from - timedelta(seconds=60) <= t < out.restore_from)


def test_a_cancel_takes_effect_at_the_next_step_so_the_readings_before_it_show_the_caps():
    """A cancel between two steps: the caps hold until the step restores them, so the readings
    meanwhile are the hold's (the phase had turned at once, the PDUs' records stopped counting the
    caps, and those readings showed no reduction)."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=300))
    for i in range(620):
        tick = sim.step()
        ctl.observe_gpus(tick.gpu)
        ctl.observe_facility(tick.facility)
        if i == 552:
            assert ctl.cancel(out.request.id) == "restoring" and ctl.cancel(out.request.id) == ""
        if i % INTERVAL == 0:
            ctl.step(sim.now)
    assert out.restore_from == out.request.start + timedelta(seconds=156)  # (the step after it)
    assert min(kw for t, kw in out.shed_kw[-8:]) >= 0.98 * out.requested_kw, out.shed_kw[-8:]


def test_a_meter_reading_delivered_again_after_newer_ones_hides_none_of_them():
    """At-least-once delivery: the meter's reading of 2 s ago comes again after the newer ones.
    Every reading of the hold is still measured once (walking back from the newest to the first
    reading already taken had stopped at the old one and lost the two after it)."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, duration_s=300))
    meter: list[pa.RecordBatch] = []

    def again(i, tick):
        f = tick.facility
        meter.append(f.filter(pc.equal(f.column("device_class"), "meter")))
        return tick.gpu, pa.concat_batches([f, meter[-3]]) if i == 502 else f
    drive(sim, ctl, 720, again)
    assert [t for t, _ in out.shed_kw] == [float(s) for s in range(300)]


@pytest.mark.parametrize("every_s, ramp_s, reached_s, in_time", [
    (30.0, 30.0, 31.4, True),    # a meter read every 30 s: its first reading after the deadline judges it
    (30.0, 30.0, 61.4, False),   # ... not the one after that
    (1.0, 30.0, 30.4, True),     # every second: the reading at the deadline's second
    (1.0, 30.0, 31.4, False),
    (30.0, 20.0, 31.4, False),   # a ramp shorter than the meter's interval: no reading can show it
])
def test_a_ramp_is_judged_by_the_first_reading_that_can_show_its_deadline(every_s, ramp_s, reached_s, in_time):
    req = request(0, 10, ramp_s=ramp_s)
    times = np.arange(1.4, 300, every_s)
    out = Outcome(req, requested_kw=10.0, reached_s=reached_s, shed_kw=[(t, 0.0 if t < reached_s else 11.0) for t in times],
                  achieved_kw=[(t, 11.0) for t in times if t >= reached_s])
    assert out.in_time is in_time and out.met is in_time


def test_a_ramp_whose_meter_went_silent_is_not_judged_by_a_reading_long_after_it():
    times = [1.4, 2.4, 3.4, 4.4, 300.4]
    out = Outcome(request(0, 10), requested_kw=10.0, reached_s=300.4, shed_kw=[(t, 11.0 * (t > 100)) for t in times])
    assert out.due_s() == 30.0 and not out.in_time
    assert not Outcome(request(0, 10), shed_kw=[(t, 0.0) for t in times[:4]]).ramp_judged(30.5)  # (it may come yet)
    assert Outcome(request(0, 10), shed_kw=[(t, 0.0) for t in times[:4]]).ramp_judged(31.5)


def test_a_fleet_scraped_every_30_s_is_measured_over_each_scrape_by_the_energy_counters():
    """The realistic normal, the GPUs, the meter and the PDUs all read every 30 s: the fleet's training
    jobs swing between compute and communication in lockstep, and one instant of them swings the
    site by half a request or more. Every reading of the measure is now its scrape's mean: the
    meter's and the PDUs' by their energy counters, and what the caps changed by each GPU's energy
    counter against its job's uncapped draw. On this seed the measure's minutes are within a quarter
    of the truth's (0.39 of the request apart with instants) and every minute is within 5% of the
    request or over it (with instants it was not met; met outright until the simulator's readings
    became means over the second, which left the first minute at 97% by the measure, 104% true).
    (Not on every seed: a job that ends or stalls in a 2-rack fleet moves the measure by more, with
    instants or means; docs/power.md.)"""
    from pipeline.analytics.demand_response import DemandResponse, _minute_means
    from pipeline.config import load_config
    cfg = load_config(None, env={"FLEETWATCH_POWER__DEFAULT_CLASS": "3", "FLEETWATCH_FLEET__SAMPLE_INTERVAL_S": "30",
                                 "FLEETWATCH_FLEET__SEED": "8", "FLEETWATCH_FLEET__FAULT_INTERVAL_S": "0",
                                 "FLEETWATCH_FLEET__RACKS": "2"})
    sim = FleetSimulator(cfg.fleet, start=EVAL_EPOCH)
    dr = DemandResponse(cfg, sim, 1500, 1)
    for _ in range(1500 // 30):
        tick = sim.step()
        dr.tick(tick.gpu, tick.facility)
    (event,) = dr.events
    out = event.outcome
    truth, measured = _minute_means(event.true_kw, out.reached_s, 30.0), out.minute_means()
    assert len(truth) >= 8 and len(measured) >= len(truth)
    assert max(abs(m - t) for m, t in zip(measured, truth)) < 0.25 * out.requested_kw, (measured, truth)
    assert min(measured) >= 0.95 * out.requested_kw, (measured, out.requested_kw)


def test_a_meter_polled_every_30_s_beside_gpus_read_every_second_is_measured_over_each_interval():
    """A BMS that polls the site meter every 30 s while the agents read the GPUs every second: the hold
    had been judged on two instants a minute of a load that swings, a false "not met" (10.5 kW of 11.1
    asked, the truth 12.2 kW). The meter's readings are its energy counter's mean over each interval."""
    sim, ctl = fleet()
    out = ctl.submit(request(400, 10, ramp_s=30))

    def meter_every_30_s(i, tick):
        f = tick.facility
        return tick.gpu, f if i % 30 == 0 else f.filter(pc.not_equal(f.column("device_class"), "meter"))
    truth = drive(sim, ctl, 800, meter_every_30_s, truth_in=range(430, 700))
    assert out.met, (out.minute_means(), out.requested_kw)
    assert np.mean(truth) >= out.requested_kw and ctl.gpus.means() is False  # (the GPUs still by their instants)


def test_caps_never_applied_are_not_credited_at_30_s_where_the_source_sends_no_enforced_limit():
    """dcgm-exporter's default counters leave the enforced limit out, and the cap set here stands
    for it: a GPU whose mean draw over the scrape is over that cap was not held by it (the agents
    did not apply it, here a dry run). It had been credited its whole draw above the cap."""
    from pipeline.roles.power import DryRunActuator
    sim = FleetSimulator(FleetConfig(racks=2, seed=4, fault_interval_s=0, gpu_reset_interval_s=0, normal="simple",
                                     sample_interval_s=30), start=EVAL_EPOCH)
    ctl = Controller(sim.cfg.site, CURVE, DryRunActuator(), PowerConfig(default_class=3))
    out = ctl.submit(request(900, 8, duration_s=600, ramp_s=60))
    planned = 0
    for _ in range(60):
        tick = sim.step()
        gpu = tick.gpu
        at = gpu.schema.get_field_index("power_limit_w")
        gpu = gpu.set_column(at, gpu.schema.field(at), pa.nulls(gpu.num_rows, pa.float64()))
        ctl.observe_gpus(gpu)
        ctl.observe_facility(tick.facility)
        ctl.step(sim.now)
        planned = max(planned, int(np.sum(~np.isnan(ctl.cap))))
    assert planned > 0  # (planned, never applied)
    assert out.reached_s is None and max(abs(m) for m in out.minute_means()) < 0.1 * out.requested_kw


def test_a_gpu_sample_delivered_again_does_not_rewind_its_energy_counter():
    """At-least-once delivery: the 30-s sample comes again after the 60-s one. The next mean spans
    60 -> 90 s (the counter of the resent sample had been taken as the latest: 2x the draw)."""
    sim, ctl = fleet()
    row = sim.step().gpu.slice(0, 1)
    t0, e0 = row.column("ts")[0].as_py(), 1234567.891

    def sample(t_s: float) -> pa.RecordBatch:
        d = row.to_pydict()
        d["ts"], d["energy_j"], d["power_w"] = [t0 + timedelta(seconds=t_s)], [e0 + 500.125 * t_s], [500.0]
        return pa.RecordBatch.from_pydict(d, schema=row.schema)
    for t in (0, 30, 60, 30, 90):
        ctl.gpus.update(sample(t))
    assert ctl.gpus.mean_w[0] == pytest.approx(500.125)
    ctl.gpus.update(pa.concat_batches([sample(150), sample(120)]))  # (two in one batch, the newer first)
    ctl.gpus.update(sample(180))
    assert ctl.gpus.mean_w[0] == pytest.approx(500.125)


def test_a_fleet_read_every_second_is_measured_on_its_instants_even_after_a_node_s_gap():
    """The agent's 1-s scrapes: one node's samples missing for 7 s leave its GPUs 8 s apart, but the
    fleet is read every second, and the caps' change stays on the instants (its PDUs' are)."""
    sim, ctl = fleet()
    ctl.submit(request(400, 10))
    for i in range(480):
        tick = sim.step()
        gpu = tick.gpu
        if 460 <= i < 467:
            gpu = gpu.filter(pc.not_equal(gpu.column("node"), "r01-n05"))
        ctl.observe_gpus(gpu)
        ctl.observe_facility(tick.facility)
        if i % INTERVAL == 0:
            ctl.step(sim.now)
        if i == 467:
            assert ctl.gpus.interval_s == 1.0 and np.all(np.isnan(ctl.gpus.mean_w))


def test_an_excess_is_not_given_back_in_the_hold_s_last_minute():
    """A meter read every 30 s: a give-back that overshoots shows a scrape later, and its correction
    after the last minute of the hold is judged (such minutes had missed by 2-10% on every seed).
    Earlier in the hold the same excess is given back."""
    sim = FleetSimulator(FleetConfig(racks=2, seed=4, fault_interval_s=0, gpu_reset_interval_s=0, normal="simple",
                                     sample_interval_s=30), start=EVAL_EPOCH)
    ctl = Controller(sim.cfg.site, CURVE, SimulatorActuator(sim), PowerConfig(default_class=3))
    out = ctl.submit(request(600, 15, duration_s=600))
    for _ in range(900 // 30):  # (to 300 s into the hold)
        tick = sim.step()
        ctl.observe_gpus(tick.gpu)
        ctl.observe_facility(tick.facility)
        ctl.step(sim.now)
    req, before = out.request, sim.caps.copy()
    ctl._correct(req, out, 2.0 * out.requested_kw, req.end - timedelta(seconds=100))
    assert np.array_equal(sim.caps, before)
    ctl._correct(req, out, 2.0 * out.requested_kw, req.end - timedelta(seconds=200))
    assert np.sum(sim.caps) > np.sum(before)  # (raised: the excess given back)


def test_a_job_read_in_one_phase_every_30_s_is_planned_and_credited_at_its_energy_counters_level():
    """Read every 30 s, a training job whose step is a multiple of the scrape shows one phase in every
    reading: here each uncapped reading catches its communication (330 W) while its energy counter
    holds its draw (490-700 W, the simple normal's jobs). The plan and the credit take the counter's
    level: the readings alone had credited a third of what the caps shed."""
    sim = FleetSimulator(FleetConfig(racks=2, seed=4, fault_interval_s=0, gpu_reset_interval_s=0, normal="simple",
                                     sample_interval_s=30), start=EVAL_EPOCH)
    ctl = Controller(sim.cfg.site, CURVE, SimulatorActuator(sim), PowerConfig(default_class=3))

    def observe() -> None:
        tick = sim.step()
        gpu = tick.gpu
        power, limit, util = (gpu.column(c).to_numpy(zero_copy_only=False) for c in
                              ("power_w", "power_limit_w", "util_gpu"))
        caught = np.where((util >= 0.05) & (limit >= 699.0), 330.0, power)  # (uncapped: its communication)
        at = gpu.schema.get_field_index("power_w")
        ctl.observe_gpus(gpu.set_column(at, gpu.schema.field(at), pa.array(caught, pa.float64())))
        ctl.observe_facility(tick.facility)
        ctl.step(sim.now)
    for _ in range(20):
        observe()
    busy = ctl.gpus.util >= 0.05
    assert busy.sum() > 20
    assert ctl.learner.demand()[busy] == pytest.approx(ctl.gpus.mean_w[busy], rel=0.02)  # (its counter's, not 330 W)
    ctl.submit(request(sim.t + 30, 40, duration_s=900, ramp_s=60))
    for _ in range(10):
        observe()
    capped = ~np.isnan(ctl.cap)
    assert capped.sum() > 0
    credited = -float(np.sum(ctl._capped_now_w()))
    true = float(np.sum(np.maximum(sim.power_uncapped - sim.last_power, 0.0)))
    assert credited == pytest.approx(true, rel=0.1), (credited, true)


def test_a_load_that_rises_under_its_cap_is_learned_afresh_and_its_class_kept():
    """A memory-bound job (s 0.2) drawing 470 W is the cheapest to cap: learned under a first
    request, it is capped deep in the second; then its load steps up to the limit under the cap.
    Planned on 470 W, that cap would take more of its work at 700 W than class 2 allows (25%).
    Held at its cap, it moves more memory than its uncapped reference did, which a cap alone
    never makes a job do: it is uncapped, learned afresh, and capped again on what it draws."""
    sim, ctl = fleet(default_class=2)
    sim.group_busy[:], sim.group_until[:] = True, 1e9  # every job runs throughout
    sim.group_intensity[:], sim.group_sens[:] = 1.0, 0.9
    sim.group_intensity[0], sim.group_sens[0] = 0.5, 0.2
    job = np.flatnonzero(sim.gpu_job == 0)
    ctl.submit(request(60, 8, duration_s=300))
    ctl.submit(request(420, 15, duration_s=600))
    for i in range(1020):
        if i == 420:
            start = sim.work_done[job].copy(), sim.work_uncapped[job].copy()
        if i == 700:
            assert np.sum(sim.caps[job] < 300) >= 8  # the cheapest: capped deep on its 470 W
            sim.group_intensity[0] = 1.0           # its load steps up under the cap
        advance(sim, ctl, i)
    lost = 1.0 - (sim.work_done[job] - start[0]) / (sim.work_uncapped[job] - start[1])
    assert lost.max() <= 0.25, lost.max()


@pytest.mark.parametrize("every_s", [1, 30])
@pytest.mark.parametrize("reasons", [True, False])
def test_a_part_that_settles_15_w_under_its_cap_is_held_by_its_clock_reasons(reasons, every_s):
    """A part whose power controller holds it 15 W under its cap (reason 0x4 set): where the
    source sends clock reasons the cap holds it, and what it sheds counts; where it sends none,
    only a draw within NOT_BINDING_W of the cap is held, and its shed is not credited. Read every
    30 s, the same rule judges the ends of each scrape (its energy counter's mean is the cap's)."""
    sim = FleetSimulator(FleetConfig(racks=2, seed=4, fault_interval_s=0, gpu_reset_interval_s=0, normal="simple",
                                     sample_interval_s=every_s), start=EVAL_EPOCH)
    ctl = Controller(sim.cfg.site, CURVE, SimulatorActuator(sim), PowerConfig(default_class=3))
    ctl.submit(request(600, 10, duration_s=1200))
    for i in range(1200 // every_s):
        tick = sim.step()
        gpu = tick.gpu
        power, reasons_col = gpu.column("power_w"), gpu.column("clock_event_reasons")
        capped = pc.not_equal(pc.bit_wise_and(pc.fill_null(reasons_col, 0), 4), 0)
        gpu = gpu.set_column(gpu.schema.get_field_index("power_w"), gpu.schema.field("power_w"),
                             pc.if_else(capped, pc.subtract(power, 15.0), power))
        if not reasons:
            i_r = gpu.schema.get_field_index("clock_event_reasons")
            gpu = gpu.set_column(i_r, gpu.schema.field(i_r), pa.nulls(gpu.num_rows, reasons_col.type))
        ctl.observe_gpus(gpu)
        ctl.observe_facility(tick.facility)
        if every_s > 1 or i % INTERVAL == 0:
            ctl.step(sim.now)
    at_cap = ctl.gpus.ids.slots(gpu.column("gpu_uuid"))[capped.to_numpy(zero_copy_only=False)]  # (0x4 set)
    assert at_cap.size > 0
    assert ctl.gpus.means() == (every_s == 30)
    if every_s == 1:
        assert np.all(ctl._held(at_cap) == reasons)
    else:
        assert np.all((ctl._shed_over_w(at_cap) > 0) == reasons)
    assert (ctl._capped_now_w().sum() < 0) == reasons
