"""Detection v1 end to end at the engine: each fault type raises its alert on its target,
normal operation raises none, and one problem is one alert."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bus import Message, Topic
from pipeline.detect.catalog import ALERTS_BY_NAME
from pipeline.detect.engine import Engine
from pipeline.detect.families.counters import Counters
from pipeline.detect.families.drift import Drift
from pipeline.faults import FAULTS_BY_NAME
from pipeline.model import ClockEventReason
from pipeline.power.curve import from_recording
from pipeline.sinks.routing import Router
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config
from tests.feeds import a_and_b_feeds, marked_bad

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Harness:
    """Simulator and engine in lock step, as `fleetwatch eval` runs them."""

    def __init__(self, seed: int = 0, detect: dict | None = None, **fleet) -> None:
        self.cfg = make_config(fleet={"racks": 2, "nodes_per_rack": 4, "fault_interval_s": 0,
                                      "gpu_reset_interval_s": 0, "seed": seed, **fleet}, detect=detect or {})
        self.sim = FleetSimulator(self.cfg.fleet, start=START)
        self.engine = Engine(self.cfg)
        self.changes = []  # (ts, alert) state changes
        self.health = []
        self.events = []  # the engine's own (gpu_replaced, gpu_moved, node_forgotten)

    def run(self, seconds: float, mutate=None) -> None:
        for _ in range(int(seconds / self.cfg.fleet.sample_interval_s)):
            tick = self.sim.step()
            for topic, batch in ((Topic.GPU, tick.gpu), (Topic.FACILITY, tick.facility), (Topic.EVENTS, tick.events)):
                if batch is not None:
                    if mutate is not None:
                        batch = mutate(topic, batch)
                    out = self.engine.process(Message(topic, batch))
                    self.changes += out.alerts
                    self.health += out.health
                    self.events += out.events

    def run_until(self, seconds: float, found, mutate=None) -> None:
        """run() for at most `seconds`, a minute at a time, until found() holds: a detection
        test waits for its alert, not for the rest of a fault that lasts hours."""
        ran = 0.0
        while ran < seconds and not found():
            step = min(60.0, seconds - ran)
            self.run(step, mutate)
            ran += step

    def fired(self, name: str | None = None) -> list:
        return [a for _, a in self.changes if a.ends_at is None and (name is None or a.alertname == name)]


@pytest.fixture(scope="module")
def warm():
    """Baselines need warm-up: each fault test starts from a fleet that ran 3 minutes."""
    def make(seed: int = 0, **fleet) -> Harness:
        h = Harness(seed, **fleet)
        h.run(180)
        assert h.fired() == [], [a.annotations["summary"] for a in h.fired()]
        return h
    return make


GPU_FAULT_RUN_S = {"thermal_drift": 3 * 3600}


@pytest.mark.parametrize("fault", sorted(FAULTS_BY_NAME))
def test_each_fault_raises_its_alert_on_its_target(warm, fault):
    spec = FAULTS_BY_NAME[fault]
    h = warm(seed=11)
    target = {"rack": {"rack": 1}, "node": {"node": 5}, "gpu": {"gpu": 5 * 8 + 3}}[spec.scope]
    params = {"rate_c_per_h": 6.0} if fault == "thermal_drift" else None
    f = h.sim.inject(fault, duration_s=GPU_FAULT_RUN_S.get(fault, 600), params=params, **target)
    h.run_until(GPU_FAULT_RUN_S.get(fault, spec.score_window_s),
                lambda: any(a.alertname in spec.alertnames for a in h.fired()))
    fired = [a for a in h.fired() if a.alertname in spec.alertnames]
    assert fired, f"{fault} not detected; alerts: {[a.annotations['summary'] for a in h.fired()]}"
    a = fired[0]
    assert a.labels["rack"] == h.sim.rack_names[f.rack]
    if spec.scope in ("node", "gpu"):
        assert a.labels["node"] == h.sim.node_names[f.node]
    if spec.scope == "gpu":
        assert a.labels["gpu"] == str(h.sim.gpu_index[f.gpu])
    assert set(a.labels) >= {"alertname", "severity", "site", "rack"}
    assert a.annotations["runbook_url"].endswith(f"{a.alertname}.md")
    assert a.annotations["summary"] and a.evidence
    # Nothing else in the fleet alerted by then.
    others = [x for x in h.fired() if x.labels.get("rack") != a.labels["rack"]]
    assert others == [], [x.annotations["summary"] for x in others]


def test_hard_faults_are_alerted_on_the_first_sample():
    h = Harness(seed=3)
    h.run(120)
    h.sim.inject("gpu_fell_off_bus", gpu=10, duration_s=300)
    h.sim.inject("ecc_uncorrectable", gpu=20, duration_s=300)
    h.sim.inject("coolant_leak", rack=1, duration_s=300)
    h.run(1)
    assert {a.alertname for a in h.fired()} == {"GpuFellOffBus", "GpuUncorrectableEcc", "CoolantLeak"}


def test_normal_operation_stays_quiet_for_hours():
    """Jobs starting and stopping, power-cap throttling at full load and GPU resets: no alert."""
    h = Harness(seed=21, gpu_reset_interval_s=120)
    h.run(3 * 3600)
    assert h.sim.next_fault_id > 50  # dozens of GPU resets happened
    assert h.fired() == [], [a.annotations["summary"] for a in h.fired()]
    assert h.engine.health.counts(len(h.engine.node_names)) == {"healthy": 8, "suspect": 0, "failing": 0}


def test_one_alert_per_problem_and_resolution_with_hysteresis():
    h = Harness(seed=5)
    h.run(180)
    h.sim.inject("coolant_flow_loss", rack=0, duration_s=300, params={"flow_factor": 0.15})
    h.sim.group_busy[:] = True  # hot rack: the GPUs' temperatures climb with the flow loss
    h.sim.group_intensity[:] = 1.0
    h.run(300)
    assert [a.alertname for a in h.fired()] == ["CoolantFlowLoss"], [a.annotations["summary"] for a in h.fired()]
    h.run(300)
    resolved = [a for _, a in h.changes if a.ends_at is not None]
    assert [a.alertname for a in resolved] == ["CoolantFlowLoss"]
    assert resolved[0].ends_at > resolved[0].starts_at
    assert len(h.fired()) == 1  # it did not flap


@pytest.mark.parametrize("twice", ["one scrape twice", "two scrapes in one message"])
def test_a_gpu_twice_in_one_batch_is_judged_once_a_scrape(twice):
    """A producer's retry appended to its batch, or an agent's backlog of two scrapes in one message:
    a GPU's second row had made one alert fire twice, or its clears pop it twice (KeyError: the detect
    role died and its batch was lost). The same alerts as each scrape once."""
    def doubled(topic, batch):
        if topic != Topic.GPU:
            return batch
        if twice == "one scrape twice":
            return pa.concat_batches([batch, batch])
        later = batch.set_column(0, batch.schema.field("ts"),
                                 pa.compute.add(batch.column("ts"), pa.scalar(500_000_000, pa.duration("ns"))))
        return pa.concat_batches([later, batch])  # (out of order too: the later scrape first)
    alerts = {}
    for mutate in (None, doubled):
        h = Harness(seed=3)
        h.run(120, mutate)
        h.sim.inject("ecc_uncorrectable", gpu=20, duration_s=60)
        h.run(150, mutate)
        alerts[mutate] = [(a.alertname, a.labels["gpu"], a.ends_at is None) for _, a in h.changes]
    assert alerts[doubled] == alerts[None] and ("GpuUncorrectableEcc", "4", True) in alerts[None]


def test_a_node_whose_clock_is_off_makes_no_node_silent_and_a_silent_one_is_still_found():
    """A node whose clock runs 120 s ahead (NTP broken, inside intake.max_ahead_s) had made every other
    node NodeNotReporting (the clock is the newest sample), and one whose clock was stepped back 30 s was
    itself, while its rows were late. A node that does stop is still found, beside them."""
    start = START.timestamp()
    skew = {"r01-n02": 120.0, "r02-n01": -30.0}

    def clocks_off(topic, batch):
        if topic != Topic.GPU:
            return batch
        ts = batch.column("ts").cast(pa.int64()).to_numpy() / 1e9
        node = np.asarray(batch.column("node").to_pylist())
        shifted = ts + np.where(ts - start >= 60, [skew.get(n, 0.0) for n in node], 0.0)
        batch = batch.set_column(0, batch.schema.field("ts"), pa.array((shifted * 1e9).astype(np.int64)).cast(
            batch.schema.field("ts").type))
        return batch.filter(pa.array(~((node == "r01-n04") & (ts - start >= 200))))  # this one stops
    h = Harness()
    h.run(400, clocks_off)
    assert [a.labels["node"] for a in h.fired()] == ["r01-n04"] and h.fired()[0].alertname == "NodeNotReporting"


def test_a_node_silent_for_good_is_forgotten_and_one_that_returns_starts_afresh():
    """A node decommissioned or scaled away had been NodeNotReporting (critical) for ever. Silent for
    detect.forget_after_s, it is forgotten: its alert resolves saying why, a node_forgotten event, its
    health back; when it reports again it is a node like any other, found again when it stops."""
    start = START.timestamp()

    def away(topic, batch):
        ts = batch.column("ts")[0].value / 1e9 - start
        if topic != Topic.GPU or not (200 <= ts < 1200 or ts >= 1500):
            return batch
        return batch.filter(pc.not_equal(batch.column("node"), "r01-n04"))
    h = Harness(detect={"forget_after_s": 600})
    h.run(400, away)
    assert [(a.alertname, a.labels["node"]) for a in h.fired()] == [("NodeNotReporting", "r01-n04")]
    h.run(600, away)
    resolved = [a for _, a in h.changes if a.ends_at is not None]
    assert [(a.alertname, a.labels["node"]) for a in resolved] == [("NodeNotReporting", "r01-n04")]
    assert "forgotten" in resolved[0].annotations["resolution"]
    assert [(e["kind"], e["node"], e["gpu"]) for e in h.events] == [("node_forgotten", "r01-n04", None)]
    assert h.health[-1]["node"] == "r01-n04" and h.health[-1]["state"] == "healthy"
    assert h.engine.health.counts(8)["failing"] == 0
    h.run(400, away)  # back at 1,200 s for 300 s: no alert; then silent again at 1,500 s
    assert len(h.fired()) == 1 and len(h.events) == 1
    h.run(200, away)
    assert [(a.alertname, a.labels["node"]) for a in h.fired()] == [("NodeNotReporting", "r01-n04")] * 2


@pytest.mark.parametrize("says", [True, False])
def test_a_collector_that_says_it_restarts_slower_or_stops_is_no_outage(says):
    """An agent restarted to read every 30 s instead of 1 s (a config change, an upgrade) had been a false
    NodeNotReporting (critical: its node drained): the interval learned from its gaps said 1 s. It says when
    it stops on request (`collector_stopping`: quiet for detect.restart_grace_s) and the interval it starts
    at (`collector_started`). One that stops and never comes back is still found, after the grace; one
    that says nothing is found as before (the parametrization's other half: the same silences alert)."""
    from pipeline.model import EVENT
    start, node = START.timestamp(), "r01-n04"

    def said(kind, code, at_s):
        return Message(Topic.EVENTS, pa.RecordBatch.from_pylist([{
            "ts": datetime.fromtimestamp(start + at_s, timezone.utc), "site": "site-a", "rack": "r01", "node": node,
            "gpu": None, "gpu_uuid": None, "kind": kind, "code": code, "text": kind}], schema=EVENT))

    def agent(topic, batch):  # 1 s until 200 s; restarted (5 s down) to read every 30 s; stopped for good at 800 s
        if topic != Topic.GPU:
            return batch
        t = batch.column("ts")[0].value / 1e9 - start
        if t < 200 or (205 <= t < 800 and round(t - 205) % 30 == 0):
            return batch
        return batch.filter(pc.not_equal(batch.column("node"), node))
    h = Harness()
    h.run(200, agent)
    if says:
        h.engine.process(said("collector_stopping", None, 199.5))
        h.engine.process(said("collector_started", 30_000, 204.5))
    h.run(595, agent)
    assert [a.alertname for a in h.fired()] == ([] if says else ["NodeNotReporting"])
    if says:
        h.engine.process(said("collector_stopping", None, 795.5))
    h.run(300, agent)  # stopped at 795 s: found after the grace (120 s), not at once, nor never
    assert [(a.alertname, a.labels["node"]) for a in h.fired()][-1:] == [("NodeNotReporting", node)]


def test_a_node_moved_to_another_rack_is_alerted_where_it_is():
    """A node moved in the hall (or its rack label corrected) had kept its first rack for good: its alerts
    named the old rack (routed to that rack's team, suppressed by that rack's coolant) and its peers were
    the old rack's nodes. A `node_moved` event, and it is alerted where it is."""
    start = START.timestamp()

    def moved(topic, batch):
        if topic != Topic.GPU or batch.column("ts")[0].value / 1e9 - start < 120:
            return batch
        i = batch.schema.get_field_index("rack")
        node = np.asarray(batch.column("node").to_pylist())
        rack = np.where(node == "r01-n04", "r02", np.asarray(batch.column(i).to_pylist()))
        return batch.set_column(i, batch.schema.field(i), pa.array(rack.tolist(), pa.string()))
    h = Harness(seed=3)
    was = h.sim.rack_names[0]
    h.run(180, moved)
    assert [(e["kind"], e["node"], e["rack"]) for e in h.events] == [("node_moved", "r01-n04", "r02")]
    assert f"rack {was} -> rack r02" in h.events[0]["text"]
    h.sim.inject("ecc_uncorrectable", gpu=8 * 3 + 2, duration_s=60)  # GPU 2 of r01-n04
    h.run(30, moved)
    [ecc] = h.fired()
    assert (ecc.alertname, ecc.labels["rack"], ecc.labels["node"]) == ("GpuUncorrectableEcc", "r02", "r01-n04")


def _counter(column: str, values):
    """A mutate hook: GPU 1 of r01-n01's `column` reads values(seconds into the run)."""
    start = START.timestamp()

    def mutate(topic, batch):
        if topic != Topic.GPU:
            return batch
        i = batch.schema.get_field_index(column)
        col = batch.column(i).to_numpy(zero_copy_only=False).copy()
        col[np.asarray(batch.column("gpu_uuid").to_pylist()) == h_uuid[0]] = values(batch.column("ts")[0].value / 1e9
                                                                                    - start)
        return batch.set_column(i, batch.schema.field(i), pa.array(col, batch.schema.field(i).type))
    h_uuid = []
    return mutate, h_uuid


@pytest.mark.parametrize("column", ["ecc_dbe_volatile_total", "remapped_rows_uncorrectable"])
def test_an_uncorrectable_counter_that_rises_alerts_and_one_bad_reading_does_not(column):
    """dcgm-exporter's default counters carry no DBE counter: the rows remapped for uncorrectable errors are
    the one uncorrectable-memory counter there, and had been archived, never judged. And a counter read 0
    for one scrape (an exporter's blank) and back at 1 had been a new uncorrectable error (critical, a GPU
    reset): 1 -> 0 -> 1 is none; 1 -> 2 is one."""
    mutate, uuid = _counter(column, lambda s: 1 if s < 120 or s >= 121 and s < 240 else 0 if s < 121 else 2)
    h = Harness(seed=3)
    uuid.append(h.sim.gpu_uuids[1])
    h.run(230, mutate)
    assert h.fired() == []  # 1 from the start (before Fleetwatch), 0 at 120 s, 1 again at 121 s
    h.run(20, mutate)
    [ecc] = h.fired()
    assert (ecc.alertname, ecc.labels["node"], ecc.labels["gpu"]) == ("GpuUncorrectableEcc", "r01-n01", "1")
    assert ("rows remapped +1" if column.startswith("remapped") else "DBE counter +1") in ecc.annotations["summary"]


def _relabel(after_s: float, change):
    """A mutate hook: from `after_s` into the run, each GPU sample's and event's (node, gpu_uuid) as
    `change(node, uuid, gpu)` returns them."""
    start = START.timestamp()

    def mutate(topic, batch):
        if topic not in (Topic.GPU, Topic.EVENTS) or batch.column("ts")[0].value / 1e9 - start < after_s:
            return batch
        rows = zip(*(batch.column(c).to_pylist() for c in ("node", "gpu_uuid", "gpu")))
        node, uuid = zip(*(change(*row) for row in rows))
        for name, values in (("node", node), ("gpu_uuid", uuid)):
            i = batch.schema.get_field_index(name)
            batch = batch.set_column(i, batch.schema.field(i), pa.array(values, pa.string()))
        return batch
    return mutate


def test_a_gpu_moved_to_another_node_is_alerted_where_it_is_and_a_renamed_node_is_not_silent():
    """The swap test of a fault: GPU 3 of r01-n01 and of r01-n02 trade places. A fault of the GPU now in
    r01-n02 had been alerted on r01-n01, where it was (its node fixed when its UUID was first seen): the
    remediation would drain the wrong node. And a node renamed had been NodeNotReporting for ever under
    its old name."""
    h = Harness(seed=3)
    first, second = h.sim.gpu_uuids[3], h.sim.gpu_uuids[11]  # GPU 3 of r01-n01 and of r01-n02

    def swap_and_rename(node, uuid, gpu):
        uuid = {first: second, second: first}.get(uuid, uuid)
        return ("r02-n04-new" if node == "r02-n04" else node), uuid
    mutate = _relabel(120, swap_and_rename)
    h.run(180, mutate)
    h.sim.inject("ecc_uncorrectable", gpu=11, duration_s=60)  # GPU 3 of r01-n02, where r01-n01's GPU 3 is now
    h.run(30, mutate)
    [ecc] = h.fired()
    assert (ecc.alertname, ecc.labels["node"], ecc.labels["gpu"]) == ("GpuUncorrectableEcc", "r01-n02", "3")
    assert ecc.labels["UUID"] == first
    h.run(200, mutate)
    assert not [a for a in h.fired() if a.alertname.endswith("NotReporting")]


def test_one_garbled_limit_reading_makes_no_later_limit_a_cap():
    """A GPU's default limit is the highest it enforced: one garbled reading (5,000 W, one scrape) had
    become it for good, and every later busy scrape under the real 700 W limit read as a cap that saves
    nothing (PowerCapNotBinding for ever). A limit counts once read twice in a row."""
    start = START.timestamp()

    def garbled(topic, batch):
        if topic != Topic.GPU or batch.column("ts")[0].value / 1e9 - start != 60:
            return batch
        i = batch.schema.get_field_index("power_limit_w")
        limit = batch.column(i).to_pylist()
        limit = [5000.0] * len(limit)  # (every GPU: some are idle)
        return batch.set_column(i, batch.schema.field(i), pa.array(limit, pa.float64()))
    h = Harness(seed=3)
    h.sim.group_busy[:] = True
    h.sim.group_intensity[:] = 0.5  # busy, drawing well under the limit
    h.run(300, garbled)
    assert not h.fired("PowerCapNotBinding")


@pytest.mark.parametrize("labelled", [True, False])
def test_a_node_of_another_gpu_model_is_no_peer_of_the_rack_s(labelled):
    """An air-cooled L4 node in a rack of liquid-cooled H100s runs 30 C warmer at its own spec: it had been
    NodeThermalAnomaly (critical, drain) against the H100s. A node's peers are its rack's nodes of its GPU
    model (the samples' `model`); without the model sent, the rack's nodes are peers as before."""
    def l4_node(topic, batch):
        if topic != Topic.GPU:
            return batch
        l4 = np.asarray(batch.column("node").to_pylist()) == "r01-n04"
        for name, change in (("gpu_temp_c", lambda v: np.where(l4, v + 30.0, v)),
                             ("slowdown_temp_c", lambda v: np.where(l4, 98.0, v))):
            i = batch.schema.get_field_index(name)
            values = batch.column(i).to_numpy(zero_copy_only=False).astype(np.float64)
            batch = batch.set_column(i, batch.schema.field(i), pa.array(change(values)))
        if labelled:
            i = batch.schema.get_field_index("model")
            batch = batch.set_column(i, batch.schema.field(i), pa.array(
                np.where(l4, "NVIDIA L4", "NVIDIA H100 80GB HBM3").tolist(), pa.string()))
        return batch
    h = Harness(seed=3)
    h.run(300, l4_node)
    assert [a.labels["node"] for a in h.fired("NodeThermalAnomaly")] == ([] if labelled else ["r01-n04"])


def test_node_health_follows_alerts():
    h = Harness(seed=6)
    h.run(120)
    f = h.sim.inject("gpu_fell_off_bus", gpu=9, duration_s=60)
    h.run(200)
    node = h.sim.node_names[f.node]
    states = [(r["previous"], r["state"]) for r in h.health if r["node"] == node]
    assert states == [("healthy", "failing"), ("failing", "healthy")]
    assert "GpuFellOffBus" in [r["reasons"] for r in h.health if r["node"] == node][0]


def test_bad_values_are_counted_skipped_and_never_reach_state():
    h = Harness(seed=8)
    h.run(120)

    def poison(topic, batch):
        if topic != Topic.GPU:
            return batch
        power = batch.column("power_w").to_numpy().copy()
        temp = batch.column("gpu_temp_c").to_numpy().copy()
        power[0], power[1], temp[2] = np.nan, np.inf, -5.0
        i_p, i_t = batch.schema.get_field_index("power_w"), batch.schema.get_field_index("gpu_temp_c")
        batch = batch.set_column(i_p, "power_w", pa.array(power))
        return batch.set_column(i_t, "gpu_temp_c", pa.array(temp))

    h.run(60, mutate=poison)
    assert h.engine.stats.invalid_values == {"power_w": 120, "gpu_temp_c": 60}
    n_gpus = h.engine.inventory.gpu_count
    assert np.isfinite(h.engine.family(Drift).drift.arrays.mean[:n_gpus]).all()
    assert np.isfinite(h.engine.family(Counters).power_flat.arrays.last_value[:n_gpus]).all()
    assert h.fired() == []
    assert h.engine.stats.gpu_samples == 180 * 64  # the other rows of those batches were processed


def test_an_integer_reading_past_what_a_float_holds_exactly_is_judged_not_an_error():
    """Found by the Kafka property test once intake let a row with one bad reading go on: an
    int64 counter of -9223372036854775807 stopped detect (Arrow's exact cast to float)."""
    h = Harness(seed=8)
    h.run(30)

    def huge(topic, batch):
        if topic != Topic.GPU:
            return batch
        c = "ecc_sbe_volatile_total"
        v = batch.column(c).to_pylist()
        v[0] = -9223372036854775807
        return batch.set_column(batch.schema.get_field_index(c), batch.schema.field(c), pa.array(v, pa.int64()))

    h.run(5, mutate=huge)
    assert h.engine.stats.invalid_values == {"ecc_sbe_volatile_total": 5}
    assert h.engine.stats.gpu_samples == 35 * 64


_READING = st.one_of(st.none(), st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, -0.0, 0, 1, -1,
                                                  2**53 + 1, 2**63 - 1, -2**63, 2**64 - 1]),
                     st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**63, 2**64 - 1))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["double", "float", "int64", "int16", "uint64", "bool"]),
       values=st.lists(_READING, max_size=40))
def test_a_reading_is_its_value_as_a_float_or_nan_and_each_bad_one_is_counted(kind, values):
    """numeric(): what every detector sees of a column, whatever its Arrow type. A null is NaN
    and no error; a NaN, an infinity or a negative reading is NaN and counted; the rest is the
    value as a float (an int64 past 2**53 rounded, never refused)."""
    from pipeline.detect.batch import numeric
    from pipeline.detect.batch import Stats
    typ = {"double": pa.float64(), "float": pa.float32(), "int64": pa.int64(), "int16": pa.int16(),
           "uint64": pa.uint64(), "bool": pa.bool_()}[kind]
    fits = {"double": lambda v: isinstance(v, float),
            "float": lambda v: isinstance(v, float) and not 3e38 <= abs(v) < np.inf,  # (float32's range)
            "int64": lambda v: isinstance(v, int) and v < 2**63, "int16": lambda v: isinstance(v, int) and -2**15 <= v < 2**15,
            "uint64": lambda v: isinstance(v, int) and 0 <= v, "bool": lambda v: isinstance(v, int) and v in (0, 1)}
    column = [v if v is None or fits[kind](v) else None for v in values]
    if kind == "bool":
        column = [None if v is None else bool(v) for v in column]
    stats = Stats()
    got = numeric(pa.RecordBatch.from_pydict({"x": pa.array(column, typ)}), "x", stats)
    as_float = [None if v is None else float(np.float32(v)) if kind == "float" else float(v) for v in column]
    want = [np.nan if v is None or not (0 <= v < np.inf) else v for v in as_float]
    assert got.dtype == np.float64 and np.array_equal(got, np.array(want, np.float64), equal_nan=True)
    bad = sum(v is not None and not (0 <= v < np.inf) for v in as_float)
    assert stats.invalid_values == ({"x": bad} if bad else {})


def test_unsupported_fields_are_null_not_zero_and_do_not_alert():
    h = Harness(seed=9)

    def no_nvlink(topic, batch):
        if topic != Topic.GPU:
            return batch
        i = batch.schema.get_field_index("nvlink_crc_errors_total")
        return batch.set_column(i, "nvlink_crc_errors_total", pa.nulls(batch.num_rows, pa.int64()))

    h.run(200, mutate=no_nvlink)
    assert h.engine.stats.invalid_values == {}
    assert h.fired() == []


def test_gpus_and_nodes_that_join_later_get_their_own_identity():
    """A batch where the new GPUs are not the first rows (a node joining the fleet)."""
    h = Harness(seed=12)
    first = h.sim.step().gpu
    late_node = h.sim.node_names[-1]
    import pyarrow.compute as pc
    h.engine.process(Message(Topic.GPU, first.filter(pc.not_equal(first.column("node"), late_node))))
    h.engine.process(Message(Topic.GPU, h.sim.step().gpu))
    inv = h.engine.inventory
    for slot in range(inv.gpu_count):
        uuid = inv.gpu_ids.keys[slot].as_py()
        g = h.sim.gpu_uuids.index(uuid)
        assert h.engine.node_names[inv.gpu.node[slot]] == h.sim.node_names[h.sim.gpu_node[g]]
        assert inv.gpu.index[slot] == h.sim.gpu_index[g]
    assert h.engine.node_identity(h.engine.node_names.index(late_node)).rack == h.sim.rack_names[-1]


def _h100_batches(path, ts_key):
    """The recorded H100 (sources/recordings/h100) as one GPU of one node, a batch per scrape."""
    import json
    from pipeline.model import GPU_SAMPLE
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    t0 = int(START.timestamp() * 1e9)
    for r in rows:
        yield pa.RecordBatch.from_pylist([{
            "ts": datetime.fromtimestamp(t0 / 1e9 + r[ts_key], timezone.utc), "site": "lab", "rack": "r01",
            "node": "h100-0", "gpu": 0, "gpu_uuid": "GPU-00000000-0000-4000-8000-000000000001",
            "power_w": r["power_mw"] / 1000, "energy_j": r["energy_mj"] / 1000, "gpu_temp_c": r["temp_c"],
            "mem_temp_c": r.get("fv_82"), "sm_clock_mhz": r["sm_mhz"], "mem_clock_mhz": r.get("mem_mhz"),
            "util_gpu": r["util_gpu"] / 100 if "util_gpu" in r else None,
            "util_mem": r["util_mem"] / 100 if "util_mem" in r else None, "mem_used_bytes": r.get("mem_used_b"),
            "clock_event_reasons": r.get("throttle", r.get("reasons")), "pstate": r.get("pstate"),
            "pcie_replay_total": r.get("pcie_replay"), "ecc_sbe_volatile_total": r.get("ecc_sbe_vol"),
            "ecc_dbe_volatile_total": r.get("ecc_dbe_vol"), "remapped_rows_correctable": 0,
            "remapped_rows_uncorrectable": 0, "remapped_rows_pending": False, "remapped_rows_failure": False,
            "nvlink_crc_errors_total": None,  # NOT_SUPPORTED on the recorded VM
        }], schema=GPU_SAMPLE)


@pytest.mark.parametrize("trace, ts_key", [("h100_load_trace.jsonl", "t"), ("h100_powercap_trace.jsonl", "t")])
def test_recorded_h100_raises_no_alert(trace, ts_key):
    """Idle, a 25 s full-load matmul pinned at 700 W (reason 0x4), cooldown, and power caps
    of 500, 350 and 200 W under load: all normal operation."""
    from tests.conftest import H100
    engine = Engine(make_config())
    changes = []
    n = 0
    for batch in _h100_batches(H100 / trace, ts_key):
        changes += engine.process(Message(Topic.GPU, batch)).alerts
        n += 1
    assert n > 400 and engine.stats.gpu_samples == n
    assert engine.stats.invalid_values == {}
    assert changes == [], [a.annotations["summary"] for _, a in changes]


def test_site_power_over_its_cap_alerts_once_and_resolves_when_load_drops():
    """The main meter against detect.site_power_cap_w: set the cap between the idle
    site's draw and the busy site's; load the fleet, then idle it again."""
    probe = Harness(seed=8)
    probe.sim.group_busy[:] = False
    probe.run(60)
    idle_w = float(probe.sim.step().facility.filter(pa.compute.equal(
        probe.sim.step().facility.column("device"), "meter-main")).column("value")[0].as_py())
    cap = idle_w * 1.5
    h = Harness(seed=8)
    h.engine = Engine(make_config(detect={"site_power_cap_w": cap}, fleet=h.cfg.fleet.__dict__))
    h.sim.group_busy[:] = False
    h.run(120)
    assert h.fired() == []  # idle: under the cap
    h.sim.group_busy[:] = True
    h.sim.group_intensity[:] = 1.0
    h.run(60)
    [a] = h.fired()
    assert a.alertname == "SitePowerOverCap" and a.labels["rack"] == "" and a.labels["site"] == "site-a"
    assert a.evidence["power_w"] > cap and a.evidence["cap_w"] == cap
    assert "of the site's" in a.annotations["summary"]
    h.sim.group_busy[:] = False
    h.run(120)
    assert [x.alertname for _, x in h.changes if x.ends_at is not None] == ["SitePowerOverCap"]


def test_a_gpu_that_runs_warmer_per_watt_is_no_drift_when_its_load_rises():
    """A GPU whose cold plate conducts 15% worse than its siblings' (3 sd of the realistic
    normal's spread) runs 1.4 C over them at 300 W and 3.6 C at 700 W: after an hour at the
    light load, a heavy one (an inference service's afternoon) moves its excess by 2 C,
    which a constant baseline would call a drift. The drift's baseline is what the GPU's
    power explains: nothing is raised, and a real drift on a sibling still is."""
    h = Harness(seed=17, racks=1, normal="simple")
    hot = 8 * 1 + 2  # node 1, GPU 2
    h.sim.k_spread[hot] = 1.15
    h.sim.group_busy[:] = True
    h.sim.group_until[:] = 1e9
    excess = []

    def watch(topic, batch):
        if topic == Topic.GPU:
            temp = dict(zip(batch.column("gpu_uuid").to_pylist(), batch.column("gpu_temp_c").to_pylist()))
            node = [temp[u] for u in h.sim.gpu_uuids[8:16]]
            excess.append(temp[h.sim.gpu_uuids[hot]] - float(np.median(node)))
        return batch
    h.sim.group_intensity[:] = 0.3
    h.run(3600, watch)
    light = float(np.mean(excess[-600:]))
    h.sim.group_intensity[:] = 0.85
    h.run(3600, watch)
    assert float(np.mean(excess[-600:])) - light >= 1.5  # what a constant baseline calls a drift
    assert h.fired() == [], [a.annotations["summary"] for a in h.fired()]
    f = h.sim.inject("thermal_drift", gpu=8 * 2 + 5, duration_s=3 * 3600, params={"rate_c_per_h": 4.0})
    h.run_until(2 * 3600, h.fired)
    assert [(a.labels["node"], a.labels["gpu"]) for a in h.fired()] == [(h.sim.node_names[f.node], "5")]


def test_a_rising_excess_alerts_before_the_full_threshold_and_a_steady_one_never():
    """Rate of change: a GPU 7.5 C hotter than its siblings all along is not a runaway;
    one heating at 0.15 C/s is alerted while its excess is still under 10 C."""
    hot = 8 * 2 + 1  # node 2, GPU 1

    def steady_offset(topic, batch):
        if topic != Topic.GPU:
            return batch
        temp = batch.column("gpu_temp_c").to_numpy(zero_copy_only=False).copy()
        temp[batch.column("gpu_uuid").to_numpy(zero_copy_only=False) == h.sim.gpu_uuids[hot]] += 7.5
        return batch.set_column(batch.schema.get_field_index("gpu_temp_c"), "gpu_temp_c", pa.array(temp))
    h = Harness(seed=13)
    h.sim.group_busy[:] = True
    h.sim.group_intensity[:] = 1.0
    h.run(600, steady_offset)
    assert h.fired("GpuThermalRunaway") == []
    t0 = h.sim.now
    f = h.sim.inject("thermal_runaway", gpu=5 * 8 + 3, duration_s=300, params={"rate_c_per_s": 0.15})
    h.run(90, steady_offset)
    [a] = h.fired("GpuThermalRunaway")
    assert a.labels["gpu"] == "3" and a.labels["node"] == h.sim.node_names[f.node]
    assert 6.0 < a.evidence["excess_c"] < 10.0 and a.evidence["rise_c"] > 2.0
    assert (a.starts_at - t0).total_seconds() < 60  # a 10 C excess alone takes 67 s at this rate


def test_a_forced_slowdown_alerts_unless_another_alert_explains_it():
    """HW thermal slowdown (0x40 | 0x8) on a GPU at a normal temperature: GpuHwSlowdown.
    A power brake on the node (0x80 | 0x8) is NodePowerBrake alone."""
    slowed = 8 * 3 + 2

    def force(bits):
        def mutate(topic, batch):
            if topic != Topic.GPU:
                return batch
            reasons = batch.column("clock_event_reasons").to_numpy(zero_copy_only=False).copy()
            reasons[batch.column("gpu_uuid").to_numpy(zero_copy_only=False) == h.sim.gpu_uuids[slowed]] |= bits
            return batch.set_column(batch.schema.get_field_index("clock_event_reasons"), "clock_event_reasons",
                                    pa.array(reasons))
        return mutate
    h = Harness(seed=17)
    h.run(120)
    thermal = int(ClockEventReason.HW_THERMAL_SLOWDOWN | ClockEventReason.HW_SLOWDOWN)  # 0x48
    h.run(10, force(thermal))
    [a] = h.fired()
    assert a.alertname == "GpuHwSlowdown" and a.labels["gpu"] == "2" and a.labels["node"] == h.sim.node_names[3]
    assert a.evidence["what"] == "HW slowdown, HW thermal slowdown" and int(a.evidence["reasons"], 16) & thermal == thermal
    h2 = Harness(seed=17)
    h2.run(120)
    h2.sim.inject("hw_power_brake", node=3, duration_s=120)
    h2.sim.group_busy[:] = True
    h2.run(30)
    assert {x.alertname for x in h2.fired()} == {"NodePowerBrake"}


def _alter_facility(device: str, metric: str, change):
    """A mutate hook: one facility point reads `change(truth)` (a drifting or offset sensor)."""
    def mutate(topic, batch):
        if topic != Topic.FACILITY:
            return batch
        hit = pa.compute.and_(pa.compute.equal(batch.column("device"), device),
                              pa.compute.equal(batch.column("metric"), metric)).to_numpy(zero_copy_only=False)
        value = batch.column("value").to_numpy(zero_copy_only=False).copy()
        value[hit] = change(value[hit])
        return batch.set_column(batch.schema.get_field_index("value"), "value", pa.array(value))
    return mutate


def _scale_facility(device: str, metric: str, factor: float):
    return _alter_facility(device, metric, lambda v: v * factor)


def _shift_facility(device: str, metric: str, add: float):
    return _alter_facility(device, metric, lambda v: v + add)


def test_a_heat_balance_that_does_not_close_alerts_and_a_load_change_does_not():
    """Coolant flow x cp x delta-T against the PDU's power: a flow meter reading 40% high
    makes the loop carry 'more heat than the rack makes'. Jobs starting and stopping (the
    return temperature lags the power by ~20 s) are not an imbalance."""
    h = Harness(seed=19)
    for busy in (True, False, True):
        h.sim.group_busy[:] = busy
        h.sim.group_intensity[:] = 1.0
        h.run(150)
    assert h.fired() == [], [a.annotations["summary"] for a in h.fired()]
    h.run(60, _scale_facility("cdu-r02", "flow_lpm", 1.4))
    [a] = h.fired()
    assert a.alertname == "RackHeatImbalance" and a.labels["rack"] == "r02"
    assert a.evidence["ratio"] == pytest.approx(0.8 * 1.4, rel=0.05)
    assert a.evidence["power_w"] > 30_000 and a.evidence["coolant_w"] > a.evidence["power_w"]
    assert "of the rack's" in a.annotations["summary"]


def _a_and_b_feeds(topic, batch):
    return a_and_b_feeds(batch) if topic == Topic.FACILITY else batch


def test_a_rack_fed_by_two_pdus_is_balanced_by_their_sum():
    """Each PDU reads its share of the rack: each had been taken for the rack's whole power (a false
    RackHeatImbalance that never resolved, and its two rows' clears had ended the detect role)."""
    h = Harness(seed=19)
    for busy in (True, False, True):
        h.sim.group_busy[:] = busy
        h.sim.group_intensity[:] = 1.0
        h.run(150, _a_and_b_feeds)
    assert h.fired() == [], [a.annotations["summary"] for a in h.fired()]
    h.run(60, lambda t, b: _scale_facility("cdu-r02", "flow_lpm", 1.4)(t, _a_and_b_feeds(t, b)))
    [a] = h.fired()
    assert a.alertname == "RackHeatImbalance" and a.labels["rack"] == "r02"
    assert a.evidence["ratio"] == pytest.approx(0.8 * 1.4, rel=0.05) and a.evidence["power_w"] > 30_000


def test_a_rack_whose_feed_fails_over_is_balanced_by_the_feed_that_carries_it():
    """Rack r02's A-feed PDU stops reporting and its B feed carries the whole rack (a failover, or the A
    side's maintenance): A's last reading had stayed in the sum beside the doubled B, 1.5x the rack's
    power, and the coolant read as carrying too little of it (a false RackHeatImbalance)."""
    start = START.timestamp()

    def failover(topic, batch):
        batch = _a_and_b_feeds(topic, batch)
        if topic != Topic.FACILITY or batch.column("ts")[0].value / 1e9 - start < 300:
            return batch
        device, value = batch.column("device"), batch.schema.get_field_index("value")
        batch = batch.filter(pc.invert(pc.starts_with(device, "pdu-r02-a")))
        b = pc.starts_with(batch.column("device"), "pdu-r02-b")
        return batch.set_column(value, batch.schema.field(value), pc.if_else(
            b, pc.multiply(batch.column("value"), 1.0 / 0.55), batch.column("value")))
    h = Harness(seed=19)
    h.sim.group_busy[:] = True
    h.sim.group_intensity[:] = 1.0
    h.run(600, failover)
    assert h.fired() == [], [a.annotations["summary"] for a in h.fired()]


def test_a_feed_its_bms_marks_bad_is_heard_not_failed_over():
    """Rack r02's A-feed PDU still reads its share, but its BMS link is lost: the gateway marks its readings bad.
    Left out as silent, A had read as a failed-over feed: the rack at B's half, the coolant carrying 1.47x it
    (a false RackHeatImbalance). Heard without its value, A's last good reading stays in the sum."""
    start = START.timestamp()

    def a_marked_bad(topic, batch):
        batch = _a_and_b_feeds(topic, batch)
        if topic != Topic.FACILITY or batch.column("ts")[0].value / 1e9 - start < 300:
            return batch
        return marked_bad(batch, pc.starts_with(batch.column("device"), "pdu-r02-a"))
    h = Harness(seed=19)
    h.sim.group_busy[:] = True
    h.sim.group_intensity[:] = 1.0
    h.run(600, a_marked_bad)
    assert h.fired() == [], [a.annotations["summary"] for a in h.fired()]
    assert h.engine.stats.bad_quality > 0


def test_a_lost_bms_link_during_a_leak_resolves_nothing():
    """A leak and an overload firing; then the BMS's link to both points is lost and their readings come marked
    bad. Read as readings without a value they had been judged 'not hit': both alerts resolved, the leak
    going on. Marked bad, they are not judged: the alerts stay until a good reading clears them."""
    from pipeline.model import FACILITY_SAMPLE
    cfg = make_config(fleet={"racks": 1})
    engine, rating, log = Engine(cfg), cfg.fleet.pdu_rating_w, []
    t0 = START.timestamp()
    for i in range(460):
        quality = 1 if i < 120 or i >= 380 else 0
        leak, power = (1.0, 0.99 * rating) if i < 370 else (0.0, 0.3 * rating)  # (fixed at 370: said at 380)
        rows = [("cdu-r01", "cdu", "leak", leak), ("pdu-r01", "rack", "power_w", power)]
        batch = pa.RecordBatch.from_pydict({
            "ts": pa.array([int((t0 + i) * 1e9)] * 2, FACILITY_SAMPLE.field("ts").type), "site": ["site-a"] * 2,
            "rack": ["r01"] * 2, "device": [r[0] for r in rows], "metric": [r[2] for r in rows],
            "value": [r[3] for r in rows], "quality": pa.array([quality] * 2, pa.int8()),
            "device_class": [r[1] for r in rows]}, schema=FACILITY_SAMPLE)
        log += [(i, a.alertname, a.ends_at is None) for _, a in engine.process(Message(Topic.FACILITY, batch)).alerts]
    fired = {name: i for i, name, firing in log if firing}
    resolved = {name: i for i, name, firing in log if not firing}
    assert set(fired) == {"CoolantLeak", "PduOverload"} and max(fired.values()) < 120
    assert set(resolved) == {"CoolantLeak", "PduOverload"} and min(resolved.values()) >= 380


def test_a_rack_s_sensor_offset_is_learned_and_a_loop_that_loses_heat_still_alerts():
    """A BMS's temperature sensors carry calibration offsets and are recalibrated in steps of
    tenths of a degree. The return sensor reads 0.45 C high for an hour, then 0.3 C more (0.75 C:
    26% of a 2.9 C delta-T, past the tolerance and the 0.5 C sensor floor): the rack's offset,
    learned while it was healthy, explains it. A flow meter reading 40% high still alerts."""
    h = Harness(seed=19)

    def busy(seconds, mutate):
        for _ in range(int(seconds // 60)):  # every job kept running at full load (the simulator's churn)
            h.sim.group_busy[:] = True
            h.sim.group_intensity[:] = 1.0
            h.run(60, mutate)
    busy(3600, _shift_facility("cdu-r02", "return_temp_c", 0.45))
    busy(600, _shift_facility("cdu-r02", "return_temp_c", 0.75))
    assert h.fired() == [], [a.annotations["summary"] for a in h.fired()]
    busy(120, lambda t, b: _scale_facility("cdu-r02", "flow_lpm", 1.4)(t, _shift_facility("cdu-r02", "return_temp_c",
                                                                                         0.75)(t, b)))
    [a] = h.fired()
    assert a.alertname == "RackHeatImbalance" and a.labels["rack"] == "r02"
    assert 0.2 < a.evidence["sensor_offset_c"] <= 1.0


def _loaded(h: Harness, seconds: float, intensity: float, mutate=None) -> None:
    """Every job kept running at `intensity` (the simulator's churn undone each minute)."""
    for _ in range(int(seconds // 60)):
        h.sim.group_busy[:] = True
        h.sim.group_intensity[:] = intensity
        h.run(60, mutate)


def test_a_stuck_power_sensor_is_found_at_30_s_scrapes():
    """dcgm-exporter's default: a scrape every 30 s. `detect.stuck_samples` (30 identical readings)
    is 15 minutes there, longer than the stuck sensors of a simulated day lasted (none of 53 found
    on seeds 1-3). A GPU at 60% load whose readings rarely repeat: a run of 2 minutes as unlikely
    as 1e-9 by its own share of repeats is stuck; found within the 10-minute fault."""
    h = Harness(seed=11, sample_interval_s=30, normal="realistic")
    _loaded(h, 2400, 0.6)
    assert h.fired() == []
    stuck = 5 * 8 + 3
    h.sim.inject("stuck_power_sensor", gpu=stuck, duration_s=600)
    _loaded(h, 600, 0.6)
    [a] = h.fired()
    assert a.alertname == "GpuPowerSensorStuck" and a.labels["node"] == h.sim.node_names[5] and a.labels["gpu"] == "3"
    assert a.evidence["samples"] < 30


def test_a_power_sensor_stuck_for_an_hour_stays_alerted():
    """The run's own readings past 2 minutes teach the GPU's share of repeats nothing: had they,
    the share would climb towards 1 and the need past the run (resolved after 39 minutes at
    1-s scrapes). Whatever the share, `detect.stuck_samples` readings are a stuck sensor."""
    h = Harness(seed=11)
    _loaded(h, 600, 0.6)
    h.sim.inject("stuck_power_sensor", gpu=5 * 8 + 3, duration_s=3600)
    _loaded(h, 3540, 0.6)
    [a] = h.fired()
    assert a.alertname == "GpuPowerSensorStuck" and a.evidence["samples"] == 30 + 3 - 1  # stuck_samples, fire_after
    assert [x for _, x in h.changes if x.ends_at is not None] == []


@pytest.mark.parametrize("told", [True, False])
def test_gpus_held_at_their_limit_repeat_their_reading_and_are_not_stuck(told):
    """At full load a GPU's own limit holds it (reason 0x4) and its reading repeats to the watt
    (a real H200 at 700 and 500 W: 10% of 1-s readings, at 350 and 200 W: 50%): read every 30 s,
    the GPU's share of repeats under a lighter load (5 hours of it) would call stuck runs of them.
    Held, it is judged by `detect.stuck_samples` alone; and so is every GPU where the source
    sends no clocks event reasons nor enforced limit to tell (dcgm-exporter's default counters)."""
    from pipeline.detect.families.counters import Counters

    def untold(batch):
        for name in ("clock_event_reasons", "power_limit_w"):
            i = batch.schema.get_field_index(name)
            batch = batch.set_column(i, batch.schema.field(i), pa.nulls(batch.num_rows, batch.schema.field(i).type))
        return batch

    def as_real_h200s(topic, batch):  # the simulator's held readings move a little more: read to 5 W
        if topic != Topic.GPU:
            return batch
        power = batch.column("power_w").to_numpy(zero_copy_only=False)
        batch = batch.set_column(batch.schema.get_field_index("power_w"), "power_w", pa.array(np.round(power / 5) * 5))
        return batch if told else untold(batch)
    h = Harness(seed=11, sample_interval_s=30, normal="realistic")
    for _ in range(5 * 60):  # 600 readings that rarely repeat: the share learned moves slowly
        _loaded(h, 60, 0.6, None if told else lambda topic, b: b if topic != Topic.GPU else untold(b))
    longest = 0
    for _ in range(120):
        _loaded(h, 60, 1.0, as_real_h200s)
        longest = max(longest, int(h.engine.family(Counters).repeats.run[:64].max()))
    assert longest >= 8 and h.fired() == [], [a.annotations["summary"] for a in h.fired()]


def _rack_readings(t: float, power_w: float, energy_j: float | None, flow_lpm: float, delta_t_c: float):
    """One BMS scrape of rack r01: its CDU's supply, return and flow, its PDU's power (an
    instant) and energy counter."""
    from pipeline.model import FACILITY_SAMPLE
    points = [("cdu-r01", "cdu", "supply_temp_c", 30.0), ("cdu-r01", "cdu", "return_temp_c", 30.0 + delta_t_c),
              ("cdu-r01", "cdu", "flow_lpm", flow_lpm), ("pdu-r01", "rack", "power_w", power_w)]
    if energy_j is not None:
        points.append(("pdu-r01", "rack", "energy_j", energy_j))
    n = len(points)
    return pa.RecordBatch.from_pydict({
        "ts": pa.array([int(t * 1e9)] * n, FACILITY_SAMPLE.field("ts").type), "site": ["site-a"] * n,
        "rack": ["r01"] * n, "device": [p[0] for p in points], "metric": [p[2] for p in points],
        "value": [p[3] for p in points], "quality": pa.array([1] * n, pa.int8()),
        "device_class": [p[1] for p in points]}, schema=FACILITY_SAMPLE)


def _swinging_rack(counter: str):
    """A training job swings rack r01 between 40 kW (compute) and 15 kW (communication); a BMS
    that reads it every 30 s catches its PDU at 40 kW each time while the loop carries the heat
    of the 30 kW mean. From scrape 150 its flow meter reads 40% high (a real imbalance). The
    PDU's energy counter: "fine" (0.1 J, starting over at scrape 100: a PDU replaced, and 1 GJ
    ahead from scrape 120: a BMS that re-based it), "none",
    "coarse" (0.1 kWh: 2.5 steps a scrape) or "frozen" (from scrape 60: a BMS resending a
    cached value). (the fired alerts with their scrape, the prediction's delta-T per scrape)"""
    from pipeline.detect.families.heat_balance import HeatBalance
    engine = Engine(make_config())
    family = engine.family(HeatBalance)
    mean_w, flow = 30_000.0, 60.0
    delta_t = 0.8 * mean_w / (flow / 60.0 * 4186.0)  # what the coolant carries of the mean: 5.7 C
    changes, predicted = [], []
    for k in range(200):
        t = 1_767_225_600.0 + 30.0 * k
        energy_j = {"fine": (1_000_000_000.5 if k < 100 else 0.5 - mean_w * 30.0 * 100) + mean_w * 30.0 * k
                    + (1e9 if k >= 120 else 0.0),
                    "none": None, "coarse": round((1e9 + mean_w * 30.0 * k) / 360_000) * 360_000,
                    "frozen": 1_000_000_000.5 + mean_w * 30.0 * min(k, 60)}[counter]
        batch = _rack_readings(t, 40_000.0, energy_j, flow * (1.4 if k >= 150 else 1.0), delta_t)
        changes += [(k, a) for _, a in engine.process(Message(Topic.FACILITY, batch)).alerts]
        predicted.append(float(family.loop.expected_dt[0]))
    return [(k, a) for k, a in changes if a.ends_at is None], predicted, delta_t


def test_pdus_read_every_30_s_are_set_against_the_coolant_by_their_energy_counter():
    """Set against the 40 kW instants, the loop looks 25% short of heat: the 30-s eval had
    raised RackHeatImbalance falsely on seeds 2 and 3. With the PDU's energy counter the mean
    is what the prediction steps with, and only the flow meter alerts. The scrapes whose counter
    started over or jumped step with the instant, and the next ones with the mean again."""
    fired, predicted, delta_t = _swinging_rack("fine")
    [(k, a)] = fired
    assert a.alertname == "RackHeatImbalance" and k >= 150  # the flow meter
    assert a.evidence["power_w"] == pytest.approx(30_000.0) and a.evidence["ratio"] == pytest.approx(1.12, rel=0.02)
    assert predicted[99] == pytest.approx(delta_t, rel=0.01)
    assert predicted[100] == pytest.approx(delta_t + 0.78 * (40 / 30 - 1) * delta_t, rel=0.01)  # the instant, once
    assert predicted[103] == pytest.approx(delta_t, rel=0.02)
    assert predicted[120] == pytest.approx(predicted[100], rel=0.01) and predicted[123] == pytest.approx(delta_t, rel=0.02)


@pytest.mark.parametrize("counter", ["none", "coarse", "frozen"])
def test_a_pdu_without_a_counter_fit_for_it_is_set_against_its_instants(counter):
    """No counter, one too coarse for its interval (0.1 kWh every 30 s: +-20%), or one that
    stands still: the instant, as before (and the instants' aliasing raises the imbalance; the
    rack is still judged, not blinded by a mean of 0)."""
    fired, predicted, _ = _swinging_rack(counter)
    assert fired and fired[0][0] < 150
    assert fired[0][1].evidence["power_w"] == 40_000.0 and fired[0][1].evidence["ratio"] == pytest.approx(0.6, rel=0.02)
    if counter == "frozen":
        assert fired[0][0] > 60  # the counter was fit until it froze


def test_a_rack_hotter_over_its_coolant_than_the_site_explains_its_gpus():
    """Rack against site: a rack whose GPUs all run hot over their coolant (air in the
    loop) is one RackThermalAnomaly. The site tier judges it apart from the rack's own
    detectors (over Kafka, in other processes), so the symptoms those raise meanwhile (GPUs
    over their limit, the heat balance) are not suppressed but inhibited by it at notify:
    an operator gets the one rack alert."""
    h = Harness(seed=23, racks=4)
    h.sim.group_busy[:] = True
    h.sim.group_intensity[:] = 1.0
    h.run(240)
    assert h.fired() == []
    h.sim.inject("rack_cooling_degraded", rack=2, duration_s=900,
                 params={"extra_c": 32.0, "rate_c_per_s": 0.2, "liquid_factor": 0.7})
    h.run(300)
    [a] = h.fired("RackThermalAnomaly")
    assert a.labels["rack"] == "r03" and a.evidence["excess_c"] > 5.0
    symptoms = [s for s in h.fired() if s is not a]
    inhibited = ALERTS_BY_NAME["RackThermalAnomaly"].inhibits
    assert all(s.alertname in inhibited and s.labels["rack"] == "r03" for s in symptoms), \
        [s.annotations["summary"] for s in symptoms]
    router = Router(h.cfg.alerts)  # the default inhibit rules, derived from the catalog
    router.add([x.to_json() for x in h.fired()], now=0.0)
    assert all((router.muted(s.to_json(), 0.0) or "").startswith("inhibited by RackThermalAnomaly") for s in symptoms)
    gpu = h.sim.step().gpu
    hot = gpu.filter(pa.compute.equal(gpu.column("rack"), "r03"))
    assert pa.compute.max(hot.column("gpu_temp_c")).as_py() >= 85  # hot enough for GpuOverTemperature


def test_the_thermal_margin_is_to_each_gpus_own_slowdown_threshold():
    """A GPU whose NVML slowdown threshold is 60 C alerts at 56 C (4 C margin); where the
    threshold is unknown (null), detect.gpu_temp_limit_c (85 C) applies."""
    low = 8 * 1 + 4  # node 1, GPU 4

    def threshold(value):
        def mutate(topic, batch):
            if topic != Topic.GPU:
                return batch
            t = batch.column("slowdown_temp_c").to_numpy(zero_copy_only=False).copy()
            t[batch.column("gpu_uuid").to_numpy(zero_copy_only=False) == h.sim.gpu_uuids[low]] = value
            return batch.set_column(batch.schema.get_field_index("slowdown_temp_c"), "slowdown_temp_c",
                                    pa.array(t, mask=np.isnan(t)))
        return mutate
    h = Harness(seed=29)
    h.sim.group_busy[:] = True
    h.sim.group_intensity[:] = 1.0
    h.run(240, threshold(np.nan))
    temps = h.sim.step().gpu.column("gpu_temp_c").to_numpy()
    assert temps[low] >= 57 and temps.max() < 85, temps  # busy: over 56 C, under 85 C
    assert h.fired() == [] and h.engine.stats.invalid_values == {}  # null is unknown, not invalid
    h.run(30, threshold(60.0))
    [a] = h.fired()
    assert a.alertname == "GpuOverTemperature" and a.labels["node"] == h.sim.node_names[1] and a.labels["gpu"] == "4"
    assert a.evidence["limit_c"] == 56.0 and a.evidence["slowdown_c"] == 60.0
    assert "4 C under its HW slowdown at 60 C" in a.annotations["summary"]


def _asset_tags(topic, batch):
    """A mutate hook: facility device ids that say nothing of what the device is (a real
    BMS's asset tags); only the row's device_class does."""
    if topic != Topic.FACILITY:
        return batch
    device = batch.column("device")
    for prefix, tag in (("pdu-", "asset-7"), ("cdu-", "asset-3"), ("meter-", "asset-9")):
        device = pa.compute.replace_substring(device, prefix, tag)
    i = batch.schema.get_field_index("device")
    return batch.set_column(i, batch.schema.field(i), device)


def test_rack_and_site_power_are_read_from_the_device_class_not_the_device_s_name():
    """The engine once took any `pdu*` device's power for its rack's and any site-level
    power for the site meter's. With asset tags for ids, an overloaded PDU still alerts,
    and the site meter is still the site's power."""
    from pipeline.model import PointKind
    h = Harness(seed=3)
    h.run(180, _asset_tags)
    kinds = h.engine.inventory.point.kind[:len(h.engine.inventory.point_devices)].tolist()
    assert kinds.count(PointKind.PDU_POWER) == 2 and kinds.count(PointKind.SITE_POWER) == 1
    assert all(d.startswith("asset-") for d in h.engine.inventory.point_devices)
    h.sim.inject("pdu_overload", duration_s=600, rack=1, params={"load_ratio": 1.1})
    h.run(FAULTS_BY_NAME["pdu_overload"].score_window_s, _asset_tags)
    [a] = h.fired("PduOverload")
    assert a.labels["rack"] == h.sim.rack_names[1]


def test_gpus_under_a_power_cap_are_not_stragglers_unless_they_draw_well_under_it(warm):
    """Demand response caps some GPUs of a node (power/): at their cap, with the clock the cap
    allows and reason 0x4, they are not stragglers; a capped GPU that draws well under its
    cap at full utilisation still is, and so is the straggler fault on an uncapped GPU."""
    h = warm(seed=5)
    busy = np.flatnonzero(h.sim.group_busy[h.sim.node_group][h.sim.gpu_node])
    node = h.sim.gpu_node[busy[0]]
    mine = np.flatnonzero(h.sim.gpu_node == node)
    h.sim.group_intensity[h.sim.node_group[node]] = 1.0  # full load: every GPU of the node at its limit
    h.sim.set_caps(mine[:4], np.array([300.0, 350.0, 400.0, 500.0]))  # half the node capped, the rest at 700 W
    h.run(120)
    assert h.fired("GpuStraggler") == []
    h.sim.inject("straggler_gpu", gpu=int(mine[-1]), duration_s=120)
    h.run(60)
    assert [a.labels["gpu"] for a in h.fired("GpuStraggler")] == [str(h.sim.gpu_index[mine[-1]])]


def test_a_capped_gpu_drawing_well_under_its_cap_at_full_load_is_a_straggler(warm):
    """Its clock is well under the one its cap allows (the H100 curve's: too few capped peers
    here to judge by)."""
    h = warm(seed=5)
    busy = np.flatnonzero(h.sim.group_busy[h.sim.node_group][h.sim.gpu_node])
    node = h.sim.gpu_node[busy[0]]
    mine = np.flatnonzero(h.sim.gpu_node == node)
    h.sim.group_intensity[h.sim.node_group[node]] = 1.0
    h.sim.set_caps(mine[:4], np.full(4, 650.0))  # half the node a little capped
    victim = int(mine[2])  # a straggler draws 65-80% of what it would: well under its cap
    h.sim.inject("straggler_gpu", gpu=victim, duration_s=120)
    h.run(60)
    assert [a.labels["gpu"] for a in h.fired("GpuStraggler")] == [str(h.sim.gpu_index[victim])]


def _full_load_node(h: Harness) -> np.ndarray:
    """The GPUs of a busy node, its job at full load (every GPU at its limit)."""
    busy = np.flatnonzero(h.sim.group_busy[h.sim.node_group][h.sim.gpu_node])
    node = h.sim.gpu_node[busy[0]]
    h.sim.group_intensity[h.sim.node_group[node]] = 1.0
    return np.flatnonzero(h.sim.gpu_node == node)


@pytest.mark.parametrize("cap_w, factor, held", [(500.0, 0.7, False), (510.0, 0.75, True)])
def test_a_straggler_in_a_node_capped_as_one_is_judged_by_the_clock_the_cap_allows(warm, cap_w, factor, held):
    """Demand response caps a whole node alike: its power no longer tells a straggler (the
    cap compresses every GPU's draw). Healthy GPUs under the same cap settle at the same
    clock; a straggler runs slower, whether it draws under its cap (no reason 0x4) or the
    cap holds it too (the same watts, fewer MHz)."""
    h = warm(seed=5)
    mine = _full_load_node(h)
    h.sim.set_caps(mine, cap_w)
    h.run(60)
    assert h.fired("GpuStraggler") == []
    victim = int(mine[5])
    h.sim.inject("straggler_gpu", gpu=victim, duration_s=120, params={"factor": factor})
    h.run(10)
    [a] = h.fired("GpuStraggler")
    assert a.labels["gpu"] == str(h.sim.gpu_index[victim])
    assert a.evidence["capped"] == 1.0 and a.evidence["sm_mhz"] < 0.85 * a.evidence["peer_sm_mhz"]
    assert abs(a.evidence["power_w"] - cap_w) < 5.0 if held else a.evidence["power_w"] < cap_w - 5.0
    assert a.evidence["peer_sm_mhz"] == pytest.approx(float(from_recording().clock_at(cap_w)), rel=0.02)


def test_a_straggler_held_by_a_cap_deeper_than_its_fault_is_still_one(warm):
    """A straggler is less efficient at any power (uncapped, it runs fewer MHz than the curve
    gives its own draw): held by a cap deeper than its fault, it still runs slower than the
    clock that cap allows its peers, and is found under the cap, not only once it goes."""
    h = warm(seed=5)
    mine = _full_load_node(h)
    h.sim.set_caps(mine, 300.0)
    h.run(30)
    assert h.fired("GpuStraggler") == []
    h.sim.inject("straggler_gpu", gpu=int(mine[1]), duration_s=90, params={"factor": 0.7})
    h.run(15)
    [a] = h.fired("GpuStraggler")
    assert a.labels["gpu"] == str(h.sim.gpu_index[mine[1]])
    assert a.evidence["capped"] == 1.0 and abs(a.evidence["power_w"] - 300.0) < 5.0  # the cap holds it


@pytest.mark.parametrize("draw", range(4))
def test_healthy_gpus_under_any_caps_are_not_stragglers(warm, draw):
    """Property: whatever caps a node's GPUs get (each its own, from the lowest limit up,
    changed every 20 s, some GPUs left at their default), no healthy GPU is a straggler:
    each is judged against the clock its own cap allows."""
    h = warm(seed=5)
    mine = _full_load_node(h)
    rng = np.random.default_rng(draw)
    lo = h.sim.curve.min_limit_w
    for _ in range(6):
        caps = rng.uniform(lo, 700.0, mine.size)
        caps[rng.random(mine.size) < 0.25] = np.nan
        h.sim.set_caps(mine, np.round(caps))
        h.run(20)
    assert h.fired("GpuStraggler") == [], [a.annotations["summary"] for a in h.fired("GpuStraggler")]


def test_a_gpu_its_cap_holds_to_the_watt_is_no_stuck_sensor_and_no_runaway(warm):
    """A GPU held at its cap reads the same watt again and again (to 1 W, as DCGM and the
    realistic normal read it): that is what it draws, not a frozen sensor. Taken for one, it
    was judged at its node's median power, and two GPUs at a 500 W cap among six at 200 W
    looked 12 C too hot for their watts (two false GpuThermalRunaway alerts on a 128-node eval
    with demand response)."""
    h = warm(seed=5)
    mine = _full_load_node(h)
    h.sim.set_caps(mine[:6], 200.0)
    h.sim.set_caps(mine[6:], 500.0)
    pinned = {h.sim.gpu_uuids[g] for g in mine[6:]}

    def to_the_watt(topic, batch):
        if topic != Topic.GPU:
            return batch
        power = batch.column("power_w").to_numpy(zero_copy_only=False).copy()
        held = np.isin(batch.column("gpu_uuid").to_numpy(zero_copy_only=False), list(pinned))
        power[held] = np.where(power[held] > 490.0, 498.0, power[held])  # once settled at the cap
        return batch.set_column(batch.schema.get_field_index("power_w"), "power_w", pa.array(power))
    h.run(180, to_the_watt)
    assert h.fired("GpuThermalRunaway") == [], [a.annotations["summary"] for a in h.fired("GpuThermalRunaway")]


def test_a_node_hotter_than_its_rack_is_found_while_the_rack_swings_in_lockstep():
    """The realistic normal, seed 2: rack r04 runs one training job whose nodes swing together
    every 31 s, never at steady power, when node r04-n03's coolant branch is restricted (45 min
    in). Nodes in step with their rack compare fairly (their temperatures lag alike): the node
    is found (it was missed while only steady nodes were compared), and nothing else is raised."""
    from pipeline.analytics.evaluate import score, simulate
    cfg = make_config(fleet={"seed": 2, "fault_interval_s": 300.0, "normal": "realistic"})
    result = score(simulate(cfg, 2700))
    cooling = result["faults"]["node_cooling_degraded"]
    assert cooling["injected"] == cooling["detected"] == 1, cooling
    assert result["false_alerts"] == 0, result["false_alerts_by_alertname"]


def test_a_straggler_left_uncapped_among_capped_siblings_is_judged_by_the_clock_its_limit_allows(warm):
    """Demand response lifts the cap of a GPU a fault alert names, or leaves a class-0 GPU
    uncapped among capped siblings: with fewer than 4 uncapped peers it has none to be judged
    against, so it is judged like a capped GPU at its own (default) limit."""
    h = warm(seed=5)
    mine = _full_load_node(h)
    h.sim.set_caps(mine[1:], 450.0)
    h.run(30)
    assert h.fired("GpuStraggler") == []  # the healthy one left uncapped runs at its limit's clock
    h.sim.inject("straggler_gpu", gpu=int(mine[0]), duration_s=90, params={"factor": 0.75})
    h.run(15)
    [a] = h.fired("GpuStraggler")
    assert a.labels["gpu"] == str(h.sim.gpu_index[mine[0]]) and a.evidence["capped"] == 0.0
    assert a.evidence["peer_sm_mhz"] == pytest.approx(float(from_recording().clock_at(700.0)), rel=0.03)


def test_a_stuck_power_sensor_under_a_cap_unlike_its_peers_caps_is_no_runaway(warm):
    """Demand response caps a node's GPUs unevenly and moves the caps. A sensor that sticks
    on a GPU at 200 W goes on reading 200 W once its cap rises to 650 W; until
    GpuPowerSensorStuck says so, the GPU is taken to draw like its peers: at their share of
    their own limits times its own (650 W), not at their median watts (200 W, which made its
    real 650 W look 18 C too hot; one at 500 W among peers at 200 W raised a false
    GpuThermalRunaway on a 128-node eval)."""
    h = warm(seed=5)
    mine = _full_load_node(h)
    h.sim.set_caps(mine[:6], 200.0)
    h.sim.set_caps(mine[6:], [650.0, 200.0])
    h.run(60)
    h.sim.inject("stuck_power_sensor", gpu=int(mine[7]), duration_s=300)
    h.run(5)
    h.sim.set_caps(mine[7:], 650.0)
    h.run(120)
    assert h.fired("GpuThermalRunaway") == [], [a.annotations["summary"] for a in h.fired("GpuThermalRunaway")]
    assert [a.labels["gpu"] for a in h.fired("GpuPowerSensorStuck")] == [str(h.sim.gpu_index[mine[7]])]
