"""A rolling upgrade over a real broker: consumers at version N, producers at N-1 and N.

Consumers are upgraded first, then the producers, a node's agent at a time over days
(docs/data.md#schema-changes). Meanwhile the topics carry both versions: here some
nodes' agents still send gpu_sample v2 throughout, others switch to the current version halfway, and
one rack's facility collector still sends facility_sample v1 while the other has
switched halfway, interleaved with current messages from the simulator. Detect,
archive and notify at the current version (`fleetwatch run --kafka`'s daemon, without
a source) take all of it: nothing is dead-lettered, every row is archived once at the
current version (the columns an old producer does not send null, a facility device's
class derived from its id), detection counts every sample, and faults on the old
producers' GPUs and rack raise their alerts, which reach alerts.jsonl.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone

import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.analytics.archive import scan
from pipeline.bus import Message, Topic, keys
from pipeline.bus.kafka import DEAD_LETTER, KafkaBus
from pipeline.model import ARCHIVE_SCHEMAS, FACILITY_SAMPLE_V1, GPU_INFO, GPU_SAMPLE, GPU_SAMPLE_V2, GPU_SETTINGS, GPU_WORKLOAD, \
    schema_version
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config
from tests.services import KafkaBroker
from tests.test_schema_upgrades import downgraded

pytestmark = pytest.mark.kafka

WARM_UP, FAULTY = 180, 40  # ticks (1 s each): baselines first, then the faults
TICKS = WARM_UP + FAULTY
HALF = TICKS // 2
OLD_NODES = {"r01-n01", "r01-n02", "r02-n01"}  # agents still at gpu_sample v2 throughout
SWITCHING = {"r01-n03", "r02-n02"}            # agents upgraded to the current version halfway
OLD_RACK = 1                                  # rack index whose facility collector stays at v1


@pytest.fixture(scope="module")
def broker():
    b = KafkaBroker().start()
    yield b
    b.close()


def old_node(node: str, tick: int) -> bool:
    return node in OLD_NODES or (node in SWITCHING and tick < HALF)


async def produce(cfg, sim: FleetSimulator) -> dict:
    """The producers of a fleet mid-upgrade, through the same bus code the roles use (an old
    producer's KafkaBus encodes its older schema: fw-version says so)."""
    bus = KafkaBus.from_config(cfg.kafka)
    await bus.start()
    old_rack = sim.rack_names[OLD_RACK]
    sent = {"gpu_v2": 0, "gpu_current": 0, "facility_v1": 0, "facility_v2": 0, "gpu_rows": 0, "facility_rows": 0}
    storm = fault = None
    for tick in range(TICKS):
        if tick == WARM_UP:  # faults on what the old producers report: a GPU's counters, a rack's leak sensor
            old_gpu = next(i for i in range(sim.n_gpus) if sim.node_names[sim.gpu_node[i]] in OLD_NODES)
            storm = sim.inject("pcie_replay_storm", gpu=old_gpu, duration_s=FAULTY)
            fault = sim.inject("coolant_leak", rack=OLD_RACK, duration_s=FAULTY)
        t = sim.step()
        for message in keys.messages(Topic.GPU, t.gpu, keyed=True):
            for node in pc.unique(message.value.column("node")).to_pylist():  # an agent sends its own node's
                batch = message.value.filter(pc.equal(message.value.column("node"), node))
                if old_node(node, tick):
                    batch = downgraded(batch, GPU_SAMPLE_V2)
                sent["gpu_v2" if old_node(node, tick) else "gpu_current"] += 1
                sent["gpu_rows"] += batch.num_rows
                await bus.publish(Message(Topic.GPU, batch, key=message.key))
        for message in keys.messages(Topic.FACILITY, t.facility, keyed=True):
            batch = message.value
            old = tick < HALF or message.key == old_rack
            if old:
                batch = downgraded(batch, FACILITY_SAMPLE_V1)
            sent[f"facility_v{'1' if old else '2'}"] += 1
            sent["facility_rows"] += batch.num_rows
            await bus.publish(Message(Topic.FACILITY, batch, key=message.key))
        for topic, batch in ((Topic.EVENTS, t.events), (Topic.LABELS, t.labels)):
            if batch is not None:
                for message in keys.messages(topic, batch, keyed=True):
                    await bus.publish(message)
    await bus.flush()
    await bus.close()
    sent["storm"], sent["leak"] = storm, fault
    return sent


async def versions_on_the_wire(cfg, topic: str) -> dict[str, int]:
    """fw-version headers of every message on a topic, as a raw client reads them."""
    wire = f"{cfg.kafka.topic_prefix}{topic}"
    consumer = AIOKafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = [TopicPartition(wire, p) for p in range(cfg.kafka.partitions)]
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        for tp in parts:
            consumer.seek(tp, 0)
        counts: dict[str, int] = {}
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            for records in (await asyncio.wait_for(consumer.getmany(timeout_ms=1000), 60)).values():
                for rec in records:
                    v = dict(rec.headers)["fw-version"].decode()
                    counts[v] = counts.get(v, 0) + 1
        return counts
    finally:
        await consumer.stop()


async def dead_lettered(cfg) -> int:
    bus = KafkaBus.from_config(cfg.kafka)
    await bus.start()
    try:
        await bus.end([DEAD_LETTER])
        return sum(bus.end_offsets.values())
    finally:
        await bus.close()


def test_current_consumers_take_the_previous_version_from_producers_mid_upgrade(broker, tmp_path, monkeypatch):
    from pipeline.daemon import run_daemon
    from pipeline.roles import detect as detect_module

    cfg = make_config(data_dir=str(tmp_path / "data"),
                      kafka={"bootstrap": broker.bootstrap, "topic_prefix": f"u{uuid.uuid4().hex[:6]}.",
                             "partitions": 3},
                      fleet={"racks": 2, "nodes_per_rack": 4, "fault_interval_s": 0, "gpu_reset_interval_s": 0,
                             "seed": 7})
    (tmp_path / "data").mkdir()
    sim = FleetSimulator(cfg.fleet, start=datetime.now(timezone.utc) - timedelta(minutes=10))
    sent = asyncio.run(produce(cfg, sim))
    assert sent["gpu_v2"] and sent["gpu_current"] and sent["facility_v1"] and sent["facility_v2"]
    # An old producer's messages say their version: fw-version 2 (GPU) and 1 (facility) beside the current.
    assert asyncio.run(versions_on_the_wire(cfg, Topic.GPU)) == {"2": sent["gpu_v2"],
                                                                   str(schema_version(GPU_SAMPLE)): sent["gpu_current"]}
    assert asyncio.run(versions_on_the_wire(cfg, Topic.FACILITY)) == {"1": sent["facility_v1"],
                                                                        "2": sent["facility_v2"]}

    engines = []
    make_detector = detect_module.make_detector

    def keep(c):
        made = make_detector(c)
        engines.append(made[0])
        return made
    monkeypatch.setattr(detect_module, "make_detector", keep)
    # The consumers at the current version; duration 0: they drain what is on the topics, then stop.
    # (The bound only turns a hang into a failure; the run takes seconds.)
    summary = asyncio.run(asyncio.wait_for(run_daemon(cfg, 0.0, roles=frozenset({"detect", "archive", "notify"})),
                                           300))

    assert asyncio.run(dead_lettered(cfg)) == 0  # nothing refused: no decode error, no rejected row
    (engine,) = engines
    assert engine.stats.gpu_samples == sent["gpu_rows"] == summary.gpu_samples  # detection ran on both versions
    assert engine.stats.facility_samples == sent["facility_rows"]
    assert getattr(engine.stats, "late_samples", 0) == 0

    archive = tmp_path / "data" / "archive"
    gpu = scan(archive / "gpu_samples").collect()
    assert gpu.height == sent["gpu_rows"] == summary.rows_archived["gpu_samples"]
    assert gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item() == gpu.height  # each row once
    added = [*GPU_INFO, *GPU_WORKLOAD, *GPU_SETTINGS]
    old_rows = gpu.filter(pl.col("node").is_in(OLD_NODES))
    assert old_rows.height and all(old_rows[c].null_count() == old_rows.height for c in added)
    current_rows = gpu.filter(~pl.col("node").is_in(OLD_NODES | SWITCHING))
    assert current_rows["model"].null_count() == 0  # what the simulator's current producers say stays
    switched = gpu.filter(pl.col("node").is_in(SWITCHING)).sort("ts")
    assert switched["model"].null_count() == switched.height // 2  # null before the switch, then set
    # Every archived file is the current version (in the archive's format): the archive upgraded before it buffered.
    for dataset in ("gpu_samples", "facility_samples"):
        for path in (archive / dataset).rglob("*.parquet"):
            assert pq.read_schema(path).equals(ARCHIVE_SCHEMAS[dataset], check_metadata=True), path

    facility = scan(archive / "facility_samples").collect()
    assert facility.height == sent["facility_rows"]
    expected = {"cdu": "cdu", "pdu": "rack", "meter": "meter"}
    classes = facility.select("device", "device_class").unique()
    assert all(expected[d.split("-")[0]] == c for d, c in classes.iter_rows()), classes

    # The faults on what the old producers send were detected, and notify delivered the alerts.
    alerts = [json.loads(x) for x in (tmp_path / "data" / "alerts.jsonl").read_text().splitlines()]
    fired = {(a["labels"]["alertname"], a["labels"].get("node", ""), a["labels"].get("rack", ""))
             for a in alerts if a["status"] == "firing"}
    storm_node = sim.node_names[sim.gpu_node[sent["storm"].gpu]]
    assert storm_node in OLD_NODES
    assert any(name == "GpuPcieReplayStorm" and node == storm_node for name, node, _ in fired), fired
    assert any(name == "CoolantLeak" and rack == sim.rack_names[OLD_RACK] for name, _, rack in fired), fired
    assert scan(archive / "alerts").collect().height == len(alerts)
