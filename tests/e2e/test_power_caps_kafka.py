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
