"""A restart resumes: the embedded daemon's detector and alert state is saved to the data
directory and restored at start; alerts firing at the stop resolve when their condition is
gone, and are not raised again while it holds; downtime is no silence of the fleet's; a
corrupt checkpoint means a cold start, not no start. A GPU slot reporting under a new UUID
is a replacement, not a GPU that stopped reporting.

Engine-level tests drive the simulator and the engine in lock step (simulated time, no
wall clock); the end-to-end tests run the real CLI against a real webhook receiver.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_restart.py."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.bus import Message, Topic
from pipeline.roles.detect import resume_embedded
from pipeline.detect.checkpoint import Checkpointer, LocalCheckpoint, reconcile
from pipeline.detect.engine import Engine
from pipeline.detect.families.staleness import Staleness
from pipeline.model import fingerprint
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Run:
    """A simulator and an engine in lock step; the engine can be swapped (a restart)."""

    def __init__(self, seed: int = 5, **fleet) -> None:
        self.cfg = make_config(fleet={"racks": 2, "nodes_per_rack": 4, "fault_interval_s": 0,
                                      "gpu_reset_interval_s": 0, "seed": seed, **fleet})
        self.sim = FleetSimulator(self.cfg.fleet, start=START)
        self.engine = Engine(self.cfg)
        self.changes: list = []
        self.events: list[dict] = []

    def run(self, seconds: float, mutate=None) -> list:
        """Alert state changes of these seconds; `mutate(topic, batch)` may rewrite or drop
        (None) a batch before the engine sees it."""
        before = len(self.changes)
        for _ in range(int(seconds / self.cfg.fleet.sample_interval_s)):
            tick = self.sim.step()
            for topic, batch in ((Topic.GPU, tick.gpu), (Topic.FACILITY, tick.facility), (Topic.EVENTS, tick.events)):
                if batch is not None and mutate is not None:
                    batch = mutate(topic, batch)
                if batch is not None and batch.num_rows:
                    out = self.engine.process(Message(topic, batch))
                    self.changes += out.alerts
                    self.events += out.events
        return [a for _, a in self.changes[before:]]

    def restart(self, directory: Path) -> dict | None:
        """Save the state as the daemon does, and continue with a fresh engine restored from it."""
        LocalCheckpoint(self.engine, directory).write(LocalCheckpoint(self.engine, directory).snapshot())
        self.engine = Engine(self.cfg)
        return LocalCheckpoint(self.engine, directory).restore()


def fired(alerts, name=None):
    return [a for a in alerts if a.ends_at is None and (name is None or a.alertname == name)]


def resolved(alerts, name=None):
    return [a for a in alerts if a.ends_at is not None and (name is None or a.alertname == name)]


def shift_time(seconds: float):
    """A mutation that moves every timestamp by `seconds` (a gap in the data)."""
    def mutate(topic, batch):
        i = batch.schema.get_field_index("ts")
        ts = pc.add(batch.column(i).cast(pa.int64()), int(seconds * 1e9)).cast(batch.schema.field(i).type)
        return batch.set_column(i, batch.schema.field(i), ts)
    return mutate


def chain(*mutations):
    def mutate(topic, batch):
        for m in mutations:
            if batch is None:
                return None
            batch = m(topic, batch)
        return batch
    return mutate


def gpu_intervals(engine: Engine) -> np.ndarray:
    return engine.family(Staleness).gpu.interval[:engine.inventory.gpu_count]


def saved_uuids(directory: Path) -> set[str]:
    batch = LocalCheckpoint(Engine(make_config()), directory).load()
    return set(batch.filter(pc.equal(batch.column("scope"), "gpu")).column("gpu_uuid").to_pylist())


# ---- engine level ---------------------------------------------------------------------


def test_restored_alerts_stay_firing_without_firing_again_then_resolve(tmp_path):
    r = Run()
    r.run(180)
    r.sim.inject("pcie_replay_storm", gpu=10, duration_s=120)
    storm = fired(r.run(30), "GpuPcieReplayStorm")
    assert len(storm) == 1
    held = r.restart(tmp_path)
    assert held["gpu"] == 64 and held["node"] == 8 and held["alerts"] >= 1
    assert [a.fingerprint for a in r.engine.active_alerts()] == [storm[0].fingerprint]
    after = r.run(240)  # the storm goes on for 90 s, then stops
    assert fired(after) == []  # held on from the checkpoint, not raised again
    done = resolved(after, "GpuPcieReplayStorm")
    assert [a.fingerprint for a in done] == [storm[0].fingerprint]
    assert done[0].starts_at == storm[0].starts_at and done[0].ends_at > done[0].starts_at


def test_a_restart_after_a_long_gap_raises_no_staleness_and_still_sees_a_gpu_go_silent(tmp_path):
    r = Run(seed=6)
    r.run(120)
    r.restart(tmp_path)
    hour_later = shift_time(3600)
    after = r.run(60, hour_later)
    assert fired(after) == [], [a.annotations["summary"] for a in fired(after)]
    # The downtime stretched no reporting interval: a GPU that goes silent now is missed
    # within a few samples, as before the restart.
    assert np.nanmax(gpu_intervals(r.engine)) < 1.5
    silent_uuid = r.sim.gpu_uuids[13]

    def drop_gpu(topic, batch):
        return batch.filter(pc.not_equal(batch.column("gpu_uuid"), silent_uuid)) if topic == Topic.GPU else batch
    missing = fired(r.run(12, chain(hour_later, drop_gpu)), "GpuNotReporting")
    assert [(a.labels["node"], a.labels["gpu"]) for a in missing] == \
        [(r.sim.node_names[r.sim.gpu_node[13]], str(r.sim.gpu_index[13]))]


def test_without_resuming_the_gap_would_blind_staleness(tmp_path):
    """What Engine.resume() prevents: the downtime taken as one reporting interval."""
    r = Run(seed=6)
    r.run(120)
    LocalCheckpoint(r.engine, tmp_path).write(LocalCheckpoint(r.engine, tmp_path).snapshot())
    r.engine = Engine(r.cfg)
    Checkpointer(r.engine, 1).restore(LocalCheckpoint(r.engine, tmp_path).load())  # no resume()
    r.run(5, shift_time(3600))
    assert np.nanmax(gpu_intervals(r.engine)) > 100


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_schema", "wrong_column_type"])
def test_an_unreadable_checkpoint_is_set_aside_and_the_engine_starts_cold(tmp_path, caplog, damage):
    r = Run()
    r.run(30)
    path = tmp_path / LocalCheckpoint.FILE
    LocalCheckpoint(r.engine, tmp_path).write(LocalCheckpoint(r.engine, tmp_path).snapshot())
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint\n" * 10)
    elif damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    else:
        batch = r.sim.step().gpu
        if damage == "wrong_column_type":
            batch = LocalCheckpoint(r.engine, tmp_path).load()
            i = batch.schema.get_field_index("gpu.last_seen")
            batch = batch.set_column(i, pa.field("gpu.last_seen", pa.string()), batch.column(i).cast(pa.string()))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, batch.schema) as w:
            w.write_batch(batch)
        path.write_bytes(sink.getvalue().to_pybytes())
    engine = Engine(r.cfg)
    with caplog.at_level(logging.WARNING):
        assert LocalCheckpoint(engine, tmp_path).restore() is None
    assert "cannot be restored" in caplog.text and "starting cold" in caplog.text
    assert not path.exists()
    assert len(list(tmp_path.glob(f"{LocalCheckpoint.FILE}.unreadable-*"))) == 1
    assert engine.inventory.gpu_count == 0 and engine.active_alerts() == []


def test_a_checkpoint_that_fails_half_way_is_set_aside_and_the_daemon_starts_with_a_fresh_engine(tmp_path, caplog):
    r = Run()
    r.run(180)
    r.sim.inject("pcie_replay_storm", gpu=10, duration_s=600)
    r.run(30)
    local = LocalCheckpoint(r.engine, tmp_path)
    batch = local.snapshot()
    i = batch.schema.get_field_index("alerts")
    broken = pc.if_else(pc.is_valid(batch.column(i)), "{not json", batch.column(i))
    local.write(batch.set_column(i, batch.schema.field(i), broken))
    cfg = make_config(data_dir=str(tmp_path / "data"))
    (tmp_path / "data" / "state").mkdir(parents=True)
    os.replace(local.path, tmp_path / "data" / "state" / LocalCheckpoint.FILE)
    half = Engine(cfg)
    with caplog.at_level(logging.WARNING):
        engine, fresh_local, resolve_now = resume_embedded(cfg, half)
    assert engine is not half and engine.inventory.gpu_count == 0 and resolve_now == []
    assert fresh_local.engine is engine
    assert "cannot be restored" in caplog.text
    assert list((tmp_path / "data" / "state").glob("*.unreadable-*"))


def test_alerts_are_made_to_agree_with_what_alerts_jsonl_told(tmp_path):
    r = Run()
    r.run(180)
    r.sim.inject("pcie_replay_storm", gpu=10, duration_s=600)
    r.sim.inject("nvlink_crc_storm", gpu=20, duration_s=600)
    firing = {a.alertname: a for a in fired(r.run(30))}
    assert set(firing) == {"GpuPcieReplayStorm", "GpuNvlinkErrorStorm"}
    r.restart(tmp_path)
    # The log says: the PCIe storm resolved after the checkpoint was taken (and must fire
    # afresh if it holds), the NVLink storm fires, and a third alert fired after the
    # checkpoint (the detector does not know it: resolved now).
    pcie, nvlink = firing["GpuPcieReplayStorm"], firing["GpuNvlinkErrorStorm"]
    third = {**nvlink.to_json(), "labels": {**nvlink.labels, "gpu": "7", "node": "r02-n04"}}
    third["fingerprint"] = fingerprint(third["labels"])
    # The remediation role's own alerts are its own: it restores them with its cases.
    drain = {"labels": {"alertname": "RemediationDrainOverdue", "severity": "warning", "site": "site-a",
                        "rack": "r01", "node": "r01-n01"}, "status": "firing", "startsAt": "2026-01-01T00:01:00.000Z"}
    drain["fingerprint"] = fingerprint(drain["labels"])
    logged = {pcie.fingerprint: {**pcie.to_json(), "status": "resolved", "endsAt": "2026-01-01T00:03:20.000Z"},
              nvlink.fingerprint: nvlink.to_json(), third["fingerprint"]: third, drain["fingerprint"]: drain}
    now = r.engine.latest_data_time()
    out = reconcile(r.engine, logged, now)
    assert [(a.fingerprint, a.status) for _, a in out] == [(third["fingerprint"], "resolved")]
    assert out[0][1].ends_at.timestamp() == now
    assert [a.fingerprint for a in r.engine.active_alerts()] == [nvlink.fingerprint]
    again = fired(r.run(10))
    assert [a.fingerprint for a in again] == [pcie.fingerprint]  # still storming: raised again, told again


def test_a_replaced_gpu_is_an_event_not_a_gpu_that_stopped_reporting(tmp_path):
    r = Run(seed=9)
    r.run(120)
    gpu = 10
    old_uuid, new_uuid = r.sim.gpu_uuids[gpu], "GPU-00000000-replaced-0000-000000000010"
    node, index = r.sim.node_names[r.sim.gpu_node[gpu]], int(r.sim.gpu_index[gpu])
    r.sim.inject("gpu_fell_off_bus", gpu=gpu, duration_s=40)
    off = fired(r.run(30), "GpuFellOffBus")
    assert [(a.labels["node"], a.labels["gpu"]) for a in off] == [(node, str(index))]

    def swapped(topic, batch):  # the technician put in a new GPU: the slot reports under a new UUID
        if topic != Topic.GPU:
            return batch
        i = batch.schema.get_field_index("gpu_uuid")
        uuids = pc.replace_with_mask(batch.column(i), pc.equal(batch.column(i), old_uuid), pa.array([new_uuid]))
        return batch.set_column(i, batch.schema.field(i), uuids)
    after = r.run(300, swapped)
    assert fired(after, "GpuNotReporting") == []
    assert [(a.alertname, a.labels["node"], a.labels["gpu"]) for a in resolved(after)] == \
        [("GpuFellOffBus", node, str(index))]  # the old GPU's alert ends with it
    assert [(e["kind"], e["node"], e["gpu"], e["gpu_uuid"]) for e in r.events] == \
        [("gpu_replaced", node, index, new_uuid)]
    assert old_uuid in r.events[0]["text"] and new_uuid in r.events[0]["text"]
    r.restart(tmp_path)
    uuids = saved_uuids(tmp_path)
    assert new_uuid in uuids and old_uuid not in uuids and len(uuids) == 64
    after = r.run(120, swapped)
    assert fired(after) == [] and r.events[1:] == []


def test_a_gpu_put_back_retires_its_replacement(tmp_path):
    r = Run(seed=9)
    r.run(60)
    gpu, other = 3, "GPU-00000000-loaner-0000-000000000003"
    old_uuid = r.sim.gpu_uuids[gpu]

    def as_(uuid):
        def mutate(topic, batch):
            if topic != Topic.GPU:
                return batch
            i = batch.schema.get_field_index("gpu_uuid")
            uuids = pc.replace_with_mask(batch.column(i), pc.equal(batch.column(i), old_uuid), pa.array([uuid]))
            return batch.set_column(i, batch.schema.field(i), uuids)
        return mutate
    assert fired(r.run(60, as_(other))) == []
    assert fired(r.run(60)) == []  # the original back in its slot
    assert [e["gpu_uuid"] for e in r.events] == [other, old_uuid]
    r.restart(tmp_path)
    assert other not in saved_uuids(tmp_path)


# ---- the daemon, end to end -------------------------------------------------------------


def logged(data: Path) -> list[dict]:
    path = data / "alerts.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().split("\n"):
        try:
            out.append(json.loads(line))
        except ValueError:  # the last line while it is written
            pass
    return out


def test_two_uuids_reporting_as_one_gpu_at_once_are_no_replacement():
    r = Run(seed=9)
    r.run(60)
    twin = "GPU-00000000-twin-0000-000000000003"

    def with_twin(topic, batch):  # a second UUID claims GPU 3's (node, index) in the same scrapes
        if topic != Topic.GPU:
            return batch
        row = batch.slice(3, 1)
        i = row.schema.get_field_index("gpu_uuid")
        return pa.Table.from_batches([batch, row.set_column(i, row.schema.field(i), pa.array([twin]))]) \
            .combine_chunks().to_batches()[0]
    assert fired(r.run(60, with_twin)) == []
    assert r.events == [] and not r.engine.inventory.gpu.retired[:r.engine.inventory.gpu_count].any()
