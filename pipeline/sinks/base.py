"""What every sink is, and the one loop that feeds a sink from the bus.

A sink takes messages (`add`) and makes what it took durable (`flush`). `consume`
reads a subscription, screens every batch at the entry (bus/intake.py Gate: bad rows
are dead-lettered, the rest goes on), hands it to the sink, and commits the offsets
only after `flush` said the output is durable: until then the bus is the sink's
outbox, and a crash reads the same messages again (at-least-once). A flush and a
rebalance never interleave.

To add a sink (a Prometheus exporter, a database):
  1. a module under pipeline/sinks/ with a class that implements `Sink` and a
     `build(ctx, spec)` that makes it and returns `lambda: consume(sub, sink, gate)`
     (sub = ctx.bus.subscribe(list(spec.inputs), spec.group), gate = ctx.gate(sub, spec.group));
  2. its config section in pipeline/config.py;
  3. its row in the role table (pipeline/roles/__init__.py): name, help, inputs, group.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from pipeline.bus.base import EndOfStream, Message


class Sink(Protocol):
    async def start(self) -> None:
        """Before the first message (open files, start delivery tasks)."""

    def add(self, messages: list[Message]) -> bool:
        """Take a screened batch (possibly empty: a timeout); True when a flush is due now."""

    async def flush(self) -> bool:
        """Make everything taken durable; True when it is (the offsets may then be committed)."""

    def flushed(self, durable: bool) -> None:
        """After a due flush and, when durable, its commit."""

    def wait_s(self) -> float | None:
        """How long to wait for input before calling `add([])` (None: until input comes)."""

    @property
    def stalled(self) -> bool:
        """Not reading while it cannot flush (Kafka paused): at a stop, flush once more or give up."""

    def abandon(self) -> None:
        """Stopping while what it holds is not durable (not committed: the bus keeps it)."""

    async def close(self) -> None:
        """After the last message; also when the loop fails."""


class SinkBase:
    """Defaults for the optional parts of `Sink`."""

    async def start(self) -> None:
        pass

    def flushed(self, durable: bool) -> None:
        pass

    def wait_s(self) -> float | None:
        return None

    @property
    def stalled(self) -> bool:
        return False

    def abandon(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def consume(sub, sink: Sink, gate=None, stop: asyncio.Event | None = None) -> None:
    """Feed `sink` from `sub` until its topics end; commit only what `flush` made durable.
    A sink with `before_revoke(partitions)` gets it, under the flush lock, before
    partitions move to another consumer (the subscription commits right after)."""
    durable = asyncio.Lock()  # a flush and a rebalance never interleave

    async def flush_and_commit() -> bool:
        async with durable:
            if not await sink.flush():
                return False
            await sub.commit()  # only now is the output durable
            return True

    if (revoke := getattr(sink, "before_revoke", None)) is not None:
        async def before_revoke(partitions: set[int]) -> None:
            async with durable:
                await revoke(partitions)
        sub.before_revoke.append(before_revoke)
    await sink.start()
    try:
        while True:
            if sink.stalled and stop is not None and stop.is_set() and not await flush_and_commit():
                sink.abandon()
                return
            try:
                messages = await (sub.get_batch() if (wait := sink.wait_s()) is None else sub.get_batch(timeout_s=wait))
            except EndOfStream:
                if not await flush_and_commit():
                    sink.abandon()
                return
            if gate is not None:  # bad rows are dead-lettered here, the rest goes on (bus/intake.py)
                messages = await gate.screen(messages)
            if sink.add(messages):
                sink.flushed(await flush_and_commit())
    finally:
        await sink.close()
