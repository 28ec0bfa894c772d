"""The archive as a sink (sinks/base.py): every topic -> Parquet, on local disk
(sinks/parquet.py, the default) or as Delta Lake tables on object storage (sinks/delta.py,
`archive.url`).

A write that fails (full disk, permissions, archive/ gone) stops nothing: what it
took goes back into the buffers, nothing is committed, and the archive retries with
backoff and raises FleetwatchArchiveFailing (archive_outage.py). What it holds
meanwhile is bounded by `buffer_mb`: in-process the oldest rows are dropped
(counted); over Kafka reading pauses, and the data waits on Kafka. The alert is sent again
every heartbeat while it fires (archive_outage.py). Closed hours are
compacted (sinks/compaction.py) and expired ones deleted (sinks/retention.py) in a
thread every `archive.upkeep_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from pipeline.bus.base import HEARTBEAT, Message
from pipeline.bus.in_order import InOrder
from pipeline.config import ArchiveConfig
from pipeline.ops.selfalerts import message as alert_message
from pipeline.roles import DATASET_OF_TOPIC
from pipeline.sinks.archive_outage import ArchiveOutage
from pipeline.sinks.base import SinkBase, consume
from pipeline.sinks.parquet import ArchiveBuffers, ArchiveWriter

log = logging.getLogger("fleetwatch")


class ArchiveSink(SinkBase):
    def __init__(self, writer: ArchiveBuffers, sub, flush_interval_s: float, outage: ArchiveOutage | None = None,
                 buffer_mb: float = 256.0, upkeep: ArchiveConfig | None = None) -> None:
        self.writer, self.sub, self.flush_interval_s = writer, sub, flush_interval_s
        # Retention (sinks/retention.py) and compaction (sinks/compaction.py) in a thread, at the first
        # flush (a killed run's leftovers are finished then) and every upkeep_interval_s after, whether
        # the flush writes or not; never two at once. None: neither.
        self.upkeep = upkeep if upkeep is not None and upkeep.upkeep_interval_s > 0 else None
        self.next_upkeep = time.monotonic()
        self.upkeeping: asyncio.Task | None = None
        self.upkeep_stop = threading.Event()
        self.outage = outage or ArchiveOutage("", "", 30.0)
        self.buffer_mb, self.bound = buffer_mb, int(buffer_mb * 2**20)
        self.paused = False
        self.alerts = InOrder("archive-alert")  # the outage alert's changes, off the archive's loop
        self.beating: asyncio.Task | None = None  # re-sends the firing outage alert (start, _beat)
        self.next_flush = time.monotonic() + flush_interval_s
        self.assignments = sub.assignments

    async def start(self) -> None:
        self.beating = asyncio.create_task(self._beat(), name="archive-heartbeat")

    async def _beat(self) -> None:
        """The failing archive's alert again every heartbeat, off the loop that may wait on a
        hung write (the outage's own clock says when)."""
        while True:
            await asyncio.sleep(min(1.0, self.outage.heartbeat_s / 4))
            if (beat := self.outage.heartbeat()) is not None:
                self._announce(beat, heartbeat=True)

    def _announce(self, alert, heartbeat: bool = False) -> None:
        self.alerts.then(lambda: self.sub.publish(alert_message(alert, heartbeat)))

    async def flush(self) -> bool:
        # Take the buffers on the loop, write them in a thread: the loop never waits on disk.
        writer, outage = self.writer, self.outage
        if reading := writer.partitions():  # (over Kafka) none that another member took meanwhile
            writer.discard(reading - await self.sub.held_still(reading))
        held, taken = writer.held_rows(), writer.take()
        # Upkeep at every flush, written or not: retention is what frees a full disk for the writes.
        self._maybe_upkeep()
        if not taken:
            writer.last_durable = time.monotonic()
            return True
        try:
            await asyncio.to_thread(writer.write, taken)
        except OSError as e:
            writer.put_back(taken)  # what is not on disk yet: hold it, try again later
            if (alert := outage.failed(e, writer.held_rows())) is not None:
                self._announce(alert)
            return False
        writer.last_durable = time.monotonic()
        if (alert := outage.recovered(held)) is not None:
            self._announce(alert)
        return True

    def _maybe_upkeep(self) -> None:
        if (self.upkeep is None or time.monotonic() < self.next_upkeep
                or (self.upkeeping is not None and not self.upkeeping.done())):
            return
        self.next_upkeep = time.monotonic() + self.upkeep.upkeep_interval_s
        self.upkeeping = asyncio.create_task(asyncio.to_thread(self._upkeep), name="archive-upkeep")

    def _upkeep(self) -> None:
        """(In a thread.) Merge the closed hours, then delete the expired ones (the writer's storage says how)."""
        a = self.upkeep
        for what, work in self.writer.upkeep(a, self.upkeep_stop):
            if self.upkeep_stop.is_set():
                return
            try:
                done = work()
            except Exception as e:  # a full disk, a file another tool holds: the files stay as they are
                log.warning("archive: %s failed (%s: %s); the files stay as they are, and it is tried again in "
                            "%g s", what, type(e).__name__, e, a.upkeep_interval_s)
                continue
            if done.hours or getattr(done, "recovered", 0):
                log.info("archive: %s", done.line())

    async def before_revoke(self, partitions: set[int]) -> None:  # the subscription commits right after
        if not await self.flush():
            # Not on disk: the partitions go to their new owner uncommitted, and it reads them again.
            rows = self.writer.discard(partitions)
            self.sub.forget(partitions)
            raise RuntimeError(f"archive cannot write ({self.outage.error}): partitions {sorted(partitions)} handed "
                               f"over uncommitted ({rows} rows to be read again by their new owner)")

    def wait_s(self) -> float:
        return 0.5 if self.outage.failing else max(0.05, self.next_flush - time.monotonic())

    @property
    def stalled(self) -> bool:
        return self.paused

    def add(self, messages: list[Message]) -> bool:
        writer, outage = self.writer, self.outage
        if self.sub.assignments != self.assignments:  # another archive may have written our new partitions
            self.assignments = self.sub.assignments
            writer.forget_archived()
        full = False
        for message in messages:
            if HEARTBEAT in message.headers:
                continue  # a heartbeat changes nothing (bus/base.py): not an alert state change to keep
            dataset = DATASET_OF_TOPIC[message.topic]
            if 0 <= message.offset <= writer.archived_until(dataset, message.partition):
                writer.redelivered_skipped += 1  # archived before a restart or rebalance
                continue
            full |= writer.add(dataset, message.value, message.partition, message.offset)
        if outage.failing:
            if not self.sub.holds_input:  # in-process: keep the newest within the bound, count the rest
                outage.shed(writer.shed(self.bound), self.buffer_mb)
            elif writer.held_bytes() >= self.bound:  # Kafka: stop reading (every call: assignments change)
                if not self.paused:
                    log.warning("archive: %g MB held while it cannot write (archive.outage_buffer_mb): reading "
                                "paused; nothing is committed, the rest waits on Kafka", self.buffer_mb)
                self.sub.pause()
                self.paused = True
        return outage.due() if outage.failing else (full or time.monotonic() >= self.next_flush)

    def flushed(self, durable: bool) -> None:
        if durable and self.paused:
            self.sub.resume()
            self.paused = False
        self.next_flush = time.monotonic() + self.flush_interval_s

    def abandon(self) -> None:
        log.error("archive: stopping while it cannot write (%s): %d rows held %s", self.outage.error,
                  self.writer.held_rows(), "are not committed; Kafka keeps them for the next archive"
                  if self.sub.holds_input else "are lost (counted as dropped)")
        if not self.sub.holds_input:
            self.writer.shed(0)

    async def close(self) -> None:
        if self.beating is not None:
            self.beating.cancel()
            await asyncio.gather(self.beating, return_exceptions=True)
        if self.upkeeping is not None:  # stops after the hour in progress (a killed one is finished next time)
            self.upkeep_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.upkeeping), 60.0)
        await self.alerts.drained(5.0)  # the last outage alert goes out before the role ends
        self.writer.close()


async def archive_role(writer: ArchiveBuffers, sub, flush_interval_s: float, outage: ArchiveOutage | None = None,
                       buffer_mb: float = 256.0, stop: asyncio.Event | None = None, gate=None,
                       upkeep: ArchiveConfig | None = None) -> None:
    """Every topic -> Parquet, until the topics end (see the module doc)."""
    await consume(sub, ArchiveSink(writer, sub, flush_interval_s, outage, buffer_mb, upkeep), gate, stop)


def build(ctx, spec):
    """The archive role: its writer (which creates archive/.staging) only when archive.enabled."""
    cfg = ctx.cfg
    if not cfg.archive.enabled:
        return None
    if cfg.archive.url:
        from pipeline.sinks.delta import DeltaArchiveWriter
        writer = ctx.writer = DeltaArchiveWriter.from_config(cfg.archive)
    else:
        writer = ctx.writer = ArchiveWriter(cfg.archive_dir, cfg.archive.compression, cfg.archive.max_buffer_rows,
                                            min_free_mb=cfg.archive.min_free_mb)
    writer.outage = ArchiveOutage(cfg.fleet.site, cfg.alerts.runbook_base_url, cfg.archive.retry_max_s,
                                  heartbeat_s=cfg.daemon.watchdog_heartbeat_s)
    sub = ctx.bus.subscribe(list(spec.inputs), spec.group)
    gate = ctx.gate(sub, spec.group)
    a = cfg.archive
    return lambda: archive_role(writer, sub, a.flush_interval_s, writer.outage, a.outage_buffer_mb, ctx.stop, gate, a)
