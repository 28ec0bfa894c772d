"""Power caps over a real Kafka broker: the agent of one node listens to its rack's
partition of fleetwatch.power.caps only, applies its rows through NVML (the recorded
H100) and its power_action rows come back on fleetwatch.power.actions."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from pipeline.bus import EndOfStream, Topic
from pipeline.bus import keys
from pipeline.bus.kafka import KafkaBus
from pipeline.model import POWER_CAP
from pipeline.sources.nvml import NvmlAgent, NvmlSource
from pipeline.sources.nvml_replay import NvmlReplay
from tests.conftest import H100, make_config

pytestmark = pytest.mark.kafka


def test_an_agent_takes_its_racks_caps_off_kafka_and_reports_what_it_did(broker):
    replay = NvmlReplay(H100, gpus=4, latency=False, settle_s=0)
    gpu = [g.uuid for g in replay.gpus]
    racks = [f"r{i:02d}" for i in range(1, 7)]  # over 3 partitions: some share r02's, some do not

    async def go():
        bus = KafkaBus(broker.bootstrap, partitions=3,
                       prefix=f"t{uuid.uuid4().hex[:6]}.")
        await bus.start()
        cfg = make_config(agent={"interval_s": 0.05, "site": "site-a", "rack": "r02"})
        listener = bus.listen(Topic.POWER_CAPS, [keys.rack_key("site-a", "r02")])
        source = NvmlSource(NvmlAgent(cfg.agent, "r02-n01"), replay, "h100", listener)

        async def emit(topic, batch):
            for m in keys.messages(topic, batch, keyed=True, partitions=3):
                await bus.publish(m)
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(emit, stop))
        while listener.consumer is None:  # listening from the end: send once it listens
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        now = datetime.now(timezone.utc)
        rows = [{"ts": now, "site": "site-a", "rack": r, "node": f"{r}-n01", "gpu_uuid": gpu[i % 4],
                 "cap_w": 400.0 + 10 * i, "request_id": "dr-7", "lease_s": 3600.0} for i, r in enumerate(racks)]
        for m in keys.messages(Topic.POWER_CAPS, pa.RecordBatch.from_pylist(rows, schema=POWER_CAP), keyed=True,
                               partitions=3):
            await bus.publish(m)
        await bus.flush()
        while replay.gpus[1].limit_mw != 410_000:  # r02's row: 410 W on GPU 1
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        stop.set()
        await task
        await bus.flush()
        sub = bus.subscribe([Topic.POWER_ACTIONS], "check")
        await bus.end([Topic.POWER_ACTIONS])
        got = []
        while True:
            try:
                got += [r for m in await sub.get_batch(timeout_s=1.0) for r in m.value.to_pylist()]
            except EndOfStream:
                break
        await bus.close()
        return got
    got = asyncio.run(go())
    assert [(a["node"], a["gpu_uuid"], a["requested_w"], a["status"], a["cause"]) for a in got] == [
        ("r02-n01", gpu[1], 410.0, "ok", "cap"), ("r02-n01", gpu[1], None, "restored", "stop")]
    assert [g.limit_mw for g in replay.gpus] == [700_000] * 4


def test_a_listener_follows_the_partitions_the_cluster_has_not_the_config(broker, caplog):
    """fleetwatch.power.caps was created with 5 partitions, kafka.partitions says 3: the power
    role's messages go where the cluster's 5 put their keys, and the agent of rack r02 listens
    to that partition, not to the one 3 would give (r02: partition 1 of 3, 2 of 5). Given
    more partitions later (7: r02 on partition 4), it listens there."""
    from aiokafka.admin import NewPartitions
    racks = [f"r{i:02d}" for i in range(1, 13)]
    prefix = f"t{uuid.uuid4().hex[:6]}."

    def mine(count: int) -> list[str]:
        return [r for r in racks if keys.partition_for(r, count) == keys.partition_for("r02", count)]
    assert keys.partition_for("r02", 3) != keys.partition_for("r02", 5) != keys.partition_for("r02", 7)

    async def send(bus: KafkaBus, listener, cap_w: float) -> set[str]:
        """Caps for every rack, cut as the power role's do (RoleContext.emit); the racks the listener hears."""
        now = datetime.now(timezone.utc)
        rows = [{"ts": now, "site": "site-a", "rack": r, "node": f"{r}-n01", "gpu_uuid": f"GPU-{r}", "cap_w": cap_w,
                 "request_id": "dr-8", "lease_s": 3600.0} for r in racks]
        for m in keys.messages(Topic.POWER_CAPS, pa.RecordBatch.from_pylist(rows, schema=POWER_CAP), keyed=True,
                               partitions=bus.partition_count(Topic.POWER_CAPS)):
            await bus.publish(m)
        await bus.flush()
        heard: set[str] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while "r02" not in heard and loop.time() < deadline:
            heard |= {r for m in await listener.get_batch(timeout_s=0.5) for r in m.value.column("rack").to_pylist()}
        heard |= {r for m in await listener.get_batch(timeout_s=0.5) for r in m.value.column("rack").to_pylist()}
        return heard

    async def go():
        created = KafkaBus(broker.bootstrap, partitions=5, prefix=prefix)  # the topics, as another config made them
        await created.start()
        await created.close()
        bus = KafkaBus(broker.bootstrap, partitions=3, prefix=prefix)  # kafka.partitions = 3
        await bus.start()
        listener = bus.listen(Topic.POWER_CAPS, [keys.rack_key("site-a", "r02")])
        try:
            await listener.get_batch(timeout_s=0.1)  # it listens from here on
            assert listener.count == 5
            first = await send(bus, listener, 450.0)
            admin = await bus._admin()
            try:
                await admin.create_partitions({bus.wire(Topic.POWER_CAPS): NewPartitions(7)})
            finally:
                await admin.close()
            for client in (listener.consumer._client, bus.producer.client):  # (they look every few minutes)
                await client.force_metadata_update()
            await listener.get_batch(timeout_s=0.1)
            assert listener.count == 7
            then = await send(bus, listener, 400.0)
        finally:
            await listener.close()
            await bus.close()
        return first, then
    with caplog.at_level("WARNING", logger="pipeline.bus.kafka"):
        first, then = asyncio.run(go())
    assert first == set(mine(5)) and then == set(mine(7))
    noted = [r.getMessage() for r in caplog.records if "kafka.partitions says 3" in r.getMessage()]
    assert len(noted) == 1 and f"{prefix}fleetwatch.power.caps has 5 partitions" in noted[0]
