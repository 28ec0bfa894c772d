"""Event time at the engine (detect/watermark.py): silence is judged by the data's clock
per partition, not by arrival, with the lateness bound `detect.lateness_s`; rows behind it
are late (counted, not detected on). The engine is fed as Kafka feeds a detect process:
keyed messages, a partition at a time."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pyarrow.compute as pc

from pipeline.bus import Message, Topic, keys
from pipeline.detect.engine import Engine
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Fleet:
    """Simulator ticks as the keyed messages of each topic, and an engine."""

    def __init__(self, seed: int = 5, one_stream: bool = False) -> None:
        self.cfg = make_config(fleet={"racks": 4, "nodes_per_rack": 4, "fault_interval_s": 0,
                                      "gpu_reset_interval_s": 0, "seed": seed})
        self.sim = FleetSimulator(self.cfg.fleet, start=START)
        self.engine = Engine(self.cfg, one_stream=one_stream)  # as a detect process over Kafka, by default
        self.alerts = []

    def tick(self, drop_node: str | None = None, drop_rack: str | None = None) -> dict[Topic, list[Message]]:
        t = self.sim.step()
        gpu = t.gpu if drop_node is None else t.gpu.filter(pc.not_equal(t.gpu.column("node"), drop_node))
        if drop_rack is not None:
            gpu = gpu.filter(pc.not_equal(gpu.column("rack"), drop_rack))
            t = replace(t, facility=t.facility.filter(pc.not_equal(t.facility.column("rack"), drop_rack)))
        return {topic: keys.messages(topic, b, keyed=True)
                for topic, b in ((Topic.GPU, gpu), (Topic.FACILITY, t.facility), (Topic.EVENTS, t.events))
                if b is not None}

    def feed(self, messages: list[Message]) -> None:
        for m in messages:
            self.alerts += [a for _, a in self.engine.process(m).alerts if a.ends_at is None]

    def run(self, seconds: int, **kw) -> None:
        for _ in range(seconds):
            for msgs in self.tick(**kw).values():
                self.feed(msgs)

    def fired(self, name: str) -> list:
        return [a for a in self.alerts if a.alertname == name]


def partition(m: Message, cfg) -> int:
    return keys.partition_for(m.key, cfg.kafka.partitions)


def test_a_node_that_stops_is_not_reporting_over_partitions_read_far_apart():
    """Over Kafka a process reads its partitions at different paces: one partition's data
    60 s ahead of another's is no silence (each partition has its own clock), while the
    node that really stopped is alerted once, by its own partition's clock."""
    f = Fleet()
    f.run(120)
    behind: list[Message] = []
    slow = {partition(m, f.cfg) for m in f.tick()[Topic.GPU] if m.key == "r02"}
    for _ in range(60):  # r02's partition is read 60 s late; r03-n02 stops
        for msgs in f.tick(drop_node="r03-n02").values():
            f.feed([m for m in msgs if partition(m, f.cfg) not in slow])
            behind += [m for m in msgs if partition(m, f.cfg) in slow]
    f.feed(behind)
    assert [a.labels["node"] for a in f.fired("NodeNotReporting")] == ["r03-n02"]
    assert f.engine.stats.late_samples == 0
    [alert] = f.fired("NodeNotReporting")
    k, lateness = f.cfg.detect.missing_after_intervals, f.cfg.detect.lateness_s
    assert alert.evidence["silent_s"] > 2 * k + lateness  # judged past the lateness bound, by event time


def _fell_off_with_its_xid_after(seconds: int) -> Fleet:
    f = Fleet(seed=8)
    f.run(120)
    f.sim.inject("gpu_fell_off_bus", gpu=9, duration_s=600)
    first = f.tick()
    f.feed(first[Topic.GPU] + first[Topic.FACILITY])
    for _ in range(seconds):  # the missing scrapes arrive first ...
        later = f.tick()
        f.feed(later[Topic.GPU] + later[Topic.FACILITY] + later.get(Topic.EVENTS, []))
    f.feed(first[Topic.EVENTS])  # ... then the XID 79 that explains them
    f.run(30)
    return f


def test_an_xid_79_arriving_after_the_scrapes_it_explains_within_the_lateness_bound_is_one_alert():
    f = _fell_off_with_its_xid_after(6)  # 6 s late: within missing_after_intervals (3 s) + lateness_s (5 s)
    assert [a.alertname for a in f.alerts] == ["GpuFellOffBus"]


def test_an_xid_later_than_the_bound_finds_the_gpu_already_missing():
    """The bound is a documented trade: data later than it is judged without."""
    f = _fell_off_with_its_xid_after(20)
    assert sorted(a.alertname for a in f.alerts) == ["GpuFellOffBus", "GpuNotReporting"]


def test_rows_behind_their_series_newest_are_late_counted_and_not_detected_on():
    f = Fleet()
    f.run(120)
    old = f.tick()[Topic.GPU]
    f.run(30)
    before = f.engine.stats.gpu_samples
    f.feed(old)  # 30 s behind their partitions' newest
    assert f.engine.stats.late_samples == sum(m.value.num_rows for m in old)
    assert f.engine.stats.gpu_samples == before and f.alerts == []
    f.run(30)
    assert f.alerts == []  # nothing moved back in time


def test_one_process_judges_silence_by_the_same_partitions_as_kafka():
    cfg = make_config(fleet={"racks": 4})
    engine = Engine(cfg)
    batch = FleetSimulator(cfg.fleet, start=START).step().gpu
    engine.process(Message(Topic.GPU, batch))
    inv = engine.inventory
    racks = [inv.rack_names[r][1] for r in range(inv.rack_count)]
    assert list(inv.rack_partition) == [keys.partition_for(r, cfg.kafka.partitions) for r in racks]
    assert sorted(racks) == sorted(set(batch.column("rack").to_pylist()))


def test_a_rack_that_goes_dark_is_not_reporting_in_one_process():
    """One process reads one ordered stream: a rack whose nodes and CDU all go silent (its
    partition's only rack here) is judged by the stream's time. Over Kafka such a partition
    has no clock of its own (the documented limit)."""
    for one_stream, expect in ((True, {f"r03-n0{i}" for i in range(1, 5)}), (False, set())):
        f = Fleet(one_stream=one_stream)
        assert [keys.partition_for(r, f.cfg.kafka.partitions) for r in ("r01", "r02", "r03", "r04")].count(
            keys.partition_for("r03", f.cfg.kafka.partitions)) == 1
        f.run(120)
        f.run(60, drop_rack="r03")
        assert {a.labels["node"] for a in f.fired("NodeNotReporting")} == expect
