"""Wires the roles together over a bus and runs them until told to stop.

Roles (each one asyncio task here; each its own process with Kafka between them
at scale, same code):
  simulate fleet simulator -> gpu, facility, events, labels topics
  agent    this node's GPUs through NVML -> gpu, events topics
  facility a BMS's MQTT topic tree -> facility topic (with mqtt.broker set, the
           simulator publishes its facility data on that tree instead of the bus)
  detect   gpu, facility, events -> Engine -> alerts, health topics
  archive  every topic -> Parquet archive (flushed on an interval, off the loop)
  notify   alerts -> console, alerts.jsonl, receivers (durable outboxes; sinks/notify.py)
  status   live status line on a terminal, periodic log lines otherwise

`fleetwatch run` runs a source (daemon.source: simulate or the NVML agent) and the
other roles; `fleetwatch simulate|agent|detect|archive|notify` runs one (Kafka between the processes; any number of detect, archive and notify
processes share the work through their consumer groups).

Shutdown (SIGINT, SIGTERM, SIGHUP or --duration) drains in data order: the source stops,
its topics end, detect finishes what it has and ends its topics, then archive and
notify finish and flush. A process without the source drains what was on the bus
when it was told to stop. Nothing accepted is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.analytics.alerts_table import read_jsonl
from pipeline.bus import Bus, EndOfStream, MemoryBus, Message, Topic
from pipeline.bus.batching import coalesce, split_by
from pipeline.bus.intake import Gate, TimeWindow, dead_letters_for
from pipeline.bus.kafka import KafkaBus
from pipeline.config import Config, ConfigError, host_port
from pipeline.detect.checkpoint import Checkpointer, CheckpointUnreadable, LocalCheckpoint, reconcile
from pipeline.detect.engine import Engine
from pipeline.model import EVENT, NODE_HEALTH, alert_rows, alerts_to_batch
from pipeline.sinks.console import Console
from pipeline.sinks.notify import Notifier
from pipeline.sinks.archive_outage import ArchiveOutage
from pipeline.sinks.parquet import ArchiveWriter
from pipeline.sources.bms import BmsPublisher
from pipeline.sources.mqtt import MqttCollector
from pipeline.sources.nvml import NvmlAgent
from pipeline.sources.nvml_replay import NvmlReplay
from pipeline.sources.simulate import FleetSimulator

log = logging.getLogger("fleetwatch")

DATASET_OF_TOPIC = {Topic.GPU: "gpu_samples", Topic.FACILITY: "facility_samples", Topic.EVENTS: "events",
                    Topic.ALERTS: "alerts", Topic.HEALTH: "node_health", Topic.LABELS: "fault_labels"}
ROLES = ("simulate", "agent", "facility", "detect", "archive", "notify")
SOURCE_ROLES = {"simulate": "simulate", "nvml": "agent"}  # daemon.source -> its role
SOURCE_TOPICS = [Topic.GPU, Topic.FACILITY, Topic.EVENTS, Topic.LABELS]
DETECT_TOPICS = [Topic.ALERTS, Topic.HEALTH]


@dataclass
class RunSummary:
    gpu_samples: int          # processed by detect
    wall_s: float
    alerts_fired: int
    rows_archived: dict[str, int]
    gpu_samples_published: int = 0  # produced by the source


async def simulate_role(bus: Bus, sim: FleetSimulator, stop: asyncio.Event, speed: float, summary: RunSummary,
                        bms: BmsPublisher | None) -> None:
    """Publish one scrape per sample interval, paced to `speed` x real time (0 = flat out).
    On a keyed bus (Kafka) a message per node (GPU telemetry) and per rack (facility),
    keyed by it; in-process, where order needs no keys, the fleet's scrape as one message.
    With a BMS publisher the facility readings go out on MQTT instead, as a real site's do."""
    if bms is None:
        await _simulate(bus, sim, stop, speed, summary, None)
    else:  # the publisher drains its buffer after the stop
        await asyncio.gather(_simulate(bus, sim, stop, speed, summary, bms), bms.run(stop))


async def _simulate(bus: Bus, sim: FleetSimulator, stop: asyncio.Event, speed: float, summary: RunSummary,
                    bms: BmsPublisher | None) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        tick = sim.step()
        messages = keyed_messages(bus, Topic.GPU, tick.gpu, "node")
        if bms is not None:
            bms.publish(tick.facility)
        else:
            messages += facility_messages(bus, tick.facility)
        if tick.events is not None:  # a node's events go where its telemetry goes
            messages += keyed_messages(bus, Topic.EVENTS, tick.events, "node")
        for message in messages:
            await bus.publish(message)
        summary.gpu_samples_published += tick.gpu.num_rows
        if tick.labels is not None:
            await bus.publish(Message(Topic.LABELS, tick.labels))
        if speed > 0:
            delay = t0 + sim.t / speed - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                continue
        await asyncio.sleep(0)  # behind schedule or flat out: let the consumers run


def keyed_messages(bus: Bus, topic: Topic, batch: pa.RecordBatch, column: str) -> list[Message]:
    """A message per run of `column` (keyed by it) on a keyed bus; the batch as one
    message in-process, where order needs no keys."""
    return split_by(topic, batch, column) if bus.keyed else [Message(topic, batch)]


def facility_messages(bus: Bus, batch: pa.RecordBatch) -> list[Message]:
    """Facility readings as messages: keyed by rack on a keyed bus (site-level devices
    have no rack: keyed by site), one message in-process."""
    if not bus.keyed:
        return [Message(Topic.FACILITY, batch)]
    keys = pc.if_else(pc.equal(batch.column("rack"), ""), batch.column("site"), batch.column("rack"))
    order = pc.sort_indices(keys)  # stable: each key's readings keep their order
    batch = batch.take(order).append_column("_key", keys.take(order))
    return [Message(m.topic, m.value.drop_columns(["_key"]), m.key) for m in split_by(Topic.FACILITY, batch, "_key")]


async def facility_role(bus: Bus, collector: MqttCollector, stop: asyncio.Event) -> None:
    async def publish(batch: pa.RecordBatch) -> None:
        for message in facility_messages(bus, batch):
            await bus.publish(message)
    await collector.run(publish, stop)


async def agent_role(bus: Bus, agent: NvmlAgent, stop: asyncio.Event, summary: RunSummary,
                     replay: NvmlReplay | None) -> None:
    """Publish this node's scrapes (one message, keyed by node) and its events."""
    async def samples(batch: pa.RecordBatch) -> None:
        await bus.publish(Message(Topic.GPU, batch, key=agent.node))
        summary.gpu_samples_published += batch.num_rows

    async def events(batch: pa.RecordBatch) -> None:
        await bus.publish(Message(Topic.EVENTS, batch, key=agent.node))
    with replay.installed() if replay is not None else contextlib.nullcontext():
        await agent.run(samples, events, stop)


async def detect_role(bus: Bus, engine: Engine, sub, commit_interval_s: float,
                      checkpoint: Checkpointer | None, local: LocalCheckpoint | None = None,
                      checkpoint_interval_s: float = 10.0, resolved_at_start: list | None = None,
                      gate: Gate | None = None) -> None:
    """Telemetry in, alerts and node health out. Over Kafka the output, the input offsets
    and a checkpoint of the detector state of each partition processed commit together
    (one transaction per commit interval); a partition that moves to another detect
    process continues there from that checkpoint. In-process (`local`) the state is saved
    to the data directory every `checkpoint_interval_s` and at the end; alerts the restart
    resolved (`resolved_at_start`, checkpoint.reconcile) go out first."""
    busy = asyncio.Lock()  # processing a batch and handing partitions over never interleave
    dirty: set[int] = set()  # partitions processed since their last checkpoint
    background: set[asyncio.Task] = set()  # in-process event publishes (below)

    async def publish_events(rows: list[dict]) -> None:
        """Events the engine found (a GPU replaced) go to the events topic, archived with the
        sources' events. Detect reads that topic too: in-process it must not wait on its own
        queue, so the publish runs beside it."""
        batch = pa.RecordBatch.from_pylist(rows, schema=EVENT)
        for m in keyed_messages(bus, Topic.EVENTS, batch, "node"):
            if bus.keyed:
                await sub.publish(m)
            else:
                task = asyncio.create_task(sub.publish(m))
                background.add(task)
                task.add_done_callback(background.discard)

    async def commit(partitions: set[int]) -> None:
        if checkpoint is not None:
            for p, state in checkpoint.snapshot(partitions & dirty).items():
                await sub.publish(Message(Topic.STATE, state, key=str(p)), partition=p)
            dirty.difference_update(partitions)
        await sub.commit()

    async def restore(partitions: set[int]) -> None:
        async with busy:
            checkpoint.partitions = sub.partition_count(Topic.GPU) or checkpoint.partitions
            latest = await bus.read_latest(Topic.STATE, partitions)
            held = [checkpoint.restore(m.value) for m in latest.values()]
            log.info("detect: assigned partitions %s; restored the detector state of %s (%d GPUs, %d nodes, "
                     "%d racks, %d alerts firing)%s", sorted(partitions), sorted(latest),
                     *(sum(h[k] for h in held) for k in ("gpu", "node", "rack", "alerts")),
                     f"; no checkpoint yet for {sorted(partitions - set(latest))}" if partitions - set(latest) else "")

    async def hand_over(partitions: set[int]) -> None:
        async with busy:
            await commit(partitions)
            checkpoint.forget(partitions)
            log.info("detect: partitions %s revoked; their state is checkpointed and dropped here", sorted(partitions))

    if checkpoint is not None:
        sub.on_assigned.append(restore)
        sub.before_revoke.append(hand_over)
    if resolved_at_start:
        for m in split_by(Topic.ALERTS, alerts_to_batch(resolved_at_start), "fingerprint"):
            await sub.publish(m)
    next_commit = time.monotonic() + commit_interval_s
    next_save = time.monotonic() + checkpoint_interval_s
    while True:
        try:
            wake = min(next_commit, next_save) if local is not None else next_commit
            messages = await sub.get_batch(timeout_s=max(0.05, wake - time.monotonic()))
        except EndOfStream:
            async with busy:
                await commit(set(dirty))
            if local is not None:
                await local.save()
            await asyncio.gather(*background)
            return
        async with busy:
            if gate is not None:  # bad rows are dead-lettered here, the rest goes on (bus/intake.py)
                messages = await gate.screen(messages)
            dirty.update(m.partition for m in messages)
            for message in coalesce(messages):
                out = engine.process(message)
                # Keyed so that an alert's changes, and a node's states, stay in order (the
                # health topic is compacted to the latest state per node).
                if out.alerts:
                    for m in split_by(Topic.ALERTS, alerts_to_batch(out.alerts), "fingerprint"):
                        await sub.publish(m)
                if out.health:
                    for m in split_by(Topic.HEALTH, pa.RecordBatch.from_pylist(out.health, schema=NODE_HEALTH),
                                      "node"):
                        await sub.publish(m)
                if out.events:
                    await publish_events(out.events)
            if time.monotonic() >= next_commit:
                await commit(set(dirty))
                next_commit = time.monotonic() + commit_interval_s
            if local is not None and time.monotonic() >= next_save:
                await local.save()
                next_save = time.monotonic() + checkpoint_interval_s


async def archive_role(writer: ArchiveWriter, sub, flush_interval_s: float, outage: ArchiveOutage | None = None,
                       buffer_mb: float = 256.0, stop: asyncio.Event | None = None,
                       gate: Gate | None = None) -> None:
    """Every topic -> Parquet. A write that fails (full disk, permissions, archive/ gone)
    stops nothing: what it took goes back into the buffers, nothing is committed, and
    the archive retries with backoff and raises FleetwatchArchiveFailing (archive_outage.py).
    What it holds meanwhile is bounded by `buffer_mb`: in-process the oldest rows are
    dropped (counted); over Kafka reading pauses, and the data waits on Kafka."""
    outage = outage or ArchiveOutage("", "", 30.0)
    bound = int(buffer_mb * 2**20)
    consumer = getattr(sub, "consumer", None)  # Kafka: partitions pause instead of dropping data
    paused = False
    durable = asyncio.Lock()  # a flush and a rebalance never interleave
    alerts: asyncio.Task | None = None  # publishes outage alerts in order, off the archive's loop

    def announce(alert) -> None:
        nonlocal alerts
        before = alerts

        async def publish() -> None:
            if before is not None:
                await before
            await sub.publish(ArchiveOutage.message(alert))
        alerts = asyncio.create_task(publish(), name="archive-alert")

    async def write_buffers() -> bool:
        # Take the buffers on the loop, write them in a thread: the loop never waits on disk.
        held, taken = writer.held_rows(), writer.take()
        if not taken:
            return True
        try:
            await asyncio.to_thread(writer.write, taken)
        except OSError as e:
            writer.put_back(taken)  # what is not on disk yet: hold it, try again later
            if (alert := outage.failed(e, writer.held_rows())) is not None:
                announce(alert)
            return False
        if (alert := outage.recovered(held)) is not None:
            announce(alert)
        return True

    async def flush_and_commit() -> bool:
        async with durable:
            if not await write_buffers():
                return False
            await sub.commit()  # only now is the data durable
            return True

    async def before_revoke(partitions: set[int]) -> None:  # the subscription commits right after
        async with durable:
            if not await write_buffers():
                # Not on disk: the partitions go to their new owner uncommitted, and it reads them again.
                rows = writer.discard(partitions)
                to_commit = getattr(sub, "_to_commit", {})
                for tp in [tp for tp in to_commit if tp.partition in partitions]:
                    del to_commit[tp]
                raise RuntimeError(f"archive cannot write ({outage.error}): partitions {sorted(partitions)} handed "
                                   f"over uncommitted ({rows} rows to be read again by their new owner)")
    sub.before_revoke.append(before_revoke)

    next_flush = time.monotonic() + flush_interval_s
    assignments = sub.assignments
    try:
        while True:
            if paused and stop is not None and stop.is_set() and not await flush_and_commit():
                log.error("archive: stopping while it cannot write (%s): %d rows held are not committed; Kafka "
                          "keeps them for the next archive", outage.error, writer.held_rows())
                return
            try:
                messages = await sub.get_batch(timeout_s=0.5 if outage.failing
                                               else max(0.05, next_flush - time.monotonic()))
            except EndOfStream:
                if not await flush_and_commit():
                    log.error("archive: stopping while it cannot write (%s): %d rows held %s", outage.error,
                              writer.held_rows(), "are not committed; Kafka keeps them for the next archive"
                              if consumer is not None else "are lost (counted as dropped)")
                    if consumer is None:
                        writer.shed(0)
                return
            if gate is not None:  # bad rows are dead-lettered here, the rest goes on (bus/intake.py)
                messages = await gate.screen(messages)
            if sub.assignments != assignments:  # another archive may have written our new partitions
                assignments = sub.assignments
                writer.forget_archived()
            full = False
            for message in messages:
                dataset = DATASET_OF_TOPIC[message.topic]
                if 0 <= message.offset <= writer.archived_until(dataset, message.partition):
                    writer.redelivered_skipped += 1  # archived before a restart or rebalance
                    continue
                full |= writer.add(dataset, message.value, message.partition, message.offset)
            if outage.failing:
                if consumer is None:  # in-process: keep the newest within the bound, count the rest
                    outage.shed(writer.shed(bound), buffer_mb)
                elif writer.held_bytes() >= bound:  # Kafka: stop reading (every call: assignments change)
                    if not paused:
                        log.warning("archive: %g MB held while it cannot write (archive.outage_buffer_mb): reading "
                                    "paused; nothing is committed, the rest waits on Kafka", buffer_mb)
                    consumer.pause(*consumer.assignment())
                    paused = True
            if outage.due() if outage.failing else (full or time.monotonic() >= next_flush):
                if await flush_and_commit() and paused:
                    consumer.resume(*consumer.assignment())
                    paused = False
                next_flush = time.monotonic() + flush_interval_s
    finally:
        if alerts is not None:  # the last outage alert goes out before the role ends
            with contextlib.suppress(Exception):
                await asyncio.wait_for(alerts, 5.0)


async def notify_role(sub, notifier: Notifier, gate: Gate | None = None, retry_max_s: float = 30.0) -> None:
    """Alerts in; the offsets are committed once the console, alerts.jsonl, the receivers'
    outboxes and the routing state have them (until then the alerts topic is the outbox).
    A disk that cannot take them (full, read-only) stops nothing: the batch is tried again
    with backoff until it can, and nothing is committed meanwhile."""
    await notifier.start()
    try:
        while True:
            try:
                messages = await sub.get_batch()
            except EndOfStream:
                return
            if gate is not None:  # bad rows are dead-lettered here, the rest goes on (bus/intake.py)
                messages = await gate.screen(messages)
            alerts = [a for m in messages for a in alert_rows(m.value)]
            delay, failed_since = 0.5, None
            while True:
                try:
                    await notifier.handle(alerts, retry=failed_since is not None)
                    break
                except OSError as e:
                    if failed_since is None:
                        failed_since = time.monotonic()
                        log.error("notify: cannot write alerts.jsonl or the outboxes under %s (%s): %d alert "
                                  "changes shown on the console wait to be made durable and sent; retrying with "
                                  "backoff. Free space or fix permissions there", notifier.data,
                                  e.strerror or e, len(alerts))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, retry_max_s)
            if failed_since is not None:
                log.warning("notify: writing again after %.0f s; the held alert changes are durable and on their way",
                            time.monotonic() - failed_since)
            await sub.commit()
    finally:
        await notifier.close()


@dataclass
class Inputs:
    """Where this process's data comes from, besides the simulator itself."""
    agent: NvmlAgent | None          # this node's GPUs (role agent)
    replay: NvmlReplay | None        # recorded NVML data in place of the GPUs
    bms: BmsPublisher | None         # the simulator's facility data, out on MQTT
    collector: MqttCollector | None  # facility data, in from MQTT (role facility)

    @classmethod
    def build(cls, cfg: Config, roles: frozenset[str], window: TimeWindow | None = None) -> "Inputs":
        a, m = cfg.agent, cfg.mqtt
        agent = NvmlAgent(a, a.node or socket.gethostname()) if "agent" in roles else None
        mqtt = host_port("mqtt.broker", m.broker, 1883) if m.broker else None
        return cls(
            agent, NvmlReplay(a.replay, a.replay_gpus) if agent is not None and a.replay else None,
            BmsPublisher(*mqtt, client_id=f"fleetwatch-bms-sim-{cfg.fleet.site}", topic_root=m.topic_root)
            if mqtt and "simulate" in roles else None,
            MqttCollector(*mqtt, site=m.site or cfg.fleet.site, dead_letter_path=cfg.mqtt_dead_letters,
                          client_id=m.client_id or None, topic_root=m.topic_root, window=window)
            if mqtt and "facility" in roles else None)

    def describe(self, cfg: Config, roles: frozenset[str]) -> str:
        f, broker = cfg.fleet, cfg.mqtt.broker
        return ", ".join(filter(None, [
            f"NVML agent on {self.agent.node}" + (f" (replaying {cfg.agent.replay})" if self.replay else "")
            if self.agent else "",
            f"{f.racks} racks x {f.nodes_per_rack} nodes x {f.gpus_per_node} GPUs simulated"
            + (f" (facility data on MQTT at {broker})" if self.bms else "") if "simulate" in roles else "",
            f"facility data from MQTT at {broker} ({self.collector.subscription})" if self.collector else ""])) \
            or "no source"


def _log_summary(cfg: Config, summary: RunSummary, engine: Engine, writer: ArchiveWriter, bus: Bus | None,
                 bms: BmsPublisher | None, collector: MqttCollector | None) -> None:
    invalid = engine.stats.invalid_values
    log.info("stopped after %.1f s: %d GPU samples published, %d GPU samples, %d alerts raised, %d rows archived "
             "in %d files, %d invalid values skipped%s, %d messages dead-lettered, %d redelivered messages already "
             "archived%s", summary.wall_s, summary.gpu_samples_published, summary.gpu_samples, summary.alerts_fired,
             sum(summary.rows_archived.values()),
             writer.files_written, sum(invalid.values()), f" {invalid}" if invalid else "",
             bus.dead_letters if bus is not None else 0, writer.redelivered_skipped,
             f", producer outbox peak {bus.outbox_peak_bytes / 2**20:.1f} MB, {bus.delivery_failures} messages "
             f"Kafka rejected" if isinstance(bus, KafkaBus) else "")
    if writer.outage is not None and (writer.outage.failures or any(writer.rows_dropped.values())):
        log.warning("archive: %d failed write attempts in %d outages, %d rows dropped%s", writer.outage.failures,
                    writer.outage.outages, sum(writer.rows_dropped.values()),
                    f" {({k: v for k, v in writer.rows_dropped.items() if v})}" if any(writer.rows_dropped.values())
                    else "")
    if bms is not None:
        log.info("BMS simulator: %d facility readings published on MQTT, %d dropped (buffer full)",
                 bms.stats.readings, bms.stats.dropped)
    if collector is not None:
        c = collector.stats
        log.info("facility collector: %d MQTT messages, %d facility readings collected, %d duplicates dropped, "
                 "%d dead-lettered%s to %s, %d reconnects", c.messages, c.rows, c.duplicates,
                 sum(c.dead_letters.values()), f" {c.dead_letters}" if c.dead_letters else "", cfg.mqtt_dead_letters,
                 c.reconnects)


async def _quiet(count, quiet_s: float = 0.5, at_most_s: float = 10.0) -> None:
    """Wait until count() stops changing for quiet_s (at most at_most_s)."""
    deadline = time.monotonic() + at_most_s
    last = count()
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        if count() == last:
            return
        last = count()


def status_text(roles: frozenset[str], engine: Engine, rate: float, sim: FleetSimulator,
                writer: ArchiveWriter, summary: RunSummary, notifier: Notifier | None) -> str:
    parts = ["fleetwatch"]
    if "simulate" in roles:
        parts.append(f"sim {sim.now:%Y-%m-%d %H:%M:%S}")
    if "agent" in roles and "detect" not in roles:
        parts.append(f"{summary.gpu_samples_published:,} GPU samples scraped")
    if "detect" in roles:
        h = engine.health.counts(len(engine.node_names))
        parts += [f"{rate:,.0f} GPU samples/s",
                  f"alerts firing {len(engine.active_alerts())} (raised {engine.stats.alerts_fired})",
                  f"nodes healthy {h['healthy']} suspect {h['suspect']} failing {h['failing']}"]
    elif "simulate" in roles:
        parts.append(f"{summary.gpu_samples_published:,} GPU samples published")
    if "archive" in roles and not whole(roles):
        parts.append(f"{sum(writer.rows_written.values()):,} rows archived")
    if "archive" in roles and writer.outage is not None and (
            trouble := writer.outage.status(writer.held_rows(), sum(writer.rows_dropped.values()))):
        parts.append(trouble)
    if notifier is not None and notifier.deliveries:
        d = notifier.stats
        parts.append(f"alerts delivered {d.delivered} pending {d.pending}"
                     + (f" dead-lettered {d.dead_lettered}" if d.dead_lettered else ""))
    return "  ".join(parts)


async def status_role(roles: frozenset[str], engine: Engine, sim: FleetSimulator, writer: ArchiveWriter,
                      summary: RunSummary, notifier: Notifier | None, console: Console, interval_s: float,
                      stop: asyncio.Event) -> None:
    period = 1.0 if console.tty else interval_s
    last_n, last_t = engine.stats.gpu_samples, time.monotonic()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), period)
        except TimeoutError:
            pass
        now = time.monotonic()
        rate = (engine.stats.gpu_samples - last_n) / max(now - last_t, 1e-9)
        last_n, last_t = engine.stats.gpu_samples, now
        text = status_text(roles, engine, rate, sim, writer, summary, notifier)
        if console.tty:
            console.status(text)
        else:
            log.info(text)


def resume_embedded(cfg: Config, engine: Engine) -> tuple[Engine, LocalCheckpoint, list]:
    """Without Kafka: restore the detector and alert state the last run saved in
    <data_dir>/state/ (an unreadable file is moved aside: a cold start), then make the
    firing alerts agree with alerts.jsonl (checkpoint.reconcile); returns the engine, its
    checkpoint and the alerts to resolve now."""
    local = LocalCheckpoint(engine, cfg.state_dir)
    try:
        held = local.restore()
    except CheckpointUnreadable:  # failed half-way: a fresh engine
        engine = Engine(cfg, node_staleness=engine.node_staleness)
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


def intake_window(cfg: Config, roles: frozenset[str], sim: FleetSimulator) -> TimeWindow:
    """The window readings must lie in (intake.*), around the receiver's clock: the
    simulator's where it runs in this process (it runs faster or slower than real time,
    from wherever it started), the wall clock otherwise. A process that only consumes a
    simulator at fleet.speed != 1 cannot know that clock: it sets no limit ahead."""
    i = cfg.intake
    if "simulate" in roles:
        return TimeWindow(i.max_ahead_s, i.max_age_s, lambda: sim.now.timestamp())
    return TimeWindow(i.max_ahead_s if cfg.fleet.speed == 1 else 0.0, i.max_age_s, time.time)


def run_roles(cfg: Config) -> frozenset[str]:
    """What `fleetwatch run` runs: the configured source (and the MQTT facility
    collector when there is a broker to read) and every consumer role."""
    return frozenset({SOURCE_ROLES[cfg.daemon.source], "detect", "archive", "notify"}
                     | ({"facility"} if cfg.mqtt.broker else set()))


def whole(roles: frozenset[str]) -> bool:
    """A source and every consumer in one process: the in-process bus will do."""
    return {"detect", "archive", "notify"} <= roles and bool(roles & {"simulate", "agent", "facility"})


def check_roles(cfg: Config, roles: frozenset[str]) -> None:
    """Roles apart need a bus between processes; the facility role needs a broker to read."""
    if "facility" in roles and not cfg.mqtt.broker:
        raise ConfigError("the facility role reads a BMS's MQTT broker: give --mqtt HOST:PORT (mqtt.broker)")
    if not whole(roles) and not cfg.kafka.bootstrap:
        raise ConfigError(f"the {'/'.join(sorted(roles))} role alone needs Kafka between the processes: "
                          f"give --kafka HOST:PORT (kafka.bootstrap), or use `fleetwatch run`")


SIGNAL_REPEAT_S = 3.0  # signals this close to the first are one stop request


class StopRequests:
    """SIGINT, SIGTERM and SIGHUP ask the daemon to stop: it drains the pipeline and exits 0.
    Signals within repeat_s of the first are that same request: `timeout` sends SIGTERM to the
    process and then to its process group, a terminal's Ctrl-C reaches every process of the
    foreground group, systemd and an operator may cross. A signal later than that is a
    deliberate second request: exit at once, without draining (on_signal says 'exit').
    `clock` is injectable (tests)."""

    def __init__(self, repeat_s: float = SIGNAL_REPEAT_S, clock=time.monotonic) -> None:
        self.repeat_s = repeat_s
        self.clock = clock
        self.first: float | None = None

    def on_signal(self) -> str:
        """'stop' (the first signal), 'same' (one within repeat_s of it) or 'exit' (a later one)."""
        now = self.clock()
        if self.first is None:
            self.first = now
            return "stop"
        return "same" if now - self.first < self.repeat_s else "exit"


async def run_daemon(cfg: Config, duration_s: float | None = None, console: Console | None = None,
                     roles: frozenset[str] | None = None) -> RunSummary:
    roles = run_roles(cfg) if roles is None else roles
    check_roles(cfg, roles)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    requests = StopRequests()

    def on_signal(sig: signal.Signals) -> None:
        what = requests.on_signal()
        if what == "exit":  # a deliberate second request while draining: the user wants out now
            log.warning("%s again: exiting without draining; unflushed data is lost", sig.name)
            os._exit(130)
        if what == "same":
            log.info("%s: part of the same stop request (signals within %g s of the first are one)", sig.name,
                     requests.repeat_s)
            return
        log.info("%s: stopping (another signal, %g s or more from now, exits at once without draining)",
                 sig.name, requests.repeat_s)
        stop.set()
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    console = console or Console()
    started = time.monotonic()
    bus: Bus | None = None
    bms = collector = None
    summary = RunSummary(0, 0.0, 0, {})
    gates: list[Gate] = []
    try:
        notifier = Notifier(cfg, console if cfg.alerts.console else None) if "notify" in roles else None
        k = cfg.kafka
        engine = Engine(cfg, node_staleness=not k.bootstrap)
        local, resolved_at_start = None, []
        if "detect" in roles and not k.bootstrap:  # over Kafka the state topic has it
            engine, local, resolved_at_start = resume_embedded(cfg, engine)
        resumed = engine.latest_data_time()  # the simulated fleet goes on from where it was
        sim = FleetSimulator(cfg.fleet, start=datetime.fromtimestamp(max(time.time(), resumed), timezone.utc)
                             if resumed is not None else None)
        bus = (KafkaBus(k.bootstrap, k.partitions, k.retention_hours, prefix=k.topic_prefix, buffer_mb=k.buffer_mb,
                        connect_timeout_s=k.connect_timeout_s) if k.bootstrap else MemoryBus())
        await bus.start()
        writer = ArchiveWriter(cfg.archive_dir, cfg.archive.compression, cfg.archive.max_buffer_rows,
                               min_free_mb=cfg.archive.min_free_mb)
        writer.outage = ArchiveOutage(cfg.fleet.site, cfg.alerts.runbook_base_url, cfg.archive.retry_max_s)
        window = intake_window(cfg, roles, sim)

        def gate(sub, group: str) -> Gate:
            gates.append(Gate(group, dead_letters_for(sub, cfg.data_dir), window))
            return gates[-1]
        inputs = Inputs.build(cfg, roles, window)
        agent, replay, bms, collector = inputs.agent, inputs.replay, inputs.bms, inputs.collector
        log.info("fleetwatch running %s: %s, bus %s, archive %s, alerts %s",
                 "all roles" if whole(roles) else "role " + "/".join(sorted(roles)), inputs.describe(cfg, roles),
                 f"Kafka at {k.bootstrap}" if k.bootstrap else "in-process", cfg.archive_dir, cfg.alerts_log)

        sources: list[asyncio.Task] = []
        facility = detect = None
        facility_stop = asyncio.Event()  # the collector stops after the sources (data order)
        sinks = []
        if collector is not None:
            facility = asyncio.create_task(facility_role(bus, collector, facility_stop), name="facility")
            if bms is not None:  # the broker keeps readings only for sessions that exist: subscribe first
                subscribed = asyncio.create_task(collector.subscribed.wait())
                await asyncio.wait([subscribed, facility], timeout=k.connect_timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not subscribed.done():
                    subscribed.cancel()
                    log.warning("MQTT at %s: not subscribed after %g s; starting the simulator anyway (its first "
                                "readings may be lost)", cfg.mqtt.broker, k.connect_timeout_s)
        if "simulate" in roles:
            sources.append(asyncio.create_task(simulate_role(bus, sim, stop, cfg.fleet.speed, summary, bms),
                                               name="simulate"))
        if agent is not None:
            sources.append(asyncio.create_task(agent_role(bus, agent, stop, summary, replay), name="agent"))
        if "detect" in roles:
            detect_topics = [Topic.GPU, Topic.FACILITY, Topic.EVENTS]
            if k.bootstrap:
                detect_sub = bus.subscribe(detect_topics, "detect", transactional=True)
                checkpoint = Checkpointer(engine, k.partitions)
            else:
                detect_sub, checkpoint = bus.subscribe(detect_topics, "detect"), None
            detect = asyncio.create_task(detect_role(bus, engine, detect_sub, k.commit_interval_s, checkpoint, local,
                                                     cfg.daemon.checkpoint_interval_s, resolved_at_start,
                                                     gate(detect_sub, "detect")),
                                         name="detect")
        if "notify" in roles:
            notify_sub = bus.subscribe([Topic.ALERTS], "notify")
            sinks.append(asyncio.create_task(notify_role(notify_sub, notifier, gate(notify_sub, "notify")),
                                             name="notify"))
        if "archive" in roles and cfg.archive.enabled:
            archive_sub = bus.subscribe(list(DATASET_OF_TOPIC), "archive")
            sinks.append(asyncio.create_task(archive_role(writer, archive_sub, cfg.archive.flush_interval_s,
                                                          writer.outage, cfg.archive.outage_buffer_mb, stop,
                                                          gate(archive_sub, "archive")),
                                             name="archive"))
        status = asyncio.create_task(status_role(roles, engine, sim, writer, summary, notifier, console,
                                                 cfg.daemon.status_interval_s, stop), name="status")
        everything = [t for t in (*sources, facility, detect, *sinks) if t is not None]
        stopper = asyncio.create_task(stop.wait())
        timer = asyncio.create_task(asyncio.sleep(duration_s if duration_s is not None else 1e12))
        done, _ = await asyncio.wait([*everything, stopper, timer], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        timer.cancel()
        failed = [t for t in done & set(everything) if t.exception() is not None]
        if failed:  # a role died: say which (setup errors say it themselves), stop the rest, exit non-zero
            if not isinstance(failed[0].exception(), ConfigError):
                log.error("role %s failed: %r", failed[0].get_name(), failed[0].exception())
            facility_stop.set()
            for task in [*everything, status]:
                task.cancel()
            await asyncio.gather(*everything, status, return_exceptions=True)
            raise failed[0].exception()
        log.info("stopping: draining the pipeline and flushing the archive")
        await asyncio.gather(*sources)
        if facility is not None:
            if sources:  # what the sources sent on MQTT is still arriving: wait until it stops
                await _quiet(lambda: collector.stats.messages)
            facility_stop.set()
            await facility
        await bus.end(SOURCE_TOPICS)
        if detect is not None:
            await detect
        await bus.end(DETECT_TOPICS)
        await asyncio.gather(*sinks)
        await status
    finally:
        if bus is not None:
            await bus.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        console.close()
    summary.wall_s = time.monotonic() - started
    summary.gpu_samples, summary.alerts_fired = engine.stats.gpu_samples, engine.stats.alerts_fired
    summary.rows_archived = dict(writer.rows_written)
    _log_summary(cfg, summary, engine, writer, bus, bms, collector)
    for g in gates:
        if g.rejected:
            log.warning("%s: %d rows rejected at intake %s, dead-lettered to %s", g.group, sum(g.rejected.values()),
                        g.rejected, g.dead_letters.where)
    return summary
