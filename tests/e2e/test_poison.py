"""End-to-end: poison pills over a real Kafka broker and role processes (moved from tests/test_poison.py)."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.bus import Message, Topic
from pipeline.bus.codec import Decoder, encode
from pipeline.bus.intake import TimeWindow
from pipeline.model import GPU_SAMPLE
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config
from tests.test_poison import (KEPT, NOW_S, REASONS, a_good_alert, archived, bad_batch, cfg_lines, check_nothing_lost,
                               config, interleave, run_consumers, sim_ticks)


@pytest.fixture(scope="module")
def broker():
    from tests.services import KafkaBroker
    b = KafkaBroker().start()
    yield b
    b.close()


async def read_dead_letters(bootstrap: str, topic: str) -> list:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        tp = TopicPartition(topic, 0)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        end = (await reader.end_offsets([tp]))[tp]
        out = []
        while await reader.position(tp) < end:
            for recs in (await reader.getmany(timeout_ms=1000)).values():
                out += recs
        return out
    finally:
        await reader.stop()


@pytest.mark.kafka
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                               HealthCheck.function_scoped_fixture])
@given(bad=st.lists(st.tuples(st.integers(0, 30), bad_batch()), min_size=1, max_size=8))
def test_no_batch_stops_a_consumer_over_kafka(broker, bad):
    from aiokafka import AIOKafkaProducer

    from pipeline.bus.kafka import DEAD_LETTER, KafkaBus
    prefix = f"p{uuid.uuid4().hex[:6]}."

    async def go(cfg, publish):
        bus = KafkaBus(broker.bootstrap, partitions=2, prefix=prefix)
        await bus.start()
        # Undecodable and two-stream messages among them: dead-lettered by the subscription.
        raw = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await raw.start()
        value, headers = encode(publish[0].value)
        await raw.send_and_wait(bus.wire(Topic.GPU), value + value, key=b"x", headers=headers)
        await raw.stop()
        try:
            out = await run_consumers(cfg, publish, TimeWindow(300, 7 * 86400, lambda: NOW_S), kafka=bus)
        finally:
            await bus.close()
        return out, await read_dead_letters(broker.bootstrap, bus.wire(DEAD_LETTER))

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        cfg = config(data)
        good = sim_ticks(cfg, 15)
        publish = interleave(good, bad)
        out, letters = asyncio.run(go(cfg, publish))
        headers = [{k: v.decode(errors="replace") for k, v in r.headers} for r in letters]
        undecodable = [h for h in headers if "fw-reason" not in h]
        assert len(undecodable) == 3  # one per group that reads the GPU topic (detect, archive, observer)
        assert all("a second stream" in h["fw-error"] for h in undecodable)
        dead: Counter = Counter()
        decoder = Decoder()
        for r, h in zip(letters, headers):
            if "fw-reason" in h:
                assert h["fw-reason"] in REASONS and h["fw-error"].startswith(h["fw-reason"])
                rows = decoder.decode(r.value, r.headers).num_rows  # the rejected rows, as Arrow
                if h["fw-reason"] != KEPT:
                    dead[(h["fw-consumer-group"], h["fw-source-topic"][len(prefix):])] += rows
        assert sum(dead.values()) == sum(n for g in out["gates"].values() for r, n in g.rejected.items() if r != KEPT)
        check_nothing_lost(out, dead, data, good)


@pytest.mark.kafka
def test_archive_and_notify_processes_survive_the_poison_and_every_restart(broker, tmp_path):
    """The issue's crash loop, as a user runs the roles: `fleetwatch archive` and
    `fleetwatch notify` read a gpu_sample batch with node = null and an alert with
    nanosecond timestamps from Kafka. Both keep running, stop with status 0, and start
    and stop again cleanly; the bad row is on the dead-letter topic with its reason."""
    from pipeline.bus.kafka import DEAD_LETTER, KafkaBus
    from tests.helpers import wait_for
    from tests.e2e.test_kafka import per_node, role_env, start_role, stop_in_order
    env = role_env("poison")
    prefix = env["FLEETWATCH_KAFKA__TOPIC_PREFIX"]
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 2})
    sim = FleetSimulator(cfg.fleet)  # the wall clock's time: these processes judge readings by it
    batches = [sim.step().gpu for _ in range(5)]
    nodes = batches[2].column("node").to_pylist()
    nodes[0] = None
    poisoned = batches[2].set_column(3, GPU_SAMPLE.field("node"), pa.array(nodes, pa.string()))
    ns_alert = a_good_alert(int(time.time() * 1e9) // 1000 * 1000 + 789)

    async def produce() -> None:
        bus = KafkaBus(broker.bootstrap, partitions=2, prefix=prefix)
        await bus.start()
        for b in batches[:2]:
            for m in per_node(b):
                await bus.publish(m)
        await bus.publish(Message(Topic.GPU, poisoned, key="r01-n01"))
        await bus.publish(Message(Topic.ALERTS, ns_alert, key=ns_alert.column("fingerprint")[0].as_py()))
        for b in batches[3:]:
            for m in per_node(b):
                await bus.publish(m)
        await bus.flush()
        await bus.close()
    asyncio.run(produce())
    expected = sum(b.num_rows for b in batches) - 1
    data = tmp_path / "data"
    for attempt in range(2):  # the second start reads nothing new: the first committed past the poison
        procs = {role: start_role(role, broker, tmp_path, env) for role in ("archive", "notify")}
        wait_for(lambda: all("fleetwatch running" in p.log_path.read_text() for p in procs.values()), timeout=120)
        if attempt == 0:
            wait_for(lambda: archived(data, "gpu_samples").num_rows == expected
                     and archived(data, "alerts").num_rows == 1 and cfg_lines(data / "alerts.jsonl"), timeout=120)
        stop_in_order(procs, [["archive", "notify"]])  # each exits 0
    gpu = archived(data, "gpu_samples")
    assert gpu.num_rows == expected and gpu.column("node").null_count == 0
    [alert] = cfg_lines(data / "alerts.jsonl")
    assert alert["annotations"]["summary"] == "injected" and alert["startsAt"].endswith("Z")
    letters = asyncio.run(read_dead_letters(broker.bootstrap, f"{prefix}{DEAD_LETTER}"))
    headers = [{k: v.decode(errors="replace") for k, v in r.headers} for r in letters]
    assert [(h["fw-consumer-group"], h["fw-reason"], h["fw-source-topic"]) for h in headers] == [
        ("archive", "null_field", f"{prefix}fleetwatch.gpu")]
    rows = Decoder().decode(letters[0].value, letters[0].headers)
    assert rows.num_rows == 1 and rows.column("node").null_count == 1
