"""MQTT facility collector: a building-management system's topic tree (sources/bms_tree.py)
as `facility_sample` record batches.

    collector = MqttCollector("bms.example", 1883, site="dc1", dead_letter_path=Path("data/mqtt-deadletter.jsonl"))
    await collector.run(publish, stop)   # publish: async (pa.RecordBatch) -> None; returns after stop is set

- Subscribes to `<topic_root>/<site>/#` with QoS 1 in a persistent session (a fixed
  client id, clean_session False): while the collector is away the broker queues
  its readings, and a reconnect resumes where it stopped. The broker must be allowed
  to queue enough for the longest outage you want to ride out (Mosquitto:
  `max_queued_messages`, 1000 by default).
- When the broker goes away, reconnects with exponential backoff (capped, with
  jitter), logging once per outage.
- A retained `<point>/meta` message gives a point's unit and rack; each reading is
  converted to the metric's base unit (degF -> C, gpm -> L/min, psi -> kPa, kW -> W,
  kWh -> J, ...). A reading that comes before its point's metadata waits for it (up to
  META_GRACE_S, MAX_WAITING readings in all): a restarted collector knows no point, and the
  broker sends the readings it queued for the session, and a retained reading, before the
  retained metadata its subscription brings.
- No duplicates: for each point (at most `max_points`) the collector keeps its newest
  time, the times of its last RECENT readings, and the stretches of time its readings
  were taken over (SPANS of them: a pause longer than GAP_INTERVALS of its usual interval,
  and than MIN_GAP_S, ends one). A reading at one of those times, one older than the
  newest inside a stretch, or the broker's retained one when it is not newer (sent again
  at each subscription), is dropped and counted (a QoS 1 redelivery, of up to the broker's
  in-flight window, or a resend after a reconnect). Any other older reading is a
  store-and-forward gateway's backlog from a pause, sent after it reconnected (maybe
  behind its live readings): taken, and counted (`backfilled`). A backlog from a pause
  shorter than the gap, or older than the point's stretches, is dropped as before; a
  backlog dropped is lost for good, so the bounds lean to taking it.
- Time that lies: a reading stamped outside `window` (bus/intake.py TimeWindow: by
  default more than 5 minutes ahead of the receiver's clock) is dead-lettered
  (time_ahead, too_old), and a reading ahead of the clock within it makes dedupe
  remember the clock's time, not its own: one future reading never hides the
  point's later readings.
- A message that cannot become a row (bms_tree.Reason: outside the tree, unknown
  point, bad JSON, bad value or timestamp, no metadata yet, unknown unit) is
  counted per reason, logged once per reason and appended to the dead-letter file,
  one JSON line `{"time", "topic", "payload", "reason", "detail"}`. The messages
  around it go on.
- Rows accumulate in plain lists and go to `publish` as one record batch every
  `flush_interval_s` or `max_batch_rows` rows, whichever comes first (while a slow
  `publish` is awaited, the next batch grows beyond `max_batch_rows`, up to
  MAX_PENDING_BATCHES of them: then the collector disconnects, its session kept, so that
  the broker queues, and connects again once they are out).

`stats` (CollectorStats) counts messages, metadata, rows, batches, duplicates,
reconnects and dead letters per reason (a dead letter that cannot be written is counted,
said once, and the messages go on); `subscribed` is an asyncio.Event set while
connected and subscribed. `handle(topic, payload)` and `take_batch()` are the
per-message path and the batching without a broker (benchmarks, tests).

A reading is acknowledged to the broker once it is in the collector's rows, so a
collector that is killed loses what it held in memory (about one flush interval; while the
bus is slow, at most MAX_PENDING_BATCHES batches, and readings waiting for their metadata);
a dropped connection, or a restart of a broker with persistence on, loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import random
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiomqtt
import pyarrow as pa

from pipeline.bus.intake import TimeWindow
from pipeline.model import FACILITY_SAMPLE, TS, iso_utc
from pipeline.sinks.files import Rotation, rotate
from pipeline.sources.bms_tree import DEFAULT_ROOT, POWER_BRANCH, PointMeta, Reason, Rejected, decode_meta, \
    decode_reading, parse_topic
from pipeline.threads import DaemonThread
from pipeline.waits import wait_any, wait_set

log = logging.getLogger(__name__)

Publish = Callable[[pa.RecordBatch], Awaitable[None]]
RECENT = 16  # readings per point remembered by their exact time (a redelivery of one ahead of the clock)
SPANS = 8    # stretches of each point's readings remembered (the oldest is forgotten)
MIN_GAP_S = 10.0  # a pause in a point's readings that ends a stretch: at least this ...
GAP_INTERVALS = 4  # ... and this many of its usual intervals
META_GRACE_S = 60.0   # a reading waits this long for its point's metadata before it is dead-lettered
# Rows held while `publish` is slow (the bus full), in max_batch_rows: past it the collector leaves the
# broker to queue (a persistent session), rather than read and acknowledge into its own memory.
MAX_PENDING_BATCHES = 64
MAX_WAITING = 10_000  # readings waiting for metadata, all points together; beyond, dead-lettered at once
WAITING_PER_POINT = 256  # a point's own share of them (points whose metadata never comes take no more)
KW_AT_LEAST_W = 1000.0  # a rack PDU or a site meter reads more than this: a reading under it doubts its unit


@dataclass
class Backoff:
    """Exponential reconnect delays, capped, with jitter so that many clients that
    lost the same broker do not come back in lock step."""
    initial_s: float = 0.1
    max_s: float = 10.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_s(self) -> float:
        delay = min(self.max_s, self.initial_s * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return delay * self.rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


STABLE_S = 30.0  # a connection that lasted this long ends an outage (and the backoff starts over)
FLAPS = 3        # connections in a row that end sooner: another client under the same id, most likely


@dataclass
class Outages:
    """An MQTT client's connection history: said once when it goes down, once when it is back.
    A connection that ends within STABLE_S does not end the outage: its backoff goes on growing
    (two clients under one id evict each other at once, again and again) and, FLAPS in a row,
    one error says so."""
    where: str                     # "MQTT host:port"
    backoff: Backoff
    logger: logging.Logger         # the client's own
    client_id: str = ""
    connected_before: bool = False
    down_since: float | None = None
    up_since: float | None = None
    flaps: int = 0
    left: bool = False  # the last connection ended by the client's own choice (a pause), no outage
    clock: Callable[[], float] = time.monotonic

    def up(self) -> float | None:
        """Connected. The seconds since the outage began (through connections that did not last),
        or None for the first connection and one after a pause."""
        now = self.clock()
        down_s = now - (self.down_since or now) if self.connected_before and not self.left else None
        self.connected_before, self.up_since, self.left = True, now, False
        return down_s

    def ended(self) -> None:
        """The client left on its own (a pause while its bus is slow): no outage, whatever came before."""
        self.backoff.reset()
        self.down_since, self.up_since, self.flaps, self.left = None, None, 0, True

    def down(self, error: BaseException, then: str) -> float:
        """Lost or refused: logged once per outage. The delay before the next try."""
        now = self.clock()
        if self.up_since is not None:
            if now - self.up_since >= STABLE_S:  # it lasted: that outage is over, this one is new
                self.backoff.reset()
                self.flaps, self.down_since = 0, None
            else:
                self.flaps += 1
                if self.flaps == FLAPS:
                    self.logger.error("%s: %d connections in a row ended within %g s of their start (%s): is another "
                                      "client connected with the client id %r? Two clients under one id evict each "
                                      "other; give each its own", self.where, self.flaps, STABLE_S,
                                      error.__cause__ or error, self.client_id)
            self.up_since = None
        if self.down_since is None:
            self.down_since = now
            self.logger.warning("%s: %s (%s); %s", self.where,
                                "connection lost" if self.connected_before else "cannot connect",
                                error.__cause__ or error, then)
        return self.backoff.next_s()


@dataclass
class CollectorStats:
    messages: int = 0     # every message received, metadata included
    metadata: int = 0     # metadata messages accepted
    rows: int = 0         # rows handed to publish
    batches: int = 0
    duplicates: int = 0   # readings seen already (a redelivery, a resend, the retained one again): dropped
    cleared: int = 0      # empty messages: MQTT's way of deleting a retained one (a gateway clearing its tree)
    backfilled: int = 0   # readings older than their point's newest from a pause in it (a gateway's backlog): taken
    reconnects: int = 0   # connections after the first
    dead_letters: dict[str, int] = field(default_factory=dict)  # reason -> messages
    odd_quality: int = 0    # readings whose quality was neither 1 nor 0 (taken as bad)
    doubted_units: int = 0  # rack and meter power points whose reading was under a kW (a unit doubted)
    most_pending: int = 0   # the most rows held at once, waiting for publish (from max_batch_rows on)
    paused: int = 0         # times the collector left the broker to queue while publish was slow


@dataclass(slots=True)
class _Point:
    device: str
    device_class: str  # the topic's equipment class
    metric: str
    meta: PointMeta
    last_ns: int = -1       # the newest reading's time, at most the receiver's clock then
    last_raw_ns: int = -1   # the newest reading's own time
    recent: array = field(default_factory=lambda: array("q", [-1] * RECENT))  # the last taken readings' times
    next_slot: int = 0      # (recent is a ring)
    spans: list[list[int]] = field(default_factory=list)  # [first, last] time of each stretch taken, in order
    interval_ns: float = 0.0  # its usual interval: a moving mean of its steps forward (pauses left out)
    doubted: bool = False     # its unit was doubted (said once per point at most)

    def in_stretch(self, ts: int) -> bool:
        return any(first <= ts <= last for first, last in self.spans)

    def took(self, ts: int) -> None:
        self.recent[self.next_slot] = ts
        self.next_slot = (self.next_slot + 1) % RECENT
        gap = max(MIN_GAP_S * 1e9, GAP_INTERVALS * self.interval_ns)
        spans = self.spans
        if spans and 0 < ts - spans[-1][1] <= gap:  # (the live stream: one step on)
            step = ts - spans[-1][1]
            self.interval_ns = step if not self.interval_ns else 0.9 * self.interval_ns + 0.1 * step
            spans[-1][1] = ts
            return
        spans.append([ts, ts])
        spans.sort()
        merged = [spans[0]]
        for span in spans[1:]:  # (a backlog closing a pause joins the stretches on either side)
            if span[0] - merged[-1][1] <= gap:
                merged[-1][1] = max(merged[-1][1], span[1])
            else:
                merged.append(span)
        self.spans = merged[-SPANS:]


class DeadLetterFile:
    """Messages that did not become rows, one JSON line each, written by a thread of its own
    (opened on first use): paho hands messages over on the event loop, where a hung disk had
    stopped the whole process at one bad message, and a slow one had stalled it at each."""

    def __init__(self, path: Path, rotation: Rotation | None = None) -> None:
        self.path = Path(path)
        self.rotation = rotation  # sinks/files.Rotation: daily and by size
        self._file: IO[str] | None = None
        self.failing = ""   # why the file cannot be written now; "" while it can
        self.unwritten = 0  # dead letters not written (the file could not be written): counted, not kept
        self._thread: DaemonThread | None = None

    def write(self, topic: str, payload: bytes, reason: str, detail: str) -> None:
        """Queue one for the file (a file that cannot be written counts it in `unwritten`, said once
        until it can again; the messages around it go on)."""
        line = json.dumps({"time": iso_utc(time.time()), "topic": topic,
                           "payload": payload.decode("utf-8", errors="replace"), "reason": reason, "detail": detail})
        thread = self._thread  # (once: a close in another thread may clear it)
        if thread is None:
            thread = self._thread = DaemonThread("mqtt-dead-letters")
        try:
            thread.submit(self._write, line + "\n")
        except RuntimeError:  # (closed meanwhile, at a stop: counted, never raised into the message handler)
            self.unwritten += 1

    def flush(self) -> None:
        """What was queued reaches the file soon (not waited for)."""
        if self._thread is not None:
            self._thread.submit(self._flush)

    def settle(self, timeout_s: float = 10.0) -> bool:
        """Wait until what was queued is written or given up (False: not within `timeout_s`)."""
        return self._after(self._flush, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what was queued and close the file (within `timeout_s`: a hung disk keeps it, said)."""
        if not self._after(self._close, timeout_s):
            log.warning("MQTT dead letters: %s not written and closed within %g s (a hung disk?): what was queued "
                        "may be lost", self.path, timeout_s)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown(wait=False)

    def _after(self, last, timeout_s: float) -> bool:
        """`last()` on the thread after what was queued; False where it did not end within `timeout_s`."""
        thread = self._thread
        if thread is None:
            return True
        try:
            thread.submit(last).result(timeout_s)
        except TimeoutError:
            return False
        return True

    def _write(self, line: str) -> None:
        try:
            if self.rotation is not None:
                if self._file is not None:
                    self._file.flush()
                if rotate(self.path, self.rotation) is not None:
                    self._close()  # (the handle is the old file's, under its new name)
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
        except Exception as e:  # (OSError, or a rotation's surprise: the thread must not die, lines queued for ever)
            self.unwritten += 1
            self._failed(e)
            return
        if self.failing:
            log.warning("MQTT dead letters: %s can be written again", self.path)
            self.failing = ""

    def _flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                self._failed(e)

    def _failed(self, e: Exception) -> None:
        """Said once until the file can be written again; what the open file held is lost with it."""
        self._close()
        if not self.failing:
            log.error("MQTT dead letters: cannot write %s (%s): what it held is lost, and they are counted, not "
                      "kept, until it can be written", self.path, e)
        self.failing = str(e)

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # (what it held is lost with the disk that refused it: counted as it was written)
                pass
            self._file = None


class MqttCollector:
    def __init__(self, host: str, port: int, site: str, dead_letter_path: Path, client_id: str | None = None,
                 topic_root: str = DEFAULT_ROOT, flush_interval_s: float = 0.2, max_batch_rows: int = 4096,
                 max_points: int = 100_000, keepalive_s: int = 10, backoff: Backoff | None = None,
                 window: TimeWindow | None = None, dead_letter_rotation: Rotation | None = None,
                 connect: dict | None = None) -> None:
        self.host, self.port, self.site, self.topic_root = host, port, site, topic_root
        self.connect = connect or {}  # credentials and TLS (connect_options)
        # One fixed id per collector: the broker keeps its session (subscription and
        # queued QoS 1 readings) under it. Two collectors with one id evict each other.
        self.client_id = client_id or f"fleetwatch-facility-{site}"
        self.subscription = f"{topic_root}/{site}/#"
        self._power_branch = f"{topic_root}/{site}/{POWER_BRANCH}/"
        self.flush_interval_s = flush_interval_s
        self.max_batch_rows = max_batch_rows
        self.max_pending_rows = max_batch_rows * MAX_PENDING_BATCHES
        self._overfull = asyncio.Event()  # max_pending_rows held: disconnect until publish took them
        self._room = asyncio.Event()      # its opposite (a wait is for a set event): connect
        self._room.set()
        self.max_points = max_points
        self.keepalive_s = keepalive_s
        self.backoff = backoff or Backoff()
        self.window = window or TimeWindow()  # default: nothing more than 5 min ahead of the wall clock
        self.stats = CollectorStats()
        self.dead_letters = DeadLetterFile(dead_letter_path, dead_letter_rotation)
        self._points: dict[str, _Point] = {}       # reading topic -> point
        self._bad_units: dict[str, Rejected] = {}  # reading topic -> why its metadata was refused
        # reading topic -> (arrived, payload, retained)
        self._waiting: dict[str, collections.deque[tuple[float, bytes, bool]]] = {}
        self._orphans: set[str] = set()  # topics whose readings waited out META_GRACE_S: no wait any more
        self.waiting = 0                           # readings waiting for their point's metadata
        self.clock = time.monotonic                # (tests move it)
        self._full = asyncio.Event()               # max_batch_rows reached: flush now
        self.subscribed = asyncio.Event()          # set while connected and subscribed (health checks, tests)
        self._clear()

    def _clear(self) -> None:
        self._ts: list[int] = []
        self._rack: list[str] = []
        self._device: list[str] = []
        self._class: list[str] = []
        self._metric: list[str] = []
        self._value: list[float] = []
        self._quality: list[int] = []

    # ---- the per-message path (no network) ---------------------------------------------

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Take one message: a row, a point's metadata, a dropped duplicate, or a dead letter.
        `retained`: the broker's stored last reading, sent at each subscription, never a backlog."""
        if topic.startswith(self._power_branch):  # the power role's requests and answers, not readings
            return
        self.stats.messages += 1
        if not payload:  # a retained message deleted, not a reading (it had been a bad_json dead letter each)
            self.stats.cleared += 1
            return
        point = self._points.get(topic)
        if point is None:
            try:
                self._unknown_topic(topic, payload, retained)
            except Rejected as e:
                self._dead_letter(topic, payload, e)
            return
        self._reading(topic, point, payload, retained)

    def _reading(self, topic: str, point: _Point, payload: bytes, retained: bool = False) -> None:
        try:
            ts, value, quality, odd_quality = decode_reading(payload, point.meta)
            late = self.window.judge(ts)
            if late is not None:
                raise Rejected(Reason(late[0]), late[1])
        except Rejected as e:
            self._dead_letter(topic, payload, e)
            return
        if odd_quality:
            self._odd_quality(topic, odd_quality)
        if point.metric == "power_w" and 0 < value < KW_AT_LEAST_W and not point.doubted \
                and point.device_class in ("rack", "meter"):
            self._doubt_unit(topic, point, value)
        if ts == point.last_raw_ns or ts in point.recent or ts <= point.last_ns and (retained or point.in_stretch(ts)):
            self.stats.duplicates += 1
            return
        if ts <= point.last_ns:  # older than the newest, never seen: a gateway's backlog
            self.stats.backfilled += 1
        else:
            # A reading ahead of the receiver's clock is taken (within the window), but as "the
            # newest seen" only the clock's time is remembered: dedupe never trusts a future
            # timestamp. Its own time still catches a second copy of it.
            point.last_ns, point.last_raw_ns = min(ts, int(self.window.now() * 1e9)), ts
        point.took(ts)
        self._ts.append(ts)
        self._rack.append(point.meta.rack)
        self._device.append(point.device)
        self._class.append(point.device_class)
        self._metric.append(point.metric)
        self._value.append(value)
        self._quality.append(quality)
        held = len(self._ts)
        if held >= self.max_batch_rows:
            self._full.set()
            self.stats.most_pending = max(self.stats.most_pending, held)
            if held >= self.max_pending_rows and not self._overfull.is_set():
                self._overfull.set()
                self._room.clear()
                self.stats.paused += 1
                (log.warning if self.stats.paused == 1 else log.debug)(
                    "MQTT %s:%d: %d readings wait for the bus (it takes them slower than they come): disconnected, "
                    "the session kept, so that the broker queues them (its max_queued_messages must hold them); "
                    "back once these are out (said once; counted in the summary)", self.host, self.port, held)

    def _unknown_topic(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """A metadata message, or a reading we cannot use: raises Rejected saying why."""
        addr = parse_topic(topic, self.topic_root, self.site)
        if not addr.meta:
            if topic in self._bad_units:
                raise self._bad_units[topic]
            queue = self._waiting.get(topic)
            if topic in self._orphans or self.waiting >= MAX_WAITING or queue is not None and \
                    len(queue) >= WAITING_PER_POINT:
                why = ("its readings waited for it before" if topic in self._orphans else
                       f"{MAX_WAITING} readings wait for theirs already" if self.waiting >= MAX_WAITING else
                       f"{WAITING_PER_POINT} of its readings wait already")
                raise Rejected(Reason.NO_METADATA, f"no metadata on {topic}/meta (a retained JSON "
                                                   '{"unit": ..., "rack": ...}), and ' f"{why}; the reading is "
                                                   "dropped")
            if queue is None:
                queue = self._waiting[topic] = collections.deque()
            queue.append((self.clock(), payload, retained))
            self.waiting += 1
            return
        reading_topic = topic.rsplit("/", 1)[0]
        try:
            meta = decode_meta(payload, addr.metric)
        except Rejected as e:
            if e.reason == Reason.UNKNOWN_UNIT and len(self._bad_units) < self.max_points:
                self._bad_units[reading_topic] = e  # its readings say why too, until good metadata comes
            raise
        self._bad_units.pop(reading_topic, None)
        point = self._points.get(reading_topic)
        if point is None:
            if len(self._points) >= self.max_points:
                raise Rejected(Reason.TOO_MANY_POINTS, f"already {self.max_points} points; raise max_points "
                                                       "if the site has more")
            point = self._points[reading_topic] = _Point(addr.device, addr.equipment_class, addr.metric, meta)
        else:
            point.meta = meta
        self.stats.metadata += 1
        self._orphans.discard(reading_topic)
        for _, waited, retained in self._waiting.pop(reading_topic, ()):  # the readings before it, in order
            self.waiting -= 1
            self._reading(reading_topic, point, waited, retained)

    def expire_waiting(self, everything: bool = False) -> None:
        """Dead-letter the readings that waited META_GRACE_S for metadata that did not come (all of them
        with `everything`: the collector stops)."""
        if not self.waiting:
            return
        oldest = math.inf if everything else self.clock() - META_GRACE_S
        for topic in list(self._waiting):
            queue = self._waiting[topic]
            if queue and queue[0][0] <= oldest and len(self._orphans) < self.max_points:
                self._orphans.add(topic)  # its metadata did not come: its next readings are dead letters at once
            while queue and queue[0][0] <= oldest:
                _, payload, _ = queue.popleft()
                self.waiting -= 1
                self._dead_letter(topic, payload, Rejected(
                    Reason.NO_METADATA, f"no metadata on {topic}/meta (a retained JSON " '{"unit": ..., "rack": ...}) '
                    f"{'by the stop' if everything else f'within {META_GRACE_S:g} s'}; the reading is dropped"))
            if not queue:
                del self._waiting[topic]

    def _doubt_unit(self, topic: str, point: _Point, watts: float) -> None:
        """A rack or a site drawing under a kW is a unit in kW or MW declared as W (its overload and cap
        alerts could then never fire, and a demand response would be baselined 1000x low): said, kept."""
        point.doubted = True
        self.stats.doubted_units += 1
        if self.stats.doubted_units == 1:
            log.warning("MQTT %s:%d: %s reads %g W (unit %r in its /meta): a %s draws kilowatts; if the BMS sends "
                        "kW or MW, say so in %s/meta. Taken as sent; further such points are counted, not logged",
                        self.host, self.port, topic, watts, point.meta.unit,
                        "rack" if point.device_class == "rack" else "site meter", topic)

    def _odd_quality(self, topic: str, sent: str) -> None:
        if self.stats.odd_quality == 0:
            log.warning("MQTT %s:%d: %s: quality %s is neither 1 (good) nor 0 (bad): taken as bad, so the reading is "
                        "archived, not detected on (a gateway whose good is another code, OPC's 192, must send 1); "
                        "further ones are counted, not logged", self.host, self.port, topic, sent)
        self.stats.odd_quality += 1

    def _dead_letter(self, topic: str, payload: bytes, e: Rejected) -> None:
        count = self.stats.dead_letters.get(e.reason, 0)
        if count == 0:
            log.warning("MQTT %s:%d: %s on %s: %s. Dead-lettered to %s; further %s messages are counted and "
                        "dead-lettered, not logged", self.host, self.port, e.reason, topic, e.detail,
                        self.dead_letters.path, e.reason)
        self.stats.dead_letters[e.reason] = count + 1
        self.dead_letters.write(topic, payload, e.reason, e.detail)

    @property
    def pending_rows(self) -> int:
        return len(self._ts)

    def take_batch(self) -> pa.RecordBatch | None:
        """The rows gathered since the last call as one batch (None if there are none)."""
        n = len(self._ts)
        if n == 0:
            return None
        batch = pa.RecordBatch.from_arrays([
            pa.array(self._ts, TS), pa.repeat(pa.scalar(self.site, pa.string()), n), pa.array(self._rack, pa.string()),
            pa.array(self._device, pa.string()), pa.array(self._metric, pa.string()),
            pa.array(self._value, pa.float64()), pa.array(self._quality, pa.int8()),
            pa.array(self._class, pa.string()),
        ], schema=FACILITY_SAMPLE)
        self._clear()
        self.stats.rows += n
        self.stats.batches += 1
        return batch

    # ---- the connection ------------------------------------------------------------

    async def run(self, publish: Publish, stop: asyncio.Event) -> None:
        """Collect until `stop` is set, then hand over the last rows and return."""
        try:
            await until_first_error(self._connect_loop(stop), self._flush_every(publish, stop))
            self.expire_waiting(everything=True)
            await self._flush(publish)
        finally:
            await asyncio.to_thread(self.dead_letters.close)

    async def _flush(self, publish: Publish) -> None:
        self.expire_waiting()
        self.dead_letters.flush()
        batch = self.take_batch()
        if batch is not None:
            await publish(batch)

    async def _flush_every(self, publish: Publish, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_set(self._full, self.flush_interval_s)
            self._full.clear()
            await self._flush(publish)
            if self._overfull.is_set() and self.pending_rows < self.max_pending_rows // 2:
                self._overfull.clear()
                self._room.set()

    async def _connect_loop(self, stop: asyncio.Event) -> None:
        async def connected(client) -> None:  # until the stop, or too much held: then leave the broker to queue
            await wait_any([stop, self._overfull], None)

        async def may_connect() -> None:
            await wait_any([stop, self._room], None)
        await keep_subscribed(self, self.subscription, stop, connected,
                              "allow this client to read it with QoS 1 in the broker's ACL and limits",
                              "Check that the broker runs and that host and port are right", before=may_connect,
                              with_retain=True)


def preflight(cfg, env=None, warn: bool = True) -> None:
    """The broker's credentials and TLS files work, and the tree's root and site are topic levels,
    before the start (the power role and the simulator's publisher connect with the same)."""
    if cfg.mqtt.broker:
        tree_site(cfg)
        connect_options(cfg.mqtt, env, warn=False)


def broker_address(m) -> tuple[str, int]:
    """mqtt.broker as (host, port); without a port, MQTT's (1883), or MQTT over TLS's (8883)."""
    from pipeline.config import host_port
    return host_port("mqtt.broker", m.broker, 8883 if m.tls or m.ca_file or m.cert_file else 1883)


def tree_site(cfg) -> str:
    """The site whose tree is read (mqtt.site, else fleet.site); ConfigError where it or
    mqtt.topic_root would change what the subscription matches (MQTT's wildcards, a level more)."""
    from pipeline.config import ConfigError
    site = cfg.mqtt.site or cfg.fleet.site
    key = "mqtt.site" if cfg.mqtt.site else "fleet.site"
    if not site or any(c in site for c in "/+#\0"):
        raise ConfigError(f"config error: {key} = {site!r}: the site is one level of the MQTT topic tree "
                          f"(<topic_root>/<site>/...): give it without '/', '+' or '#'")
    if any(c in cfg.mqtt.topic_root for c in "+#\0") or not cfg.mqtt.topic_root.strip("/"):
        raise ConfigError(f"config error: mqtt.topic_root = {cfg.mqtt.topic_root!r}: give the tree's root levels "
                          f"without MQTT's wildcards '+' and '#', e.g. bms/v1")
    return site


def connect_options(cfg, env=None, warn: bool = True) -> dict:
    """aiomqtt.Client's credentials and TLS from the [mqtt] settings (config.MqttConfig): what every
    MQTT client of Fleetwatch connects with. ConfigError naming the setting that cannot work; the
    password is never in a message."""
    import ssl

    from pipeline.config import ConfigError, read_secret
    from pipeline.redact import hide_secret
    from pipeline.tls import ClientCert, ca_context
    out: dict = {}
    password = read_secret("mqtt.password", cfg.password_env, cfg.password_file, "the MQTT user's password",
                           "remove password_env to connect without one", env)
    if password is not None and not cfg.username:
        raise ConfigError("config error: mqtt.password_env/_file without mqtt.username: give the user the password "
                          "is for")
    if cfg.username:
        out["username"] = cfg.username
    if password is not None:
        hide_secret(password.decode(errors="replace"))
        out["password"] = password.decode(errors="replace")
    if cfg.key_file and not cfg.cert_file:
        raise ConfigError(f"config error: mqtt.key_file = {cfg.key_file!r} without mqtt.cert_file; give the client "
                          f"certificate in cert_file")
    if cfg.tls or cfg.ca_file or cfg.cert_file:
        def make_context() -> ssl.SSLContext:
            return ca_context("mqtt.ca_file", cfg.ca_file)
        context = make_context()
        if cfg.cert_file:  # read again at each connection where renewed on disk (client_options)
            cert = out["client_cert"] = ClientCert(cfg.cert_file, cfg.key_file, make_context)
            try:
                cert.load()
            except (ssl.SSLError, OSError, ValueError) as e:
                raise ConfigError(f"config error: mqtt.cert_file = {cfg.cert_file!r}, key_file = {cfg.key_file!r}: "
                                  f"not a usable client certificate and key ({getattr(e, 'strerror', None) or e}); "
                                  f"give PEM files") from None
            context = cert.context
        out["tls_context"] = context
    elif password is not None and warn:
        log.warning("MQTT: the password for %r goes over plain TCP: anyone on the path can read it (set mqtt.tls "
                    "and the broker's TLS port)", cfg.username)
    return out


_REFUSED = {4: "bad user name or password", 5: "not authorized", 134: "bad user name or password",
            135: "not authorized"}  # CONNACK codes: MQTT 3.1.1, then MQTT 5's reason codes


def client_options(connect: dict, who: str) -> dict:
    """aiomqtt.Client's keyword arguments from connect_options' for this connection: a client
    certificate renewed on disk is read again (an established connection keeps the one it
    started with; a broker checks it at the handshake only)."""
    options = dict(connect)
    cert = options.pop("client_cert", None)
    if cert is not None:
        cert.refresh(who)
        options["tls_context"] = cert.context
    return options


def _hint(error: BaseException, default: str) -> str:
    rc = getattr(error, "rc", None)  # (paho's ReasonCode, or an int)
    refused = _REFUSED.get(getattr(rc, "value", rc)) if isinstance(getattr(rc, "value", rc), int) else None
    if refused is None:
        return default
    return (f"The broker refused the client ({refused}): set mqtt.username and mqtt.password_env or "
            f"mqtt.password_file, and check the broker's ACL")


async def keep_subscribed(owner, topic: str, stop: asyncio.Event,
                          while_up: Callable[[aiomqtt.Client], Awaitable[None]], what_to_do: str, retry_hint: str,
                          who: str = "", with_retain: bool = False,
                          before: Callable[[], Awaitable[None]] | None = None) -> None:
    """Until `stop`: connect in a persistent session, subscribe to `topic` with QoS 1 and run
    `while_up(client)` while the connection lasts; reconnect with backoff. The facility
    collector and the power role's MQTT intake (power/mqtt_intake.py) share it. `owner` has
    host, port, client_id, keepalive_s, backoff, handle (each message, on the client's
    thread: `handoff`; with `with_retain`, its retain flag too), stats.reconnects and the
    event `subscribed`; `who` prefixes its logs; `before` is awaited before each connect (the
    collector's: room for what the broker sends)."""
    broker = f"MQTT {owner.host}:{owner.port}"
    outages = Outages(broker, owner.backoff, log, owner.client_id)
    while not stop.is_set():
        if before is not None:
            await before()
            if stop.is_set():
                return
        try:
            async with aiomqtt.Client(owner.host, owner.port, identifier=owner.client_id, clean_session=False,
                                      keepalive=owner.keepalive_s, queue_type=handoff(owner.handle, with_retain),
                                      **client_options(owner.connect, f"{who}{broker}")) as client:
                await subscribe_qos1(client, topic, broker, owner.client_id, what_to_do)
                down_s = outages.up()
                if down_s is not None:
                    owner.stats.reconnects += 1
                    log.info("%s%s: reconnected after %.1f s; the broker resends what it queued", who, broker, down_s)
                else:
                    log.info("%s%s: subscribed to %s (QoS 1, session %s)", who, broker, topic, owner.client_id)
                owner.subscribed.set()
                try:
                    await while_connected(client, while_up(client))
                finally:
                    owner.subscribed.clear()
            outages.ended()  # (left on its own: the stop, or the collector's pause)
        except aiomqtt.MqttError as e:
            delay = outages.down(e, f"{who}retrying with backoff up to {owner.backoff.max_s:g} s. "
                                    f"{_hint(e, retry_hint)}")
            await wait_set(stop, delay)


async def subscribe_qos1(client: aiomqtt.Client, topic: str, broker: str, client_id: str, what_to_do: str) -> None:
    """Subscribe with QoS 1 (what a persistent session needs to lose nothing); PermissionError
    saying what to do when the broker grants less."""
    granted = (await client.subscribe(topic, qos=1))[0]
    if granted.is_failure or granted.value != 1:
        raise PermissionError(f"{broker} granted {granted} for the QoS 1 subscription to {topic} (client id "
                              f"{client_id}): {what_to_do}")


def handoff(handle: Callable[..., None], with_retain: bool = False) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's incoming queue, replaced by a direct call of `handle(topic, payload)`
    (`handle(topic, payload, retained)` with `with_retain`: the power intake refuses a
    request the broker sends because it is retained). aiomqtt puts each message as paho
    reads it, before paho acknowledges it to the broker, so a reading is in the
    collector's rows before the broker forgets it, and there is no per-message queue
    and task on the event loop."""
    said = []

    class Handoff(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            try:
                if with_retain:
                    handle(item.topic.value, item.payload, bool(item.retain))
                else:
                    handle(item.topic.value, item.payload)
            except Exception:  # paho would not acknowledge it, and hand the same message back for ever
                if not said:
                    said.append(True)
                    log.exception("MQTT message on %s could not be handled (dropped; said once)", item.topic.value)
    return Handoff


async def while_connected(client: aiomqtt.Client, work: Awaitable[None]) -> None:
    """Await `work`; raises MqttError as soon as the connection drops. Used by clients
    whose messages never reach `client.messages` (the collector's handoff, a
    publisher that subscribes to nothing), so the iterator only ends with the connection."""
    async def watch() -> None:
        async for _ in client.messages:
            pass
    watcher, worker = asyncio.create_task(watch()), asyncio.ensure_future(work)
    try:
        await asyncio.wait({watcher, worker}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (watcher, worker):
            t.cancel()
        await asyncio.gather(watcher, worker, return_exceptions=True)
    for t in (watcher, worker):
        if t.done() and not t.cancelled():
            t.result()


async def until_first_error(*coros: Awaitable[None]) -> None:
    """Run coroutines together until all return; the first error cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        t.result()


class MqttSource:
    """The MQTT facility collector as a Source (sources/base.py). A collector: it stops after
    the other sources of its process, once what they sent it over MQTT stopped arriving
    (`settle`); with the simulator's BMS publisher in the same process it subscribes before
    the simulator starts (`ready`: the broker keeps readings only for sessions that exist)."""

    def __init__(self, collector: MqttCollector, broker: str, dead_letter_path: Path, wait_subscribed: bool) -> None:
        self.collector, self.broker, self.dead_letter_path = collector, broker, dead_letter_path
        self.wait_subscribed = wait_subscribed

    async def run(self, emit, stop: asyncio.Event) -> None:
        from pipeline.bus.base import Topic

        async def publish(batch: pa.RecordBatch) -> None:
            await emit(Topic.FACILITY, batch)
        await self.collector.run(publish, stop)

    async def ready(self, running: asyncio.Task, timeout_s: float, stop: asyncio.Event) -> None:
        """Subscribed, or timeout_s passed, or the process was told to stop meanwhile."""
        if not self.wait_subscribed:
            return
        subscribed = asyncio.create_task(self.collector.subscribed.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([subscribed, running, stopped], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not subscribed.done():
            subscribed.cancel()
            if stop.is_set():
                return
            log.warning("MQTT at %s: not subscribed after %g s; starting the simulator anyway (its first "
                        "readings may be lost)", self.broker, timeout_s)

    async def settle(self, quiet_s: float = 0.5, at_most_s: float = 10.0) -> None:
        """Wait until the messages stop arriving for quiet_s (at most at_most_s)."""
        deadline = time.monotonic() + at_most_s
        last = self.collector.stats.messages
        while time.monotonic() < deadline:
            await asyncio.sleep(quiet_s)
            if self.collector.stats.messages == last:
                return
            last = self.collector.stats.messages

    def stats(self) -> dict[str, int]:
        c = self.collector.stats
        return {"messages": c.messages, "rows": c.rows, "duplicates": c.duplicates, "backfilled": c.backfilled,
                "dead_letters": sum(c.dead_letters.values()), "reconnects": c.reconnects}

    def describe(self) -> str:
        return f"facility data from MQTT at {self.broker} ({self.collector.subscription})"

    def report(self, log: logging.Logger) -> None:
        c = self.collector.stats
        log.info("facility collector: %d MQTT messages, %d facility readings collected (%d of them a backlog older "
                 "than their point's newest), %d duplicates dropped, %d retained messages cleared, %d dead-lettered%s "
                 "to %s, %d reconnects%s", c.messages, c.rows, c.backfilled, c.duplicates, c.cleared,
                 sum(c.dead_letters.values()), f" {c.dead_letters}" if c.dead_letters else "", self.dead_letter_path,
                 c.reconnects, f", {c.paused} pauses while the bus was slow" if c.paused else "")


def build(ctx, spec) -> MqttSource:
    """The facility role: the collector of mqtt.broker's tree for this site, checking
    reading times against the process's intake window."""
    cfg, m = ctx.cfg, ctx.cfg.mqtt
    collector = MqttCollector(*broker_address(m), site=tree_site(cfg),
                              dead_letter_path=cfg.mqtt_dead_letters, client_id=m.client_id or None,
                              topic_root=m.topic_root, window=ctx.window(),
                              dead_letter_rotation=Rotation.of(cfg.daemon), connect=connect_options(m))
    # The simulator of this process publishes its facility data on the broker (simulate's build).
    return MqttSource(collector, m.broker, cfg.mqtt_dead_letters, wait_subscribed="simulate" in ctx.roles)
