"""The simulated fleet's facility telemetry on MQTT, as a building-management system
publishes it (the topic tree of sources/bms_tree.py).

    publisher = BmsPublisher("127.0.0.1", 1883)
    task = asyncio.create_task(publisher.run(stop))
    publisher.publish(sim.step().facility)        # every tick; never blocks
    ...
    stop.set(); await task                         # sends what is buffered (up to drain_timeout_s), then returns

- Each `facility_sample` row becomes one reading, QoS 1, on
  `<topic_root>/<site>/<class>/<device>/<point>`: cdu-* devices are class `cdu`,
  pdu-* `rack` (the rack's power and energy), meter-* `meter`.
- Values go out in BMS units (`units`, by default temperatures in degF, flow in
  gpm, pressure in psi, power in kW, energy in kWh, pump and leak as booleans), so
  a collector has to convert them. Each point's unit and rack go out first as a
  retained `<point>/meta` message, again after every reconnect (a broker that
  lost its retained messages gets them back), and a reading never goes out before
  its point's metadata is acknowledged.
- Readings wait in a bounded buffer (`max_buffered`) until the broker acknowledges
  them. When the broker goes away the publisher reconnects with backoff and sends
  the unacknowledged ones again (a collector drops the repeats by timestamp); a
  full buffer drops its oldest readings, counted and logged once per outage,
  because the newest facility state matters most.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import aiomqtt
import pyarrow as pa

from pipeline.sources.bms_tree import DEFAULT_ROOT, STATE_METRICS, UNITS, Conversion, encode_meta, encode_reading, \
    reading_topic
from pipeline.sources.mqtt import Backoff, Outages, client_options, until_first_error, while_connected

log = logging.getLogger(__name__)

BMS_UNITS: dict[str, str] = {
    "supply_temp_c": "degF", "return_temp_c": "degF", "flow_lpm": "gpm", "dp_kpa": "psi",
    "pump_on": "bool", "leak": "bool", "power_w": "kW", "energy_j": "kWh",
}


@dataclass
class PublisherStats:
    readings: int = 0     # readings taken by publish()
    sent: int = 0         # messages acknowledged by the broker (metadata and readings, repeats included)
    dropped: int = 0      # oldest readings dropped from a full buffer
    reconnects: int = 0   # connections after the first


@dataclass(frozen=True, slots=True)
class _Target:
    topic: str
    conversion: Conversion
    state: bool


@dataclass(frozen=True, slots=True)
class _Outgoing:
    seq: int
    topic: str
    payload: bytes
    meta: bool


class BmsPublisher:
    def __init__(self, host: str, port: int, client_id: str = "fleetwatch-bms-sim", topic_root: str = DEFAULT_ROOT,
                 units: Mapping[str, str] = BMS_UNITS, max_buffered: int = 1_000_000, window: int = 64,
                 keepalive_s: int = 10, backoff: Backoff | None = None, connect: dict | None = None) -> None:
        for metric, unit in units.items():
            if unit not in UNITS.get(metric, {}):
                raise ValueError(f"units[{metric!r}] = {unit!r}: not a unit of {metric}; "
                                 f"known: {', '.join(UNITS.get(metric, {})) or 'none (unknown metric)'}")
        self.host, self.port, self.client_id, self.topic_root = host, port, client_id, topic_root
        self.connect = connect or {}  # credentials and TLS (sources/mqtt.py: connect_options)
        self.units = dict(units)
        self.max_buffered = max_buffered
        # QoS 1 messages in flight at once. More hides a broker's delayed acks (Mosquitto
        # without set_tcp_nodelay), but aiomqtt and paho work per message in proportion to it.
        self.window = window
        self.keepalive_s = keepalive_s
        self.backoff = backoff or Backoff()
        self.stats = PublisherStats()
        self._targets: dict[tuple[str, str, str], _Target] = {}  # (site, device, metric) -> where and how
        self._meta: dict[str, bytes] = {}                          # meta topic -> payload, every point so far
        self._outbox: deque[_Outgoing] = deque()
        self._seq = 0
        self._queued = asyncio.Event()
        self._closing = False
        self._dropping = False
        self.connected = False  # a session with the broker is up (readiness)

    @property
    def buffered(self) -> int:
        return len(self._outbox)

    def publish(self, batch: pa.RecordBatch) -> None:
        """Queue a `facility_sample` batch, one reading per row."""
        cols = {name: batch.column(name).to_pylist() for name in ("site", "rack", "device", "metric", "value",
                                                                   "quality", "device_class")}
        ts = batch.column("ts").cast(pa.int64()).to_pylist()
        for i, (site, device, metric) in enumerate(zip(cols["site"], cols["device"], cols["metric"])):
            target = self._targets.get((site, device, metric))
            if target is None:
                target = self._new_point(site, cols["rack"][i], cols["device_class"][i], device, metric)
            value = cols["value"][i]
            if value is None:
                continue  # a BMS has no reading to send
            self._put(target.topic, encode_reading(target.conversion.from_base(value), ts[i], cols["quality"][i],
                                                   target.state), meta=False)
            self.stats.readings += 1
        self._queued.set()

    def _new_point(self, site: str, rack: str, cls: str, device: str, metric: str) -> _Target:
        topic = reading_topic(self.topic_root, site, cls, device, metric)
        unit = self.units.get(metric)
        if unit is None:
            raise ValueError(f"no BMS unit for metric {metric!r}: add it to units")
        target = _Target(topic, UNITS[metric][unit], metric in STATE_METRICS)
        self._targets[(site, device, metric)] = target
        self._meta[f"{topic}/meta"] = encode_meta(unit, rack)
        self._put(f"{topic}/meta", self._meta[f"{topic}/meta"], meta=True)
        return target

    def _put(self, topic: str, payload: bytes, meta: bool) -> None:
        if len(self._outbox) >= self.max_buffered:
            for i, m in enumerate(self._outbox):  # the oldest reading; metadata stays
                if not m.meta:
                    del self._outbox[i]
                    break
            self.stats.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("MQTT %s:%d: publish buffer full (%d messages): dropping the oldest readings until "
                            "the broker takes messages again", self.host, self.port, self.max_buffered)
        self._seq += 1
        self._outbox.append(_Outgoing(self._seq, topic, payload, meta))

    async def run(self, stop: asyncio.Event, drain_timeout_s: float = 10.0) -> None:
        """Publish until `stop` is set, then until the buffer is sent or `drain_timeout_s` has passed."""
        sessions = asyncio.create_task(self._sessions())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({sessions, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if sessions.done():
                sessions.result()  # an error that is not the broker's
            self._closing = True
            self._queued.set()
            try:
                await asyncio.wait_for(asyncio.shield(sessions), drain_timeout_s)
            except TimeoutError:
                log.warning("MQTT %s:%d: %d messages not sent: the broker did not take them within %.0f s of "
                            "the stop", self.host, self.port, len(self._outbox), drain_timeout_s)
        finally:
            for t in (sessions, stopped):
                t.cancel()
            await asyncio.gather(sessions, stopped, return_exceptions=True)

    async def _sessions(self) -> None:
        """Connect, send, reconnect with backoff; returns once closing and everything is sent."""
        outages = Outages(f"MQTT {self.host}:{self.port}", self.backoff, log, self.client_id)
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, identifier=self.client_id, clean_session=False,
                                          keepalive=self.keepalive_s, max_inflight_messages=self.window,
                                          **client_options(self.connect, f"MQTT {self.host}:{self.port}")) as client:
                    client.pending_calls_threshold = self.window + 1  # a window in flight is the plan, not a warning
                    down_s = outages.up()
                    if down_s is not None:
                        self.stats.reconnects += 1
                        log.info("MQTT %s:%d: reconnected after %.1f s; resending %d buffered messages",
                                 self.host, self.port, down_s, len(self._outbox))
                    self._dropping = False
                    self.connected = True
                    try:
                        await while_connected(client, self._send(client))
                    finally:
                        self.connected = False
                    return
            except aiomqtt.MqttError as e:
                await asyncio.sleep(outages.down(e, f"buffering up to {self.max_buffered} messages and retrying "
                                                    f"with backoff up to {self.backoff.max_s:g} s"))

    async def _send(self, client: aiomqtt.Client) -> None:
        """Every point's metadata, then the buffer, a window at a time; a message leaves
        the buffer when the broker acknowledged it. Returns when closing and empty."""
        # Every point known so far, so the metadata waiting in the buffer is redundant.
        self._outbox = deque(m for m in self._outbox if not m.meta)
        meta = list(self._meta.items())
        for i in range(0, len(meta), self.window):
            await self._publish_all(client, [(topic, payload, True) for topic, payload in meta[i:i + self.window]])
        self.stats.sent += len(meta)
        while True:
            if not self._outbox:
                if self._closing:
                    return
                self._queued.clear()
                await self._queued.wait()
                continue
            window = self._next_window()
            await self._publish_all(client, [(m.topic, m.payload, m.meta) for m in window])
            self.stats.sent += len(window)
            last = window[-1].seq
            while self._outbox and self._outbox[0].seq <= last:
                self._outbox.popleft()

    def _next_window(self) -> list[_Outgoing]:
        """Up to `window` messages of one kind: a reading goes out only once its point's metadata is acknowledged."""
        first = self._outbox[0]
        window = [first]
        for m in self._outbox:
            if m is first:
                continue
            if m.meta != first.meta or len(window) == self.window:
                break
            window.append(m)
        return window

    @staticmethod
    async def _publish_all(client: aiomqtt.Client, messages: list[tuple[str, bytes, bool]]) -> None:
        await until_first_error(*(client.publish(topic, payload, qos=1, retain=retain)
                                  for topic, payload, retain in messages))
