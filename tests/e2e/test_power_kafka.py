"""The power role over a real Kafka broker: the fleet's data and a grid-signal request
(fleetwatch.power.requests, keyed by site) come in, the request is judged and run, its caps
go out on fleetwatch.power.caps, and its report on fleetwatch.power.reports; a row that is
not a valid request is dead-lettered with the reason. A fault alert published before the role
started is known to it (it reads the alerts the topic keeps first)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pyarrow as pa
import pytest

from pipeline.bus import EndOfStream, Topic
from pipeline.bus import keys
from pipeline.bus.kafka import KafkaBus
from pipeline.daemon import build_roles
from pipeline.model import Alert, alerts_to_batch
from pipeline.power.request import PowerRequest
from pipeline.power.store import request_store
from pipeline.roles.context import Context
from pipeline.sinks.console import Console
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config

pytestmark = pytest.mark.kafka


def test_a_grid_signal_over_kafka_is_run_by_the_power_role_and_reported(broker, tmp_path):
    cfg = make_config(data_dir=str(tmp_path / "data"),
                      kafka={"bootstrap": broker.bootstrap, "partitions": 3, "topic_prefix": f"t{uuid.uuid4().hex[:6]}."},
                      fleet={"racks": 2, "seed": 4, "fault_interval_s": 0, "gpu_reset_interval_s": 0},
                      power={"default_class": 3, "baseline_s": 30})
    sim = FleetSimulator(cfg.fleet)  # on the wall clock: the intake gate judges readings against it

    async def go():
        bus = KafkaBus.from_config(cfg.kafka)
        await bus.start()
        ctx = Context(cfg, frozenset({"power"}), bus, asyncio.Event(), Console())
        before = Alert({"alertname": "GpuStraggler", "severity": "warning", "site": "site-a", "rack": "r01",
                        "node": sim.node_names[0], "gpu": "0", "UUID": sim.gpu_uuids[0]}, {}, sim.now, "test", 1.0)
        await ctx.emit(Topic.ALERTS, alerts_to_batch([(sim.now, before)]))
        await bus.flush()
        (role,) = build_roles(ctx)
        outputs = bus.subscribe([Topic.POWER_CAPS, Topic.POWER_REPORTS], "test-outputs")
        task = asyncio.create_task(role.work())
        try:
            for i in range(150):
                tick = sim.step()
                await ctx.emit(Topic.GPU, tick.gpu)
                await ctx.emit(Topic.FACILITY, tick.facility)
                if i == 60:
                    good = PowerRequest(site="site-a", start=sim.now, duration_s=40, reduction_pct=5, ramp_s=20,
                                        source="kafka", id="grid-1", ts=sim.now)
                    late = PowerRequest(site="site-a", start=sim.now - timedelta(hours=2), duration_s=40,
                                        reduction_pct=5, source="kafka", id="grid-2", ts=sim.now)
                    both = pa.Table.from_batches([good.to_batch(), late.to_batch()]).combine_chunks().to_batches()[0]
                    for m in keys.messages(Topic.POWER_REQUESTS, both, keyed=True, partitions=1):
                        await bus.publish(m)
                    await bus.flush()
                    # The role's clock is the data's: read after the data that follows it (a loaded machine
                    # reads topics in any order), the request's start was 89 s past and rightly refused.
                    for _ in range(600):
                        if any(e.id == "grid-1" for e in request_store(cfg.data_dir).entries()):
                            break
                        await asyncio.sleep(0.1)
                await asyncio.sleep(0.01)
            for _ in range(300):  # the alert from before the role started, read back by its side input
                if ctx.power.ctl.suspects:
                    break
                await asyncio.sleep(0.1)
            assert list(ctx.power.ctl.suspects) == [before.fingerprint]
            await bus.end([Topic.GPU, Topic.FACILITY, Topic.POWER_REQUESTS, Topic.POWER_ACTIONS])
            await asyncio.wait_for(task, 120)
            await bus.end([Topic.POWER_CAPS, Topic.POWER_REPORTS])
            got = []
            while True:
                try:
                    got += await outputs.get_batch(timeout_s=1.0)
                except EndOfStream:
                    break
            return got
        finally:
            task.cancel()
            await bus.close()
    got = asyncio.run(go())
    states = {e.id: (e.state, e.reason) for e in request_store(cfg.data_dir).entries()}
    assert states["grid-1"][0] == "done", states
    assert "grid-2" not in states  # refused on arrival: dead-lettered, not stored
    reports = [r for m in got if m.topic == Topic.POWER_REPORTS for r in m.value.to_pylist()]
    assert [r["id"] for r in reports] == ["grid-1"] and reports[0]["source"] == "kafka"
    caps = [r for m in got if m.topic == Topic.POWER_CAPS for r in m.value.to_pylist()]
    assert caps and {r["request_id"] for r in caps} == {"grid-1"}
    last = {r["gpu_uuid"]: r["cap_w"] for r in caps}
    assert set(last.values()) == {None}  # every cap lifted at the end
