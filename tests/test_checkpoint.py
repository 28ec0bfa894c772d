"""Detector checkpoints: an engine restored from another's checkpoint continues exactly
as the original would have, alerts included; a forgotten partition starts cold."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.bus import Message, Topic, keys
from pipeline.detect.checkpoint import Checkpointer
from pipeline.detect.engine import Engine
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
PARTITIONS = 3


@pytest.fixture(scope="module")
def stream():
    """15 simulated minutes of a 64-GPU fleet with a fault every 20 s, as Kafka carries
    it: a message per node (telemetry, events) and per rack (facility)."""
    cfg = make_config(fleet={"racks": 2, "nodes_per_rack": 4, "fault_interval_s": 20, "seed": 7})
    sim = FleetSimulator(cfg.fleet, start=START)
    ticks = []
    for _ in range(900):
        tick = sim.step()
        msgs = keys.messages(Topic.GPU, tick.gpu, keyed=True) + keys.messages(Topic.FACILITY, tick.facility, True)
        if tick.events is not None:
            msgs += keys.messages(Topic.EVENTS, tick.events, keyed=True)
        ticks.append(msgs)
    return cfg, ticks


@pytest.fixture(scope="module")
def reference(stream) -> list[dict]:
    """The alert changes of one engine that never stopped, over the whole stream."""
    cfg, ticks = stream
    return alerts(Engine(cfg), ticks)


def alerts(engine: Engine, ticks) -> list[dict]:
    out = []
    for msgs in ticks:
        for m in msgs:
            out += [a.to_json() | {"at": ts.isoformat()} for ts, a in engine.process(m).alerts]
    return out


def test_a_restored_engine_continues_exactly_where_the_checkpoint_was_taken(stream, reference):
    cfg, ticks = stream
    first = Engine(cfg)
    before = alerts(first, ticks[:450])
    snapshots = Checkpointer(first, PARTITIONS).snapshot(set(range(PARTITIONS)))
    assert sorted(snapshots) == sorted({keys.partition_for(key, PARTITIONS) for key in ("r01", "r02", "site-a")})
    second = Engine(cfg)
    restored = [Checkpointer(second, PARTITIONS).restore(b) for b in snapshots.values()]
    assert sum(r["gpu"] for r in restored) == 64 and sum(r["node"] for r in restored) == 8
    firing = sum(r["alerts"] for r in restored)
    print(f"checkpoint at 450 s: {firing} alerts firing, {len(before)} alert changes before, "
          f"{len(reference)} over the whole run")
    assert firing >= 2  # the checkpoint carries alerts in progress
    assert before + alerts(second, ticks[450:]) == reference


def test_a_cold_engine_would_alert_again_what_was_already_alerted(stream):
    """What the checkpoint prevents: forgetting the state re-raises firing alerts."""
    cfg, ticks = stream
    engine = Engine(cfg)
    before = alerts(engine, ticks[:450])
    Checkpointer(engine, PARTITIONS).forget(set(range(PARTITIONS)))
    assert engine.active_alerts() == []
    after = alerts(engine, ticks[450:])
    cold = alerts(Engine(cfg), ticks[450:])
    assert after == cold  # forgotten means as if never seen
    fired_before = {a["fingerprint"] for a in before if a["status"] == "firing"}
    resolved_before = {a["fingerprint"] for a in before if a["status"] == "resolved"}
    again = {a["fingerprint"] for a in after if a["status"] == "firing"} & (fired_before - resolved_before)
    assert again, "some alert still firing at the checkpoint fires a second time from cold state"


def test_only_the_partitions_asked_for_are_snapshotted_and_forgotten(stream):
    cfg, ticks = stream
    engine = Engine(cfg)
    alerts(engine, ticks[:120])
    cp = Checkpointer(engine, PARTITIONS)
    one = cp.snapshot({1})
    assert list(one) == [1]
    nodes = set(one[1].filter(in_scope(one[1], "node")).column("node").to_pylist())
    assert nodes and all(keys.partition_for(n.split("-")[0], PARTITIONS) == 1 for n in nodes)  # by their rack
    cp.forget({1})
    again = cp.snapshot({0, 1, 2})
    kept = in_scope(again[2], "gpu")
    assert again[2].filter(kept).column("drift.count").to_pylist()[0] > 0  # partition 2 (rack r01) kept its state
    assert again[1].filter(in_scope(again[1], "gpu")).num_rows == 0  # its GPUs let go, as if never seen
    assert np.isnan(again[1].filter(in_scope(again[1], "node")).column("node.last_seen").to_numpy()).all()
    cp.restore(one[1])  # given back: as the checkpoint had them
    back = cp.snapshot({1})[1]
    assert back.filter(in_scope(back, "gpu")).column("drift.count").to_pylist() == \
        one[1].filter(in_scope(one[1], "gpu")).column("drift.count").to_pylist()


def in_scope(batch, scope):
    return pc.equal(batch.column("scope"), scope)


def as_version_1(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A checkpoint as version 1 wrote it: no device_class column."""
    from pipeline.model import CHECKPOINT_V1
    keep = [n for n in batch.schema.names if n != "device_class"]
    fields = [*CHECKPOINT_V1, *(batch.schema.field(n) for n in keep[len(CHECKPOINT_V1):])]
    return pa.RecordBatch.from_arrays([batch.column(n) for n in keep],
                                      schema=pa.schema(fields, metadata=CHECKPOINT_V1.metadata))


def test_a_checkpoint_of_version_1_is_read_and_its_points_keep_their_kind(stream, reference, tmp_path):
    """An upgrade must not cost the detector its state: the embedded checkpoint file an
    older version wrote (no device classes) restores, the class of each facility point
    read off its id as that version did, and the engine goes on as if never stopped."""
    from pipeline.detect.checkpoint import LocalCheckpoint
    cfg, ticks = stream
    first = Engine(cfg)
    before = alerts(first, ticks[:450])
    old = LocalCheckpoint(first, tmp_path)
    old.write(as_version_1(old.snapshot()))
    second = Engine(cfg)
    assert LocalCheckpoint(second, tmp_path).restore()["point"] == first.identities("point").num_rows
    n = len(first.inventory.point_classes)
    assert second.inventory.point_classes == first.inventory.point_classes
    assert second.inventory.point.kind[:n].tolist() == first.inventory.point.kind[:n].tolist()
    assert before + alerts(second, ticks[450:]) == reference


def test_the_cluster_s_partition_count_places_checkpoints_and_event_time(stream):
    """A topic created with more partitions than kafka.partitions says: the detector's
    checkpoints and each rack's event-time clock follow the cluster's count, as the
    producer's partitioner places the racks' data."""
    cfg, ticks = stream
    engine = Engine(cfg)
    before = alerts(engine, ticks[:5])
    inv = engine.inventory
    assert list(inv.rack_partition) == [keys.partition_for(r or s, cfg.kafka.partitions) for s, r in inv.rack_names]
    checkpoint = Checkpointer(engine, cfg.kafka.partitions)
    checkpoint.repartition(7)
    assert list(inv.rack_partition) == [keys.partition_for(r or s, 7) for s, r in inv.rack_names]
    assert sorted(checkpoint.snapshot(set(range(7)))) == sorted({keys.partition_for(k, 7) for k in ("r01", "r02", "site-a")})
    assert before + alerts(engine, ticks[5:60]) == alerts(Engine(cfg), ticks[:60])  # one stream: the same alerts
    assert len(inv.rack_partition) == inv.rack_count


def test_a_checkpoint_without_streak_times_restores_and_goes_on_as_before(stream, reference, tmp_path):
    """A checkpoint written before the trackers kept when each streak began (`<alert>.since`):
    a streak it holds goes on by its count, and the alerts are those of an engine never stopped."""
    from pipeline.detect.checkpoint import LocalCheckpoint
    cfg, ticks = stream
    first = Engine(cfg)
    before = alerts(first, ticks[:450])

    def in_a_streak() -> bool:  # a hit streak that has not fired, or a firing alert's clear streak
        return any(((t.arrays.hits > 0) & ~t.arrays.firing | t.arrays.firing & (t.arrays.clears > 0)).any()
                   for t in first.trackers.values())
    cut = 450
    while not in_a_streak():
        assert cut < len(ticks), "no streak in progress to restore"
        before += alerts(first, ticks[cut:cut + 1])
        cut += 1
    old = LocalCheckpoint(first, tmp_path)
    batch = old.snapshot()
    since = [n for n in batch.schema.names if n.endswith(".since")]
    assert since  # the trackers' streak times are checkpointed ...
    restored = Engine(cfg)
    old.write(batch)
    LocalCheckpoint(restored, tmp_path).restore()
    again = LocalCheckpoint(restored, tmp_path).snapshot()
    assert again.select(since).equals(batch.select(since))  # ... and restored as they were
    assert any(np.isfinite(again.column(c).to_numpy(zero_copy_only=False)).any() for c in since)
    old.write(batch.drop_columns(since))
    second = Engine(cfg)
    LocalCheckpoint(second, tmp_path).restore()
    assert before + alerts(second, ticks[cut:]) == reference


def test_a_facility_device_whose_name_holds_a_slash_keeps_its_kind_across_a_restore(stream):
    """A BMS that names its devices by path (`hall1/pdu-r01`): the checkpoint's point ids had been split
    at the first `/`, and a restored PDU became device `hall1`, metric `pdu-r01/power_w`, a point of no
    kind (no PduOverload, no heat balance)."""
    cfg, ticks = stream

    def by_path(m):
        if m.topic != Topic.FACILITY:
            return m
        v = m.value
        i = v.schema.get_field_index("device")
        return Message(m.topic, v.set_column(i, v.schema.field(i), pc.binary_join_element_wise(
            pa.scalar("hall1/"), v.column(i), "")), key=m.key)
    ticks = [[by_path(m) for m in msgs] for msgs in ticks[:300]]
    reference = alerts(Engine(cfg), ticks)
    first = Engine(cfg)
    before = alerts(first, ticks[:150])
    second = Engine(cfg)
    for b in Checkpointer(first, PARTITIONS).snapshot(set(range(PARTITIONS))).values():
        Checkpointer(second, PARTITIONS).restore(b)
    n = len(first.inventory.point_devices)
    assert "hall1/pdu-r01" in first.inventory.point_devices and len(second.inventory.point_devices) == n
    assert sorted(zip(second.inventory.point_devices, second.inventory.point.kind[:n].tolist())) == \
        sorted(zip(first.inventory.point_devices, first.inventory.point.kind[:n].tolist()))
    assert before + alerts(second, ticks[150:]) == reference


def changes(engine: Engine, ticks) -> list:
    """Alert changes and the events the engine found (a GPU moved or replaced)."""
    out = []
    for msgs in ticks:
        for m in msgs:
            o = engine.process(m)
            out += [a.to_json() | {"at": ts.isoformat()} for ts, a in o.alerts]
            out += [(e["kind"], e["text"]) for e in o.events]
    return out


def _first_gpu_from(ticks, start: int, change) -> list:
    """The stream with the first GPU's rows changed by `change(gpu batch, its rows)` from tick `start` on."""
    uuid = ticks[0][0].value.column("gpu_uuid")[0].as_py()
    out = []
    for i, msgs in enumerate(ticks):
        if i >= start:
            msgs = [Message(m.topic, change(m.value, pc.equal(m.value.column("gpu_uuid"), uuid)), key=m.key)
                    if m.topic == Topic.GPU else m for m in msgs]
        out.append(msgs)
    return out


def _replaced(b, me):
    return b.set_column(b.schema.get_field_index("gpu_uuid"), "gpu_uuid",
                        pc.if_else(me, "GPU-NEW", b.column("gpu_uuid")))


def _moved(b, me):
    col = b.schema.get_field_index("gpu")
    return b.set_column(col, "gpu", pc.if_else(me, pa.scalar(9, b.schema.field(col).type), b.column("gpu")))


@pytest.mark.parametrize("checkpointed", [True, False], ids=["after its checkpoint", "before any checkpoint"])
@pytest.mark.parametrize("meanwhile", [None, _replaced, _moved], ids=["nothing", "a GPU replaced", "a GPU moved"])
def test_a_process_fenced_and_given_its_partitions_again_detects_what_it_reads_again(stream, meanwhile, checkpointed):
    """A detect process whose event loop stalled past its transaction's timeout is fenced: what it
    processed after its last commit is discarded, and the group may give it the same partitions back.
    It restores their checkpoint and reads those rows again. Its clocks had stayed where it had got
    to (a CI run under load): every row read again was "late", not detected on, and the PduOverload
    and CoolantFlowLoss of that time were never raised. A GPU replaced or moved meanwhile was said
    replaced or moved backwards, then forwards again (the inventory kept where it had seen it last). Fenced
    before the partition's first checkpoint, it reads it all again from the start."""
    cfg, ticks = stream
    ticks = ticks[:600] if meanwhile is None else _first_gpu_from(ticks[:600], 350, meanwhile)
    reference = changes(Engine(cfg, one_stream=False), ticks)  # partitions' clocks apart, as over Kafka
    if meanwhile is not None:
        assert any(isinstance(c, tuple) for c in reference)  # the engine saw it (at 350 s, after the commit)
    engine = Engine(cfg, one_stream=False)
    cp = Checkpointer(engine, PARTITIONS)
    cut = 300 if checkpointed else 0
    before = changes(engine, ticks[:cut])
    committed = cp.snapshot(set(range(PARTITIONS))) if checkpointed else {}
    changes(engine, ticks[cut:450])  # processed, never committed: its transaction was aborted
    cp.forget(set(range(PARTITIONS)))  # fenced (the role's `lost`)
    assert np.isnan(engine.gpu_time.newest(np.arange(PARTITIONS))).all()  # the partitions' clocks start again
    changes(engine, ticks[450:460])  # the rest of the batch it was processing
    cp.forget(set(range(PARTITIONS)))  # the role's restore: forget, then load the checkpoints
    for batch in committed.values():
        cp.restore(batch)
    assert before + changes(engine, ticks[cut:]) == reference
    assert engine.stats.late_samples == 0


def test_a_gpu_placed_by_another_process_s_checkpoint_is_no_longer_where_this_one_saw_it(stream, caplog):
    """P saw a GPU move to GPU 9 of another node, and was fenced; Q took the partition over, saw it move
    back and checkpointed; P is given the partition back with Q's checkpoint. A new GPU then installed at
    GPU 9 of that node, and replaced there, is that and nothing more: P had kept the moved GPU at both
    places, taken the new one for a second claimant of GPU 9 (a warning) and missed its replacement."""
    cfg, ticks = stream
    first = ticks[0][0].value
    uuid, node = first.column("gpu_uuid")[0].as_py(), first.column("node")[0].as_py()
    other = next(n for n in first.column("node").to_pylist() if n != node)

    def there(b, me, name, value):
        i = b.schema.get_field_index(name)
        return b.set_column(i, name, pc.if_else(me, pa.scalar(value, b.schema.field(i).type), b.column(name)))

    def scenario(i: int, b: pa.RecordBatch) -> pa.RecordBatch:
        me = pc.equal(b.column("gpu_uuid"), uuid)
        if 350 <= i < 480:  # moved to GPU 9 of the other node, and back
            b = there(there(b, me, "node", other), me, "gpu", 9)
        if i >= 550 and me.true_count:  # a new GPU at GPU 9 of the other node, replaced at 620
            new = b.filter(me)
            every = pa.array([True] * new.num_rows)
            new = there(there(there(new, every, "node", other), every, "gpu", 9),
                        every, "gpu_uuid", "GPU-C" if i < 620 else "GPU-D")
            b = pa.concat_batches([b, pa.RecordBatch.from_arrays(new.columns, schema=b.schema)])
        return b
    ticks = [[Message(m.topic, scenario(i, m.value), key=m.key) if m.topic == Topic.GPU else m for m in msgs]
             for i, msgs in enumerate(ticks[:700])]
    reference = changes(Engine(cfg, one_stream=False), ticks)
    assert ("gpu_replaced", f"GPU 9 of {other} replaced: GPU-C -> GPU-D") in reference
    p, q = Engine(cfg, one_stream=False), Engine(cfg, one_stream=False)
    cp_p, cp_q = Checkpointer(p, PARTITIONS), Checkpointer(q, PARTITIONS)
    changes(p, ticks[:300])
    at_300 = cp_p.snapshot(set(range(PARTITIONS)))
    changes(p, ticks[300:450])
    cp_p.forget(set(range(PARTITIONS)))  # fenced
    for batch in at_300.values():
        cp_q.restore(batch)
    changes(q, ticks[300:520])
    at_520 = cp_q.snapshot(set(range(PARTITIONS)))
    cp_p.forget(set(range(PARTITIONS)))  # given back, with Q's checkpoint
    for batch in at_520.values():
        cp_p.restore(batch)
    after = changes(p, ticks[520:])
    assert after == reference[len(reference) - len(after):]
    said = [c for c in after if isinstance(c, tuple)]
    assert said == [("gpu_replaced", f"GPU 9 of {other} replaced: GPU-C -> GPU-D")]
    assert "both report" not in caplog.text
