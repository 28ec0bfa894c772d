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

    async def before_revoke(self, partitions: set[int]) -> None:
        """Before partitions move to another consumer (the subscription commits right after):
        make what was taken durable, or raise so that nothing is committed."""

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

    async def before_revoke(self, partitions: set[int]) -> None:
        if not await self.flush():  # type: ignore[attr-defined]
            raise RuntimeError(f"{type(self).__name__} could not make its output durable: partitions "
                               f"{sorted(partitions)} handed over uncommitted (their new owner reads them again)")

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
    Before partitions move to another consumer (the subscription commits right after), the
    sink's `before_revoke` runs under the flush lock."""
    durable = asyncio.Lock()  # a flush, a batch on its way into the sink and a rebalance never interleave

    async def flush_and_commit() -> bool:  # (under `durable`)
        if not await sink.flush():
            return False
        await sub.commit()  # only now is the output durable
        return True

    async def finish() -> bool:
        """The last flush and commit before the loop ends; what it cannot make durable is abandoned."""
        async with durable:
            if await flush_and_commit():
                return True
            sink.abandon()
            return False

    async def before_revoke(partitions: set[int]) -> None:
        async with durable:
            try:
                await sink.before_revoke(partitions)
            except BaseException:
                sub.forget(partitions)  # not durable: none of their offsets is committed, now or later
                raise
    sub.before_revoke.append(before_revoke)
    await sink.start()
    try:
        while True:
            if sink.stalled and stop is not None and stop.is_set() and not await finish():
                return
            try:
                messages = await (sub.get_batch() if (wait := sink.wait_s()) is None else sub.get_batch(timeout_s=wait))
            except EndOfStream:
                await finish()
                return
            # Handed out, the batch's offsets are the subscription's to commit: a revoke that
            # runs while the gate dead-letters (an await) waits until the batch is in the sink,
            # or its commit would take rows that are on no disk from the next owner.
            async with durable:
                if gate is not None:  # bad rows are dead-lettered here, the rest goes on (bus/intake.py)
                    messages = await gate.screen(messages)
                due = sink.add(messages)
                made_durable = due and await flush_and_commit()
            if due:
                sink.flushed(made_durable)
    finally:
        await sink.close()
