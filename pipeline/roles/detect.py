"""The detect role: telemetry in, alerts and node health out (the detector Engine), with
its state checkpointed: over Kafka per partition in the state topic, in one transaction
with the output and the input offsets; without Kafka in <data_dir>/state/.

Over Kafka it runs as two tiers (docs/kafka.md): the rack tier reads GPU telemetry,
events and facility readings (keyed by rack, aligned by event time) in consumer group
`detect`, and sends rack summaries keyed by site; the site tier reads those in group
`detect-site`. Every detect process runs both; Kafka spreads each tier's partitions.

This module imports the Engine (whose import compiles Numba kernels): only a process
that runs detect imports it (the role table names it as a string).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa

from pipeline.sinks.alerts import read_jsonl
from pipeline.bus import Bus, EndOfStream, Message, Topic
from pipeline.bus import keys
from pipeline.bus.align import ORIGIN, start_time
from pipeline.bus.batching import PacedBatches, coalesce, coalesce_by_time
from pipeline.bus import intake
from pipeline.bus.intake import Gate
from pipeline.config import Config
from pipeline.detect.checkpoint import Checkpointer, CheckpointUnreadable, LocalCheckpoint, reconcile
from pipeline.detect.engine import RACK_TIER, SITE_TIER, Engine
from pipeline.model import EVENT, NODE_HEALTH, alerts_to_batch

log = logging.getLogger("fleetwatch")


def make_detector(cfg: Config) -> tuple[Engine, LocalCheckpoint | None, list]:
    """The Engine of a detect role: over Kafka fresh (each partition's state comes from the
    state topic as it is assigned), without Kafka resumed from the data directory."""
    if cfg.kafka.bootstrap:
        return Engine(cfg, families=RACK_TIER, one_stream=False), None, []
    return resume_embedded(cfg, Engine(cfg))


def build(ctx, spec):
    """The detect role of this process: its subscription (transactional over Kafka), its
    checkpoint, its gate."""
    cfg, k = ctx.cfg, ctx.cfg.kafka
    engine, local, resolved_at_start = ctx.detector()
    if not k.bootstrap:
        sub = ctx.bus.subscribe(list(spec.inputs), spec.group)
        return lambda: detect_role(ctx.bus, engine, sub, k.commit_interval_s, None, local,
                                   cfg.daemon.checkpoint_interval_s, resolved_at_start, ctx.gate(sub, spec.group),
                                   ctx.progress.detected)
    sub = ctx.bus.subscribe(list(spec.inputs), spec.group, transactional=True, align=True)
    site = ctx.site_engine = Engine(cfg, families=SITE_TIER)
    ((site_group, site_topics),) = spec.tiers  # the site tier: rack summaries, in a group of its own
    site_sub = ctx.bus.subscribe(list(site_topics), site_group, transactional=True, align=True,
                                 upstream=(spec.group, list(spec.inputs)))
    gate = ctx.gate(sub, spec.group)

    async def both_tiers() -> None:
        site_tier = asyncio.create_task(detect_role(ctx.bus, site, site_sub, k.commit_interval_s,
                                                    Checkpointer(site, k.partitions, "site"), tier="site",
                                                    timed=ctx.progress.detected), name="detect-site")
        rack_tier = asyncio.create_task(detect_role(ctx.bus, engine, sub, k.commit_interval_s,
                                                    Checkpointer(engine, k.partitions), gate=gate,
                                                    timed=ctx.progress.detected), name="detect-rack")
        try:
            done, _ = await asyncio.wait({rack_tier, site_tier}, return_when=asyncio.FIRST_COMPLETED)
            if site_tier in done:
                site_tier.result()  # a site tier that failed fails the role
            await rack_tier
            await ctx.bus.end([Topic.RACKS])  # a finite run: the site tier drains what the rack tier sent
            await site_tier
        finally:
            for task in (rack_tier, site_tier):
                task.cancel()
    return both_tiers


async def detect_role(bus: Bus, engine: Engine, sub, commit_interval_s: float,
                      checkpoint: Checkpointer | None, local: LocalCheckpoint | None = None,
                      checkpoint_interval_s: float = 10.0, resolved_at_start: list | None = None,
                      gate: Gate | None = None, timed=None, tier: str = "rack",
                      paced: PacedBatches | None = None) -> None:
    """Telemetry in, alerts and node health out. Over Kafka the output, the input offsets
    and a checkpoint of the detector state of each partition processed commit together
    (one transaction per commit interval); a partition that moves to another detect
    process continues there from that checkpoint. In-process (`local`) the state is saved
    to the data directory every `checkpoint_interval_s` and at the end; alerts the restart
    resolved (`resolved_at_start`, checkpoint.reconcile) go out first. `timed(topic, seconds)`
    hears how long each batch took (the /metrics histogram). `paced` sizes the batches asked
    for (bus/batching.py), so that one batch does not hold the event loop's thread for long."""
    busy = asyncio.Lock()  # processing a batch and handing partitions over never interleave
    dirty: set[int] = set()  # partitions processed since their last checkpoint
    background: set[asyncio.Task] = set()  # in-process event publishes (below)
    errors = 0  # messages the detectors raised on (logged with a traceback once)

    async def publish_events(rows: list[dict], origin: int | None) -> None:
        """Events the engine found (a GPU replaced) go to the events topic, archived with the
        sources' events. Detect reads that topic too: in-process it must not wait on its own
        queue, so the publish runs beside it."""
        batch = pa.RecordBatch.from_pylist(rows, schema=EVENT)
        for m in keys.messages(Topic.EVENTS, batch, bus.keyed):
            if bus.keyed:
                await sub.publish(m, origin=origin)
            else:
                task = asyncio.create_task(sub.publish(m))
                background.add(task)
                task.add_done_callback(background.discard)

    async def detector_error(message: Message, error: Exception) -> None:
        """A message the engine raised on: logged with its traceback once, dead-lettered whole and counted
        (intake's detector_error). What the engine had taken of it before the error stays taken."""
        nonlocal errors
        what = f"{type(error).__name__}: {error}"[:300]
        errors += 1
        if errors == 1:
            log.error("detect: the detectors failed on a %s message of %d rows (%s): dead-lettered whole; the role "
                      "goes on. Further such messages are dead-lettered and counted, not logged with a traceback "
                      "(please report it: docs/data.md#bad-input)", message.topic,
                      message.value.num_rows, what, exc_info=error)
        if gate is not None:
            await gate.reject(message, intake.DETECTOR_ERROR, what)

    async def commit(partitions: set[int]) -> None:
        if checkpoint is not None:
            for p, state in checkpoint.snapshot(partitions & dirty).items():
                await sub.publish(Message(Topic.STATE, state, key=keys.checkpoint_key(p, tier)), partition=p, origin=p)
            dirty.difference_update(partitions)
        await sub.commit()

    async def restore(partitions: set[int]) -> None:
        async with busy:
            checkpoint.repartition(sub.partition_count(sub.topics[0]) or checkpoint.partitions)
            latest = await bus.read_latest(Topic.STATE, partitions, key=lambda p: keys.checkpoint_key(p, tier))
            # (What a batch processed of them after a fence, and before its hand-over, is gone too.)
            checkpoint.forget(partitions)
            held = [checkpoint.restore(m.value) for m in latest.values()]
            origins: set[int] = set()
            if tier == "site":  # wait for every rack the checkpoint knows, whoever sends first (bus/align.py)
                racks, rack_partitions = engine.inventory.rack_names, bus.partition_count(Topic.GPU)
                for p in partitions & set(latest):
                    origins |= (of_p := keys.origins(racks, p, checkpoint.partitions, rack_partitions))
                    sub.expect(p, of_p)
                for p in partitions - set(latest):  # a cold start: any rack-tier partition may hold its racks
                    sub.expect(p, set(range(rack_partitions)), maybe=True)
            log.info("detect (%s tier): assigned partitions %s; restored the detector state of %s (%d GPUs, %d nodes, "
                     "%d racks, %d alerts firing)%s%s", tier, sorted(partitions), sorted(latest),
                     *(sum(h[k] for h in held) for k in ("gpu", "node", "rack", "alerts")),
                     f"; no checkpoint yet for {sorted(partitions - set(latest))}" if partitions - set(latest) else "",
                     f"; waiting for the summaries of rack-tier partitions {sorted(origins)}" if origins else "")

    async def hand_over(partitions: set[int]) -> None:
        async with busy:
            await commit(partitions)
            checkpoint.forget(partitions)
            log.info("detect (%s tier): partitions %s revoked; their state is checkpointed and dropped here", tier,
                     sorted(partitions))

    def lost(partitions: set[int]) -> None:  # fenced: another process owns them; nothing here is committed
        checkpoint.forget(partitions)
        dirty.difference_update(partitions)

    if checkpoint is not None:
        sub.on_assigned.append(restore)
        sub.before_revoke.append(hand_over)
        sub.on_lost.append(lost)
    if resolved_at_start:
        for m in keys.messages(Topic.ALERTS, alerts_to_batch(resolved_at_start), keyed=True):
            await sub.publish(m)
    next_commit = time.monotonic() + commit_interval_s
    next_save = time.monotonic() + checkpoint_interval_s
    paced = paced or PacedBatches()
    while True:
        try:
            wake = min(next_commit, next_save) if local is not None else next_commit
            messages = await sub.get_batch(max_messages=paced.size, timeout_s=max(0.05, wake - time.monotonic()))
        except EndOfStream:
            async with busy:
                await commit(set(dirty))
            if local is not None:
                await local.save()
            await asyncio.gather(*background)
            return
        async with busy:
            batch_started = time.perf_counter()
            if gate is not None:  # bad rows are dead-lettered here, the rest goes on (bus/intake.py)
                messages = await gate.screen(messages)
            dirty.update(m.partition for m in messages)
            owners = None
            if tier == "rack" and bus.keyed and messages:
                # All partitions at once, merged in event time (each partition's order kept), so the
                # engine judges a scrape of every rack read in one pass, as in-process (a batch is
                # one time: partitions at different times, after a hand-over, stay apart); each
                # output row goes to the transaction of the partition its rack's data came in.
                owners = Owners(sub.partition_count(sub.topics[0]), set(sub.ready) | {m.partition for m in messages})
                work = [(None, m) for m in coalesce_by_tick(in_time_order(messages))]
            else:  # per input partition (over Kafka its output commits in that partition's transaction)
                work = [(p if p >= 0 else None, m) for p, of_partition in by_partition(messages).items()
                        for m in (coalesce(of_partition) if tier == "rack" else coalesce_by_time(of_partition))]
            for origin, message in work:
                await asyncio.sleep(0)  # the group's heartbeats, /healthz: a batch can take seconds
                started = time.perf_counter()
                try:
                    out = engine.process(message)
                except Exception as e:  # input no check foresaw: the rest goes on (a crash would meet it again)
                    await detector_error(message, e)
                    continue
                if timed is not None:
                    timed(message.topic, time.perf_counter() - started)
                routed = owners.group if owners is not None else (lambda rows, labels=None: [(origin, rows)])
                alerts = routed(out.alerts, lambda a: a[1].labels) if out.alerts else []
                health = routed(out.health) if out.health else []
                events = routed(out.events) if out.events else []
                # A partition given output has changed state: its checkpoint goes with it.
                dirty.update(o for o, _ in alerts + health + events if o is not None)
                # Keyed on every bus, so that an alert's changes, and a node's states, stay in
                # order (the health topic is compacted to the latest state per node).
                for o, rows in alerts:
                    for m in keys.messages(Topic.ALERTS, alerts_to_batch(rows), keyed=True):
                        await sub.publish(m, origin=o)
                for o, rows in health:
                    for m in keys.messages(Topic.HEALTH, pa.RecordBatch.from_pylist(rows, schema=NODE_HEALTH),
                                           keyed=True):
                        await sub.publish(m, origin=o)
                for o, rows in events:
                    await publish_events(rows, o)
                if out.racks is not None:  # the site tier runs apart (over Kafka); it aligns by origin
                    for m in keys.messages(Topic.RACKS, out.racks, keyed=True):
                        for o, rows in owners.split(m.value) if owners is not None else [(origin, m.value)]:
                            await sub.publish(replace(m, value=rows, headers={ORIGIN: str(o)}), origin=o)
            paced.took(len(messages), time.perf_counter() - batch_started)
            if time.monotonic() >= next_commit:
                await commit(set(dirty))
                next_commit = time.monotonic() + commit_interval_s
            if local is not None and time.monotonic() >= next_save:
                await local.save()
                next_save = time.monotonic() + checkpoint_interval_s



def in_time_order(messages: list[Message]) -> list[Message]:
    """Messages of several partitions merged by (earliest ts, topic), each partition's kept in
    its order (the aligner's, which is that order already)."""
    rank = {Topic.GPU: 0, Topic.FACILITY: 1, Topic.EVENTS: 2}
    parts = by_partition(messages)
    if len(parts) < 2:
        return messages
    return list(heapq.merge(*parts.values(), key=lambda m: (start_time(m.value), rank.get(m.topic, 3))))


def coalesce_by_tick(messages: list[Message]) -> list[Message]:
    """coalesce() within each run of consecutive messages of one topic and one earliest ts."""
    out: list[Message] = []
    run: list[Message] = []
    last = None
    for m in messages:
        tick = (m.topic, start_time(m.value))
        if run and tick != last:
            out += coalesce(run)
            run = []
        run.append(m)
        last = tick
    return out + coalesce(run) if run else out


class Owners:
    """Where an output row commits when one engine call judged several input partitions:
    in the transaction of the partition its rack's data came in (bus/keys.py: its rack, or
    its site without one), which this process holds; a row of no rack it holds goes with
    the lowest partition it holds."""

    def __init__(self, partitions: int, held: set[int]) -> None:
        self.partitions, self.held, self.fallback = partitions, held, min(held)

    def of(self, site: str | None, rack: str | None) -> int:
        p = keys.partition_for(keys.rack_key(site, rack), self.partitions)
        return p if p in self.held else self.fallback

    def group(self, rows: list, labels=lambda row: row) -> list[tuple[int, list]]:
        """`rows` grouped by owner (each row's labels: a dict with site and rack), in order."""
        out: dict[int, list] = {}
        for r in rows:
            lab = labels(r)
            out.setdefault(self.of(lab.get("site"), lab.get("rack")), []).append(r)
        return list(out.items())

    def split(self, batch: pa.RecordBatch) -> list[tuple[int, pa.RecordBatch]]:
        """A batch of rack summaries cut by owner."""
        part = np.fromiter((self.of(s, r) for s, r in zip(batch.column("site").to_pylist(),
                                                          batch.column("rack").to_pylist())), np.int64, batch.num_rows)
        return [(int(p), batch.filter(pa.array(part == p))) for p in np.unique(part)]


def by_partition(messages: list[Message]) -> dict[int, list[Message]]:
    """Messages grouped by the partition they came from, in order within each."""
    out: dict[int, list[Message]] = {}
    for m in messages:
        out.setdefault(m.partition, []).append(m)
    return out


def resume_embedded(cfg: Config, engine: Engine) -> tuple[Engine, LocalCheckpoint, list]:
    """Without Kafka: restore the detector and alert state the last run saved in
    <data_dir>/state/ (an unreadable file is moved aside: a cold start), then make the
    firing alerts agree with alerts.jsonl (checkpoint.reconcile); returns the engine, its
    checkpoint and the alerts to resolve now."""
    local = LocalCheckpoint(engine, cfg.state_dir)
    try:
        held = local.restore()
    except CheckpointUnreadable:  # failed half-way: a fresh engine
        engine = Engine(cfg)
        local, held = LocalCheckpoint(engine, cfg.state_dir), None
    if held is not None:
        log.info("detect: restored the detector state from %s (%d GPUs, %d nodes, %d racks, %d alerts firing)",
                 local.path, held["gpu"], held["node"], held["rack"], held["alerts"])
    try:
        logged, _ = read_jsonl(cfg.alerts_log)
    except FileNotFoundError:
        logged = {}
    except OSError as e:
        log.warning("detect: cannot read %s (%s); the restored alerts are not checked against it", cfg.alerts_log, e)
        return engine, local, []
    return engine, local, reconcile(engine, logged, max(time.time(), engine.latest_data_time() or 0.0))
