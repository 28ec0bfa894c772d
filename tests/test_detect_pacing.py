"""A detect batch that takes seconds: the event loop turns between its messages (the Kafka
group's heartbeats, /healthz), and the next batch asks for as many messages as fit the time
budget at the pace just measured (bus/batching.py PacedBatches)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bus import Topic, keys
from pipeline.bus.batching import PacedBatches
from pipeline.bus.memory import MemoryBus
from pipeline.detect.engine import Engine
from pipeline.roles.detect import detect_role
from pipeline.sources.simulate import FleetSimulator
from tests.conftest import make_config


@settings(max_examples=200, deadline=None)
@given(paces=st.lists(st.floats(1e-5, 0.1), min_size=1, max_size=6), settle=st.integers(1, 4))
def test_a_paced_batch_fits_its_budget_at_the_pace_measured_and_grows_back_when_the_pace_does(paces, settle):
    """At a steady pace the size comes within the budget after one batch, never under the smallest or over
    the largest; at any pace fast enough for the largest batch, it doubles back to it."""
    paced = PacedBatches(largest=4096, budget_s=2.0, smallest=16)
    for pace in paces:
        for _ in range(settle):
            n = paced.size
            paced.took(n, n * pace)
            assert 16 <= paced.size <= 4096
            assert paced.size * pace <= 2.0 or paced.size == 16
    for _ in range(10):  # the pace of an idle machine: the largest batch in well under half the budget
        paced.took(paced.size, paced.size * 1e-5)
    assert paced.size == 4096


class SlowEngine(Engine):
    """An engine on a starved machine: each batch it is given costs time on the event loop's thread."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.turns_at_each_call: list[int] = []
        self.turns = 0

    def process(self, message):
        self.turns_at_each_call.append(self.turns)
        time.sleep(0.01)
        return super().process(message)


def test_the_event_loop_turns_between_the_messages_of_a_batch_and_the_next_batch_is_paced():
    cfg = make_config(fleet={"racks": 2, "nodes_per_rack": 2, "seed": 1})
    sim = FleetSimulator(cfg.fleet, start=datetime(2026, 1, 1, tzinfo=timezone.utc))
    ticks = [sim.step() for _ in range(60)]
    engine = SlowEngine(cfg)

    async def main() -> list[int]:
        bus = MemoryBus(queue_size=10_000)
        sub = bus.subscribe([Topic.GPU, Topic.FACILITY, Topic.EVENTS], "detect")
        asked: list[int] = []
        get_batch = sub.get_batch

        async def recorded(max_messages=256, timeout_s=None):
            asked.append(max_messages)
            return await get_batch(max_messages, timeout_s)
        sub.get_batch = recorded
        for tick in ticks:  # a backlog: GPU and facility messages alternate, so no two coalesce
            for topic, batch in ((Topic.GPU, tick.gpu), (Topic.FACILITY, tick.facility)):
                for m in keys.messages(topic, batch, keyed=False):
                    await bus.publish(m)

        async def ticker() -> None:
            while True:
                engine.turns += 1
                await asyncio.sleep(0)
        beat = asyncio.create_task(ticker())
        paced = PacedBatches(largest=4096, budget_s=0.2)
        role = asyncio.create_task(detect_role(bus, engine, sub, 0.2, None, paced=paced))
        await bus.end([Topic.GPU, Topic.FACILITY, Topic.EVENTS])
        await asyncio.wait_for(role, 120)
        beat.cancel()
        return asked

    asked = asyncio.run(main())
    calls = engine.turns_at_each_call
    assert len(calls) >= 120
    assert all(b > a for a, b in zip(calls, calls[1:])), "a call followed another with no turn of the loop"
    assert asked[0] == 4096 and min(asked) < 4096  # the first batch (the whole backlog) took too long
