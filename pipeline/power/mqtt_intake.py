"""Power requests over MQTT, under the BMS tree (issue 15): what a BMS gateway sends the
power role, and the role's answers, on the broker of the facility data (`mqtt.broker`).

    <root>/<site>/power/requests               in:  one request per message, the JSON of
                                                    schemas/power_request.v1.json (QoS 1)
    <root>/<site>/power/requests/<id>/status   out: {"id", "state", "reason"}, retained, QoS 1
    <root>/<site>/power/requests/rejected      out: {"id", "reason"} of a message refused, QoS 1

`<root>` is `mqtt.topic_root`, `<site>` the tree's (`mqtt.site`, default `fleet.site`; the power
role's preflight refuses a `mqtt.site` other than `fleet.site`).

- Each message takes the HTTP endpoint's path: `PowerRole.submit` (the store's checks, then
  the role's verdict against the live fleet), with source `mqtt`. Its verdict goes to its
  status topic, and each change of its state after that (pending -> accepted -> active ->
  restoring -> done, or rejected, cancelled) too: a request stored before the fleet is known
  is answered pending, then accepted or rejected when the role judges it. The status is retained: a gateway that
  subscribes (again) reads each request's latest state (the broker keeps one small message
  per request id).
- A message that is not JSON, not a JSON object, or not a valid request (power/request.py's
  Rejected: a field malformed or missing, in the past, overlapping one not over) is counted
  (also in the role's status, `grid_signal_rejected`), logged once, and answered on
  `rejected` with the reason (and on its status topic, state rejected, where it has an id).
  An id that cannot be a topic level (empty, or with /, + or #) is refused the same way.
- An id names one request. A repeat of a known id (a QoS 1 redelivery, a resend) is not
  taken again: it is answered with that request's state as it is ("already have it"; an
  accepted request stays accepted), and counted as a duplicate. A message refused before
  it was stored is refused once: the same bytes again get the same answer, uncounted; a
  corrected one under the same id is judged anew. A request without an id is a new one at
  each message: a QoS 1 redelivery of it (the connection dropped after it was taken, before
  the broker had the acknowledgement; aiomqtt does not pass MQTT's DUP flag on) overlaps
  the first and is refused while that one is not over, and is taken again after it: a
  gateway that may resend gives each request an id.
- A message the broker sends with the retain flag (a request published retained: the
  broker sends it again at every SUBSCRIBE, so at each reconnect or restart) is not taken:
  it is counted (`retained`, and in `grid_signal_rejected`), logged once, and answered on
  `rejected` (never on its status topic, which holds the state of a request taken under
  that id) telling the gateway to publish unretained and to clear it with an empty
  retained message. An empty message (that clearing) is no request and is left alone.
- A restart: the requests of source `mqtt` in the store are followed again, and each one's
  state is published once (retained) at the start, since the last one the previous process
  published may be behind it (it ended while the role was down). A request resumed goes on
  from its state: `accepted` is not said again after `active`.
- When the role prunes a request from the store (a week after it is over), an empty
  retained message on its status topic makes the broker forget that too. The statuses of ids
  refused before they were stored are kept for the last KEEP_REFUSED such ids; an older one's
  is cleared the same way (a flood of refused ids would hold memory here and a retained
  message each at the broker for good). What waits to be published is kept per id (each
  state in order; the statuses of an id forgotten before they were sent are dropped, with
  no clearing to send), and answers on `rejected` beyond MAX_UNSENT_REJECTIONS not yet sent
  are counted (`unanswered`), not queued: a flood faster than the broker's
  acknowledgements holds no more than that.
- A persistent session (client id `fleetwatch-power-<site>`, clean_session False): what a
  gateway publishes while the role is away is queued by the broker and taken at the
  reconnect. The broker going away: reconnects with sources/mqtt.py's backoff, logging once
  per outage; answers not yet published wait for the next connection.

As the facility collector does, each message is handled as paho reads it (sources/mqtt.py
`handoff`), before it is acknowledged: a request is in the store before the broker
forgets it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Awaitable

import aiomqtt

from pipeline.power.request import ID, Rejected, sender_id
from pipeline.power.store import OPEN
from pipeline.sources.bms_tree import DEFAULT_ROOT, POWER_BRANCH
from pipeline.sources.mqtt import Backoff, keep_subscribed, until_first_error
from pipeline.waits import wait_any

log = logging.getLogger("fleetwatch")

SOURCE = "mqtt"  # the request's `source`
KEEP_REFUSED = 10000  # refused ids remembered to answer a redelivery alike (their statuses kept as long)
MAX_UNSENT_REJECTIONS = 10000  # answers on `rejected` waiting for the broker (a flood: the rest are counted)
REPEATS_WAITING = 8  # an id's answers waiting for the broker beyond which the same state again is not queued
MAX_PAYLOAD = 64 * 1024  # a request is a few hundred bytes: anything this big is refused unread
STARTED = ("active", "restoring", "done")  # states past an accepted verdict


@dataclass
class IntakeStats:
    messages: int = 0    # every message on the requests topic
    taken: int = 0       # stored, then judged by the role (accepted, rejected, or pending the fleet)
    duplicates: int = 0  # a repeat of an id already taken or refused: answered, not taken again
    rejected: int = 0    # refused before they were stored: not JSON, not an object, not a valid request
    retained: int = 0    # sent by the broker as retained: refused, never taken (it would come at each reconnect)
    unanswered: int = 0  # refusals not answered on `rejected`: MAX_UNSENT_REJECTIONS were waiting to be sent
    reconnects: int = 0


class MqttIntake:
    """The power role's MQTT intake: `run(stop)` until stop is set; `alongside(work)` for the
    length of the role's work. `handle(topic, payload)` is the per-message path (no broker)."""

    def __init__(self, role, host: str, port: int, site: str, topic_root: str = DEFAULT_ROOT,
                 client_id: str | None = None, keepalive_s: int = 10, backoff: Backoff | None = None,
                 follow_s: float = 0.5, connect: dict | None = None) -> None:
        self.role, self.host, self.port, self.site = role, host, port, site
        self.connect = connect or {}  # credentials and TLS (sources/mqtt.py: connect_options)
        self.topic = f"{topic_root}/{site}/{POWER_BRANCH}/requests"
        self.rejected_topic = f"{self.topic}/rejected"
        self.client_id = client_id or f"fleetwatch-power-{site}"
        self.keepalive_s, self.backoff, self.follow_s = keepalive_s, backoff or Backoff(), follow_s
        self.stats = IntakeStats()
        self.answered: dict[str, dict[str, Any]] = {}  # id -> the status last published (the ids that came here)
        self.kept: set[str] = set()                   # the ids of `answered` that are stored requests (pruned later)
        self.refused: dict[str, bytes] = {}           # id -> sha256 of the message refused (bounded)
        # What waits for the broker: each status topic's states, in order (None: an empty retained message,
        # clearing it), and the answers on `rejected` (MAX_UNSENT_REJECTIONS at most).
        self.statuses: OrderedDict[str, list[dict[str, Any] | None]] = OrderedDict()
        self.rejections: deque[dict[str, Any]] = deque()
        self.at_broker: set[str] = set()  # status topics that may hold a retained status there (sent or being sent)
        self._wake = asyncio.Event()
        self.subscribed = asyncio.Event()  # set while connected and subscribed (tests)
        self._adopt()

    def _adopt(self) -> None:
        """The MQTT requests in the store (a previous process took them): followed from here, each
        one's state published now. What that process published last may be behind the store (it
        stopped between a change and its publish, or the request ended while the role was down), and
        `answered` does not survive it: without this their status stayed at `active` for good."""
        self.role.store.refresh()
        for e in self.role.store.entries():
            if e.request.get("source") == SOURCE:
                self.kept.add(e.id)
                self._answer(e.id, self.current(e.id))

    def status_topic(self, request_id: str) -> str:
        return f"{self.topic}/{request_id}/status"

    # ---- the per-message path (no network) ---------------------------------------------

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        if topic != self.topic:  # an answer of ours, or a subscription left in the session
            return
        self.stats.messages += 1
        if not payload:  # a gateway clearing a retained request (as `_retained` tells it to): no request
            return
        try:
            if retained:
                self._retained(payload)
            else:
                self._take(payload)
        except Exception:  # a fault in the role's judging must not drop the connection
            log.exception("power: MQTT request on %s could not be handled; it is dropped", self.topic)
        self.role.write_status()

    def _take(self, payload: bytes) -> None:
        if len(payload) > MAX_PAYLOAD:
            self._refuse("", b"", f"{len(payload)} bytes: a power request is a small JSON object (at most "
                                  f"{MAX_PAYLOAD} bytes)")
            return
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError) as e:
            self._refuse("", payload, f"not JSON ({type(e).__name__}: {str(e)[:200]})")
            return
        if not isinstance(data, dict):
            self._refuse("", payload, "the message must be a JSON object of a power request "
                                      "(schemas/power_request.v1.json)")
            return
        rid = sender_id(data)
        if rid and not ID.fullmatch(rid):  # not a topic level of its status, nor a line of the log
            self._refuse("", payload, f"id {rid[:40]!r}: at most 128 letters, digits and . _ : -")
            return
        if rid and self.refused.get(rid) == hashlib.sha256(payload).digest():  # redelivered: refused already
            self.stats.duplicates += 1
            self._answer(rid, {"id": rid, "state": "rejected", "reason": self.answered[rid]["reason"]})
            return
        if rid:
            self.role.store.refresh()
            if self.role.store.known(rid) or rid in self.role.tracked:  # redelivered, or resent: already have it
                self.stats.duplicates += 1
                self.kept.add(rid)
                log.info("power: MQTT request %s again: already have it (%s); not taken again", rid,
                         self.current(rid)["state"])
                self._answer(rid, self.current(rid))
                return
        try:
            entry = self.role.submit(data, SOURCE)
        except Rejected as why:
            self._refuse(rid, payload, str(why))
            return
        self.stats.taken += 1
        self.refused.pop(entry.id, None)
        self.kept.add(entry.id)
        self._answer(entry.id, self.current(entry.id))

    def _retained(self, payload: bytes) -> None:
        """A retained request: the broker sends it again at every SUBSCRIBE (each reconnect, each
        restart), and one without an id would be a new request each time. Refused, on `rejected`
        only: its status topic holds the state of the request taken under its id, if any."""
        try:
            data = json.loads(payload) if len(payload) <= MAX_PAYLOAD else None
        except (ValueError, RecursionError):
            data = None
        rid = sender_id(data) if isinstance(data, dict) else ""
        rid = rid if ID.fullmatch(rid) else ""
        why = (f"a retained message, not taken: the broker sends it again at every subscription (each reconnect), "
               f"where it would be taken again; publish requests with retain false, and clear this one by "
               f"publishing an empty retained message on {self.topic}")
        if self.stats.retained == 0:
            log.warning("power: an MQTT request on %s (%s) is %s. Answered on %s; further retained "
                        "requests are counted and answered, not logged", self.topic, rid or "no id", why,
                        self.rejected_topic)
        self.stats.retained += 1
        self._tell_rejected(rid, why)
        self._wake.set()

    def _tell_rejected(self, rid: str, why: str) -> None:
        """A message not taken: counted in the role's status, answered on `rejected`."""
        self.role.signals_rejected += 1
        self.role.last_signal_rejection = f"{rid or '(no id)'}: {why}"
        if len(self.rejections) >= MAX_UNSENT_REJECTIONS:
            self.stats.unanswered += 1
            return
        self.rejections.append({"id": rid or None, "reason": why})

    def current(self, request_id: str) -> dict[str, Any]:
        """A request's state as the role has it (the store's, before the role judged it)."""
        t = self.role.tracked.get(request_id)
        if t is not None:
            return {"id": request_id, "state": t.state, "reason": t.reason}
        e = next((e for e in self.role.store.entries() if e.id == request_id), None)
        if e is None:
            return self.answered.get(request_id, {"id": request_id, "state": "unknown", "reason": ""})
        return {"id": request_id, "state": e.state, "reason": e.reason}

    def _refuse(self, rid: str, payload: bytes, why: str) -> None:
        """Not stored: counted, logged once, answered on `rejected` (and on its status topic)."""
        if self.stats.rejected == 0:
            log.warning("power: an MQTT request on %s was refused (%s: %s); answered on %s. Further refused "
                        "requests are counted and answered, not logged", self.topic, rid or "no id", why,
                        self.rejected_topic)
        self.stats.rejected += 1
        self._tell_rejected(rid, why)
        if rid:
            self.refused.pop(rid, None)  # (refused again: the newest)
            self.refused[rid] = hashlib.sha256(payload).digest()
            while len(self.refused) > KEEP_REFUSED:  # the oldest go first, and their statuses with them
                oldest = next(iter(self.refused))
                del self.refused[oldest]
                if oldest not in self.kept:
                    self._forget(oldest)
            self._answer(rid, {"id": rid, "state": "rejected", "reason": why})
        self._wake.set()

    def _forget(self, rid: str) -> None:
        """Pruned (a week after it was over): an empty retained message, so the broker forgets its
        status too (it would keep one per request ever made)."""
        self.answered.pop(rid, None)
        self.kept.discard(rid)
        topic = self.status_topic(rid)
        if topic in self.at_broker:
            self.statuses[topic] = [None]
        else:  # never sent: nothing to clear
            self.statuses.pop(topic, None)
        self._wake.set()

    def _answer(self, rid: str, doc: dict[str, Any]) -> None:
        self.answered[rid] = doc
        waiting = self.statuses.setdefault(self.status_topic(rid), [])
        if len(waiting) < REPEATS_WAITING or waiting[-1] != doc:  # (a flood of one id's redeliveries: bounded)
            waiting.append(doc)
        self._wake.set()

    def follow(self) -> None:
        """Each change of state of the requests that came here (pending -> accepted, ... done), and
        the status of those the role pruned cleared."""
        for rid, last in list(self.answered.items()):
            if rid in self.kept and not self.role.store.known(rid) and rid not in self.role.tracked:
                self._forget(rid)
                continue
            if last["state"] not in OPEN:
                continue
            now = self.current(rid)
            if now == last:
                continue
            if last["state"] in STARTED and now["state"] in ("pending", "accepted"):
                continue  # resumed after a restart (the role re-accepts it): not news, it goes on
            if last["state"] == "pending" and now["state"] in STARTED:  # judged and started between two looks:
                self._answer(rid, {"id": rid, "state": "accepted", "reason": ""})  # the verdict is said first
            self._answer(rid, now)

    # ---- the connection ------------------------------------------------------------

    async def alongside(self, work: Awaitable[None]) -> None:
        """Take requests while `work` (the role) runs; a failure of either ends both."""
        stop = asyncio.Event()

        async def then_stop() -> None:
            try:
                await work
            finally:
                stop.set()
        await until_first_error(then_stop(), self.run(stop))

    async def run(self, stop: asyncio.Event) -> None:
        await keep_subscribed(self, self.topic, stop, lambda client: self._publish(client, stop),
                              f"allow the power role to read it with QoS 1 and to write {self.topic}/# in the "
                              f"broker's ACL", "Power requests over MQTT wait meanwhile", who="power: ",
                              with_retain=True)

    async def _publish(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """The answers, as they come and as the requests' states change; what is left at a stop, then return."""
        while True:
            self.follow()
            while self.statuses:
                topic, docs = next(iter(self.statuses.items()))
                if docs[0] is not None:  # (before: the broker may keep it even if its acknowledgement is lost)
                    self.at_broker.add(topic)
                # (the connection lost: it stays, and is sent on the next)
                await client.publish(topic, b"" if docs[0] is None else json.dumps(docs[0]).encode(), qos=1,
                                     retain=True)
                if docs[0] is None:
                    self.at_broker.discard(topic)
                if self.statuses.get(topic) is docs:  # (else forgotten meanwhile: its clearing waits instead)
                    docs.pop(0)
                    if not docs:
                        del self.statuses[topic]
            while self.rejections and not self.statuses:
                await client.publish(self.rejected_topic, json.dumps(self.rejections[0]).encode(), qos=1)
                self.rejections.popleft()  # only once the broker has it: a lost connection sends it again
            if self.statuses:
                continue
            if stop.is_set():
                return
            self._wake.clear()
            await wait_any([self._wake, stop], self.follow_s)


def intake_for(cfg, role) -> MqttIntake:
    """The role's intake on `mqtt.broker`, under the tree of `mqtt.site` (default `fleet.site`)."""
    m = cfg.mqtt
    from pipeline.sources.mqtt import broker_address, connect_options, tree_site
    return MqttIntake(role, *broker_address(m), site=tree_site(cfg),
                      topic_root=m.topic_root, connect=connect_options(m))
