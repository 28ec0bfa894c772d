"""FleetwatchWatchdog as a heartbeat: the detect process re-sends it while it fires
(ops/selfalerts.py), notify keeps the repeats to itself and resolves a Watchdog whose
heartbeats stopped (sinks/heartbeats.py): a process killed outright must trip the
dead-man's switch, not have notify re-push its Watchdog for ever. Clocks are injected."""

from __future__ import annotations

import asyncio
import json

from pipeline.bus import MemoryBus, Topic
from pipeline.bus.base import HEARTBEAT
from pipeline.ops.selfalerts import WATCHDOG, SelfAlerts, message
from pipeline.sinks.archive_sink import ArchiveSink
from pipeline.sinks.heartbeats import MISSED, Heartbeats
from pipeline.sinks.notify import Notifier
from pipeline.sinks.notify_sink import NotifySink
from pipeline.sinks.parquet import ArchiveWriter
from tests.conftest import make_config


class Clock:
    def __init__(self, t: float = 1_767_225_600.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_watchdog_is_sent_again_every_heartbeat_while_it_fires_and_never_else():
    wall = Clock()
    a = SelfAlerts("site-a", "host:9410", "", watchdog=True, resolve_after=1, wall=wall, heartbeat_s=30)
    [fired] = a.update(True, {})
    assert fired.alertname == WATCHDOG and a.heartbeats() == []
    wall.t += 29
    assert a.update(True, {}) == [] and a.heartbeats() == []
    wall.t += 1
    [beat] = a.heartbeats()
    assert beat.fingerprint == fired.fingerprint and beat.ends_at is None and beat.starts_at == fired.starts_at
    assert a.heartbeats() == []  # one per heartbeat
    wall.t += 60
    [resolved] = a.update(False, {})
    assert resolved.ends_at is not None and a.heartbeats() == []  # resolved: no more beats


def watchdog_json(wall: Clock, instance: str = "host:9410") -> dict:
    a = SelfAlerts("site-a", instance, "", watchdog=True, resolve_after=1, wall=wall)
    [fired] = a.update(True, {})
    return fired.to_json()


def test_notify_keeps_the_repeats_to_itself_and_resolves_a_watchdog_whose_beats_stopped():
    clock = Clock()
    beats = Heartbeats(10.0, clock)
    w = watchdog_json(clock)
    other = {**w, "labels": {**w["labels"], "alertname": "GpuXid"}, "fingerprint": "x"}
    assert beats.take([w, other]) == [w, other]  # the first firing is a state change
    for _ in range(5):
        clock.t += 10
        assert beats.take([w, other]) == [other]  # a heartbeat changes nothing; other alerts pass
        assert beats.expired() == []
    clock.t += MISSED * 10
    assert beats.expired() == []  # exactly three heartbeats missed: not yet
    clock.t += 1
    [gone] = beats.expired()
    assert gone["status"] == "resolved" and gone["fingerprint"] == w["fingerprint"] and gone["endsAt"] > w["startsAt"]
    assert beats.expired() == [] and beats.take([w]) == [w]  # it fires afresh when its process is back


def test_a_resolved_watchdog_is_no_longer_watched():
    clock = Clock()
    beats = Heartbeats(10.0, clock)
    w = watchdog_json(clock)
    beats.take([w])
    assert beats.take([{**w, "status": "resolved"}]) == [{**w, "status": "resolved"}]
    clock.t += 1000
    assert beats.expired() == []


def test_the_notify_role_writes_one_firing_and_one_resolution_to_alerts_jsonl(tmp_path):
    """Through the sink as notify runs it: heartbeats leave no line in alerts.jsonl; when
    they stop, the resolution does. After a restart, a Watchdog alerts.jsonl says is firing
    is watched again (its process may have died while notify was down)."""
    clock = Clock()
    cfg = make_config(data_dir=str(tmp_path), alerts={"console": False}, daemon={"watchdog_heartbeat_s": 5.0})
    w = SelfAlerts("site-a", "host:9410", "", watchdog=True, resolve_after=1, wall=clock)
    [fired] = w.update(True, {})

    def lines() -> list[str]:
        return [json.loads(x)["status"] for x in cfg.alerts_log.read_text().splitlines()]

    async def go(beats_before_death: int) -> None:
        sink = NotifySink(Notifier(cfg), heartbeats=Heartbeats(cfg.daemon.watchdog_heartbeat_s, clock))
        await sink.start()
        for _ in range(beats_before_death):
            if sink.add([message(fired)]):
                await sink.flush()
            clock.t += 5
        clock.t += MISSED * 5 + 1  # the process is gone
        if sink.add([]):
            await sink.flush()
        await sink.close()

    asyncio.run(go(4))
    assert lines() == ["firing", "resolved"]
    cfg.alerts_log.write_text(json.dumps(fired.to_json()) + "\n")  # firing when notify stopped
    asyncio.run(go(0))  # no heartbeat ever comes after the restart
    assert lines() == ["firing", "resolved"]


def test_a_heartbeat_is_marked_as_one_and_the_archive_does_not_keep_it(tmp_path):
    """The alerts dataset holds state changes: a heartbeat is none (a scale-out test once
    found the Watchdog's beats archived as a second firing of the same alert)."""
    clock = Clock()
    a = SelfAlerts("site-a", "host:9410", "", watchdog=True, resolve_after=1, wall=clock, heartbeat_s=1)
    [fired] = a.update(True, {})
    clock.t += 1
    [beat] = a.heartbeats()
    first, again = message(fired), message(beat, heartbeat=True)
    assert first.headers == {} and again.headers == {HEARTBEAT: "1"} and again.key == first.key
    assert again.value.equals(first.value)  # the same alert: notify recognises it as a repeat
    writer = ArchiveWriter(tmp_path / "archive")
    sink = ArchiveSink(writer, MemoryBus().subscribe([Topic.ALERTS], "archive"), 60.0)
    sink.add([first, again])
    assert writer.held_rows() == 1


def archive_failing_json(clock: Clock) -> dict:
    from pipeline.sinks.archive_outage import ArchiveOutage
    outage = ArchiveOutage("site-a", "", retry_max_s=60.0, heartbeat_s=10.0, clock=clock)
    return outage.failed(OSError(28, "No space left on device"), held_rows=120).to_json()


def test_notify_resolves_an_archive_outage_whose_archive_stopped_while_failing():
    """FleetwatchArchiveFailing lives on heartbeats too: over Kafka the archive that stops while
    it cannot write is replaced by one elsewhere (another host, pod or name), which cannot
    resolve its predecessor's alert; it had fired for ever. Unlike the Watchdog it says
    something is wrong: notify that hears nothing at all (cut off from the bus, lagging) does
    not take the silence for a fixed disk."""
    clock = Clock()
    beats = Heartbeats(10.0, clock)
    a, w = archive_failing_json(clock), watchdog_json(clock)
    assert beats.take([a, w]) == [a, w]
    clock.t += 10
    assert beats.take([a, w]) == []  # heartbeats
    clock.t += MISSED * 10 + 1  # notify heard nothing since: neither is resolved for it
    assert [g["labels"]["alertname"] for g in beats.expired()] == ["FleetwatchWatchdog"]
    beats.take([w])  # the bus speaks again (a Watchdog back): the archive's silence is its own
    [gone] = beats.expired()
    assert gone["status"] == "resolved" and gone["labels"]["alertname"] == "FleetwatchArchiveFailing"


def test_the_failing_archive_sends_its_alert_again_every_heartbeat_and_stops_once_it_writes():
    from pipeline.sinks.archive_outage import ArchiveOutage
    clock = Clock()
    outage = ArchiveOutage("site-a", "", retry_max_s=60.0, heartbeat_s=30.0, clock=clock)
    assert outage.heartbeat() is None  # not failing
    fired = outage.failed(OSError(28, "No space left on device"), held_rows=120)
    clock.t += 29
    assert outage.failed(OSError(28, "No space left on device"), held_rows=240) is None and outage.heartbeat() is None
    clock.t += 1
    beat = outage.heartbeat()
    assert beat is not None and beat.fingerprint == fired.fingerprint and beat.ends_at is None
    assert outage.heartbeat() is None  # one per heartbeat
    clock.t += 60
    assert outage.recovered(held_rows=0).ends_at is not None and outage.heartbeat() is None


def test_a_running_archive_that_cannot_write_beats_on_the_alerts_topic_as_a_heartbeat(tmp_path):
    """Through the role: beats come while it fails (marked, so neither notify nor the archive
    takes them for a state change), from a task of their own (a hung write stops no beat)."""
    from pipeline.bus import Message
    from pipeline.model import alert_rows
    from pipeline.sinks.archive_outage import ArchiveOutage
    from pipeline.sinks.archive_sink import archive_role
    from tests.test_archive_location import sim_batches

    async def go() -> list:
        bus = MemoryBus()
        await bus.start()
        alerts = bus.subscribe([Topic.ALERTS], "notify")
        writer = ArchiveWriter(tmp_path / "archive", min_free_mb=1e12)  # (every write fails: "no space")
        outage = ArchiveOutage("site-a", "", retry_max_s=0.2, heartbeat_s=0.2)
        role = asyncio.create_task(archive_role(writer, bus.subscribe([Topic.GPU], "archive"), 0.05, outage))
        await bus.publish(Message(Topic.GPU, sim_batches(1)[0]))
        seen: list = []
        for _ in range(600):  # until a firing and two beats came (a pattern, not a time)
            seen += [(m.headers, alert_rows(m.value)) for m in await alerts.get_batch(timeout_s=0.05)]
            if sum(1 for h, _ in seen if h) >= 2:
                break
        role.cancel()
        await asyncio.gather(role, return_exceptions=True)
        return seen
    seen = asyncio.run(go())
    first, *beats = seen
    assert first[0] == {} and [a["labels"]["alertname"] for a in first[1]] == ["FleetwatchArchiveFailing"]
    assert len(beats) >= 2 and all(h == {HEARTBEAT: "1"} and a == first[1] for h, a in beats)
