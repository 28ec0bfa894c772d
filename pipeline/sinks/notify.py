"""The notify role's work: alert state changes in; the console, alerts.jsonl and every
receiver's outbox out, durably, before the bus offset is committed.

    handle(batch)  console -> alerts.jsonl -> each receiver kind (pipeline/sinks/receivers:
                   webhook receivers get grouped, inhibited, silenced notifications,
                   alertmanager receivers pushes) -> outboxes -> the kinds' state
                   (<data_dir>/notify/*.json); then the caller commits the offset
    timer          each kind at its next wakeup (and about once a second, so a silence
                   added or expired takes effect): due groups, Alertmanager re-pushes
    delivery       one task and one thread per receiver drains its outbox in order;
                   a down or slow receiver holds up only itself

On shutdown what is due is flushed, deliveries get a few seconds, and whatever is left
stays in the outboxes: the next start delivers it first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import itertools
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import AlertsConfig, Config, ConfigError
from pipeline.model import iso_utc
from pipeline.redact import redact_text
from pipeline.sinks.alerts import AlertLog, read_jsonl
from pipeline.sinks.console import Console
from pipeline.sinks.files import Rotation, append_durably, write_atomically
from pipeline.sinks.outbox import WINDOW, Outbox, Record
from pipeline.sinks.receivers import RECEIVER_KINDS, receiver_kind
from pipeline.sinks.receivers.base import ReceiverKind
from pipeline.sinks.silences import SilenceStore
from pipeline.sinks.webhook import Client, Outcome, Receiver, body_of, load_receivers
from pipeline.waits import wait_set

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 3.0  # deliveries' time to finish at shutdown; the rest waits in the outboxes
TICK_S = 1.0            # the timer's longest sleep (silences are re-read this often)


@dataclass
class DeliveryStats:
    delivered: int = 0         # records a receiver answered with 2xx
    retried: int = 0           # failed tries that will be tried again
    maybe_duplicates: int = 0  # tries again after one whose outcome is unknown (a timeout): the receiver
                               # may get that record twice, with the same Idempotency-Key
    dead_lettered: int = 0     # records given up (permanent error, or older than max_age_s)


@dataclass
class NotifyStats(DeliveryStats):
    alerts: int = 0            # alert state changes handled
    bad_alerts: int = 0        # ... skipped: not an alert object
    notifications: int = 0     # webhook notifications enqueued (one per receiver)
    pushes: int = 0            # Alertmanager pushes enqueued (one per receiver)
    pending: int = 0           # records in the outboxes, not delivered yet


@dataclass(frozen=True)
class RetryPolicy:
    timeout_s: float
    initial_s: float
    max_s: float
    max_age_s: float

    @classmethod
    def of(cls, cfg: AlertsConfig) -> RetryPolicy:
        return cls(cfg.timeout_s, cfg.retry_initial_s, cfg.retry_max_s, cfg.max_age_s)

    def delay(self, failures: int, rng: random.Random, retry_after_s: float | None) -> float:
        """Exponential backoff with jitter (receivers that come back are not hit by every
        sender at once); a receiver's Retry-After is honoured up to max_s."""
        d = min(self.max_s, self.initial_s * 2 ** min(failures - 1, 60))
        d *= rng.uniform(0.5, 1.0)
        return max(d, min(retry_after_s or 0.0, self.max_s))


class Delivery:
    """Drains one receiver's outbox, head of line, in a thread of its own: each record is
    retried until a 2xx, a permanent error (dead letter at once) or max_age (dead letter).
    Failures are logged once per outage, with a summary when it ends."""

    def __init__(self, receiver: Receiver, outbox: Outbox, dead_letters: Path, policy: RetryPolicy,
                 rotation: Rotation | None = None, kind: ReceiverKind | None = None) -> None:
        self.receiver = receiver
        self.kind = kind or ReceiverKind(None, [], None)  # its kind: at_send, expired, resend
        self.outbox = outbox
        self.rotation = rotation  # of the dead-letter file
        self.dead_letters = dead_letters
        self.policy = policy
        self.client = Client(receiver, policy.timeout_s)
        self.stats = DeliveryStats()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"notify-{receiver.name}")
        self._inflight: concurrent.futures.Future | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._rng = random.Random()
        self._attempts = 0             # tries of the head record
        self._failures = 0             # failed tries in a row
        self._outage_since: float | None = None
        self._outage_reason = ""
        self._dead_since_ok = 0        # dead-lettered since the last delivery (logged when it leaves 0)

    def kick(self) -> None:
        """Records were appended."""
        self._wake.set()

    @property
    def busy(self) -> bool:
        """Records wait and the receiver is not failing: worth waiting for at shutdown."""
        return self.outbox.pending > 0 and self._outage_since is None

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._inflight = self._executor.submit(self._drain)
            disk = False
            try:
                delay = await asyncio.wrap_future(self._inflight)
            except OSError as e:  # the outbox's disk (full, read-only...): the records stay; try again later
                log.error("receiver %s: outbox %s: %s; trying again in %g s, or when records are written again",
                          self.receiver.name, self.outbox.dir, e, self.policy.max_s)
                delay, disk = self.policy.max_s, True
            if delay is None:
                await self._wake.wait()
            elif disk:  # records written again (kick) say the disk takes writes again: no need to sit out the wait
                await wait_set(self._wake, delay)
            else:  # a receiver's backoff: new records must not hurry it
                await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Break off what is in flight (it stays in the outbox) and save the cursor."""
        self._stopping = True
        self.client.abort()
        if self._inflight is not None:
            done, _ = await asyncio.wait([asyncio.wrap_future(self._inflight)], timeout=self.policy.timeout_s + 1)
            for f in done:  # its error read here (run() logged an OSError when it came, and any other ended
                if not f.cancelled():  # run()): one left unread is logged with a traceback when collected
                    f.exception()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.outbox.close)
        self.client.close()
        if self._outage_since is not None:
            log.warning("receiver %s: still failing at shutdown (%s); %d notifications wait in %s for the next "
                        "start", self.receiver.name, self._outage_reason, self.outbox.pending, self.outbox.dir)

    # ---- in the receiver's thread -------------------------------------------------------

    def _drain(self) -> float | None:
        """Send until the outbox is empty (None) or a try fails (the delay before the next)."""
        while not self._stopping:
            head = self.outbox.peek(1)
            if not head:
                self.outbox.sync()
                return None
            rec = head[0]
            now = time.time()
            outcome = self.client.post(body_of(self.kind.at_send(rec.payload, now)), rec.id, now)
            if outcome.ok:
                self.outbox.ack(rec.seq)
                self.stats.delivered += 1
                self._attempts = 0
                self._recovered(now)
                continue
            if self._stopping:  # broken off by stop(): not the receiver's failure
                return None
            self._attempts += 1
            if outcome.permanent:
                self._dead_letter([rec], f"{outcome.reason} (refused: sending it again cannot help)", now)
                continue
            self._failing(outcome, now)
            self.stats.retried += 1
            self.stats.maybe_duplicates += outcome.maybe_delivered
            if now - rec.created > self.policy.max_age_s:
                self._expire(outcome.reason, now)
            return self.policy.delay(self._failures, self._rng, outcome.retry_after_s)
        return None

    def _expire(self, reason: str, now: float) -> None:
        """Dead-letter the head record and every one after it that is past max_age too (records
        are in age order): an outage longer than max_age loses no time on them."""
        why = f"older than alerts.max_age_s = {self.policy.max_age_s:g} s and undeliverable: {reason}"
        while True:
            old = list(itertools.takewhile(lambda r: now - r.created > self.policy.max_age_s,
                                           self.outbox.peek(WINDOW)))
            if not old:
                return
            self.kind.expired(self.receiver.name, [r.payload for r in old])  # (kept by the kind before the ack)
            self._dead_letter(old, why, now)
            if not self.outbox.pending:  # its last word lost: what it lost is said again (no success would)
                self.kind.resend(self.receiver.name)

    def _dead_letter(self, records: list[Record], reason: str, now: float) -> None:
        """Append them (fsynced) to the receiver's dead-letter file, then ack them."""
        self.dead_letters.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, r in enumerate(records):
            # A dead letter is read by people: URLs in it (externalURL, generatorURL) are redacted.
            lines.append(redact_text(json.dumps({
                "receiver": self.receiver.name, "reason": reason, "attempts": self._attempts if i == 0 else 0,
                "dead_lettered_at": iso_utc(now), "id": r.id, "created": iso_utc(r.created),
                "payload": r.payload})) + "\n")
        append_durably(self.dead_letters, "".join(lines), self.rotation)
        for r in records:
            self.outbox.ack(r.seq)
        self._attempts = 0
        self.stats.dead_lettered += len(records)
        if self._dead_since_ok == 0:
            log.error("receiver %s (%s): dead-lettering notifications to %s: %s; until one is delivered again, "
                      "more are counted, not logged", self.receiver.name, self.receiver.shown, self.dead_letters,
                      reason)
        self._dead_since_ok += len(records)

    def _failing(self, outcome: Outcome, now: float) -> None:
        self._failures += 1
        self._outage_reason = outcome.reason
        if self._outage_since is None:
            self._outage_since = now
            log.warning("receiver %s (%s): delivery failed: %s; retrying with backoff (%g s doubling to %g s); "
                        "%d notifications wait in its outbox", self.receiver.name, self.receiver.shown,
                        outcome.reason, self.policy.initial_s, self.policy.max_s, self.outbox.pending)

    def _recovered(self, now: float) -> None:
        if self._outage_since is not None:
            self.kind.resend(self.receiver.name)
            log.info("receiver %s: delivering again after %.1f s of failures; %d dead-lettered in that time%s",
                     self.receiver.name, now - self._outage_since, self._dead_since_ok,
                     f" (see {self.dead_letters})" if self._dead_since_ok else "")
        self._outage_since, self._failures, self._dead_since_ok = None, 0, 0


def is_alert(a: Any) -> bool:
    """An Alertmanager alert object notify can route and send (anything else is skipped)."""
    return (isinstance(a, dict) and a.get("status") in ("firing", "resolved") and isinstance(a.get("labels"), dict)
            and isinstance(a.get("annotations"), dict) and isinstance(a.get("fingerprint"), str)
            and all(isinstance(a.get(k), str) for k in ("startsAt", "endsAt")))


class Notifier:
    """Drives the receivers for the notify role; see the module doc. handle() and the timer
    share the receiver kinds under a lock; state goes to disk in a worker thread."""

    def __init__(self, cfg: Config, console: Console | None = None, env: Mapping[str, str] | None = None) -> None:
        self.receivers = load_receivers(cfg.alerts, env)  # ConfigError before anything starts
        self.cfg = cfg
        self.console = console
        self.data = Path(cfg.data_dir)
        self.state_dir = self.data / "notify"
        self.alert_log = AlertLog(cfg.alerts_log, Rotation.of(cfg.daemon))
        self.silences = SilenceStore(self.data / "silences.json")
        # Every kind is built (its settings checked), those with receivers are used, in registry order.
        self.kinds: dict[str, ReceiverKind] = {
            kind: receiver_kind(kind)(cfg.alerts, [r for r in self.receivers if r.kind == kind], self.silences,
                                      self.state_dir)
            for kind in RECEIVER_KINDS}
        self._in_use = [k for k in self.kinds.values() if k.receivers]
        self.policy = RetryPolicy.of(cfg.alerts)
        self.deliveries: dict[str, Delivery] = {}
        self._stats = NotifyStats()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._lockfile = None
        self.firing_at_start: dict[str, dict[str, Any]] = {}  # what alerts.jsonl said fires when it started
        self._bad_logged = False
        self._closing = False
        self._enqueue_failing = False  # the timer's last round failed on the disk (logged once)
        self._write_lock = threading.Lock()  # a write cut off by a cancel may still run in its thread

    @property
    def stats(self) -> NotifyStats:
        s = self._stats
        for f in fields(DeliveryStats):
            setattr(s, f.name, sum(getattr(d.stats, f.name) for d in self.deliveries.values()))
        s.pending = sum(d.outbox.pending for d in self.deliveries.values())
        return s

    def summary(self) -> str:
        s = self.stats
        return (f"{s.alerts} alert state changes ({s.bad_alerts} malformed skipped), {s.notifications} webhook "
                f"notifications and {s.pushes} Alertmanager pushes enqueued, {s.delivered} delivered, {s.retried} "
                f"tries failed and retried, {s.maybe_duplicates} possible duplicates (sent again after a try with "
                f"no answer; same Idempotency-Key), {s.dead_lettered} dead-lettered, {s.pending} pending in "
                f"outboxes")

    async def start(self) -> None:
        await asyncio.to_thread(self._open)
        for r in self.receivers:
            self._tasks.append(asyncio.create_task(self.deliveries[r.name].run(), name=f"notify-{r.name}"))
        self._tasks.append(asyncio.create_task(self._timer(), name="notify-timer"))
        for r in self.receivers:
            log.info("receiver %s: %s %s%s", r.name, r.kind, r.shown, ", signed" if r.secret else "")

    async def handle(self, alerts: list[dict[str, Any]], retry: bool = False) -> None:
        """One batch of alert state changes, durable everywhere when this returns. An
        OSError (a full disk) leaves the state as the disk has it: handle the same batch
        again with retry=True (the console, which needs no disk, has shown it already)."""
        alerts = self._valid(alerts)
        if not retry:
            self._stats.alerts += len(alerts)
            if self.console is not None:
                for a in alerts:
                    self.console.alert(a)
        async with self._lock:
            now = time.time()
            for kind in self._in_use:
                kind.add(alerts, now)
            await self._enqueue(now, alerts)
        self._wake.set()  # the router's next wakeup may have moved

    async def close(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Flush what is due, give deliveries up to grace_s, leave the rest in the outboxes."""
        timer, deliveries = self._tasks[-1:], self._tasks[:-1]
        self._closing = True  # the timer ends between two rounds, never in the middle of a write
        self._wake.set()
        await asyncio.gather(*timer, return_exceptions=True)
        if self.deliveries:
            async with self._lock:
                await self._enqueue(time.time(), [])
            deadline = time.monotonic() + grace_s
            while any(d.busy for d in self.deliveries.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for t in deliveries:
                t.cancel()
            await asyncio.gather(*deliveries, return_exceptions=True)
            await asyncio.gather(*(d.stop() for d in self.deliveries.values()))
        self._tasks = []
        if self._lockfile is not None:
            self._lockfile.close()
        log.info("notify: %s", self.summary())

    # ---- internals -------------------------------------------------------------------

    def _open(self) -> None:
        """Lock the state, restore it, open the outboxes (in a worker thread: disk)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(self.state_dir / ".lock", "w")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"config error: data_dir = {str(self.data)!r}: another notify process uses its "
                              f"outboxes and notifier state; give each notify process its own data_dir") from None
        latest = self._latest()  # (read once: the kinds, and the heartbeats of firing_at_start)
        self.firing_at_start = {fp: a for fp, a in (latest or {}).items() if a["status"] == "firing"}
        self._restore(latest)
        for r in self.receivers:
            outbox = Outbox(self.data / "outbox" / r.name)
            if outbox.pending:
                log.info("receiver %s: %d notifications left in its outbox by the last run go out first",
                         r.name, outbox.pending)
            self.deliveries[r.name] = Delivery(r, outbox, self.data / "deadletter" / f"alerts-{r.name}.jsonl",
                                               self.policy, Rotation.of(self.cfg.daemon), self.kinds[r.kind])
        for d in sorted((self.data / "outbox").glob("*")):
            if d.is_dir() and d.name not in self.deliveries and any(d.glob("*.jsonl")):
                log.warning("outbox %s belongs to no configured receiver; its notifications are not delivered "
                            "(configure a receiver named %s again, or remove the folder)", d, d.name)

    def _restore(self, latest: dict[str, dict[str, Any]] | None) -> None:
        """The kinds' state from disk; at start also what alerts.jsonl says changed without them
        (`latest`; None after a failed write: the same batch comes again, and the log can be 256 MB)."""
        for kind in self._in_use:
            kind.restore(self._load(kind.state_file), latest)

    def _latest(self) -> dict[str, dict[str, Any]] | None:
        """Each alert's latest change in alerts.jsonl (written before any kind's state); None
        where it cannot be read (the kinds keep their own state)."""
        try:
            return {fp: a for fp, a in read_jsonl(self.alert_log.path)[0].items() if is_alert(a)}
        except OSError as e:
            log.error("%s is unreadable (%s): alerts that changed while a receiver kind's state did not "
                      "hear it are not known to it, and Watchdogs firing before the restart are not watched",
                      self.alert_log.path, e)
            return None

    def _load(self, name: str) -> dict[str, Any]:
        path = self.state_dir / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("%s is unreadable (%s); starting without it: groups may be notified again", path, e)
            return {}

    def _valid(self, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ok = []
        for a in alerts:
            if is_alert(a):
                ok.append(a)
                continue
            self._stats.bad_alerts += 1
            if not self._bad_logged:
                self._bad_logged = True
                log.error("notify: skipping a malformed alert (not an Alertmanager alert object): %.200r; more "
                          "are counted in the summary", a)
        return ok

    async def _enqueue(self, now: float, changes: list[dict[str, Any]]) -> None:
        """What is due for each receiver now, appended to its outbox with the state that
        produced it (under self._lock)."""
        work: dict[str, list[Any]] = {}
        keys: dict[str, list[str]] = {}
        changed: list[ReceiverKind] = []
        # (a CLI's silence, taken within a second; read in a thread: a hung disk had stopped the event loop)
        await asyncio.to_thread(self.silences.refresh)
        for kind in self._in_use:
            due = kind.enqueue(changes, now, lambda name: self.deliveries[name].outbox.acked)
            work.update(due.payloads)
            keys.update(due.keys)
            setattr(self._stats, kind.counts,
                    getattr(self._stats, kind.counts) + sum(len(p) for p in due.payloads.values()))
            if due.changed:
                changed.append(kind)
        if not (changes or changed):
            return
        states = {kind.state_file: kind.snapshot() for kind in changed}
        try:
            seqs = await asyncio.to_thread(self._write, changes, work, states, now, keys)
        except OSError:
            await asyncio.to_thread(self._restore, None)  # back to what the disk says was enqueued
            raise
        for kind in self._in_use:
            kind.written(seqs)
        for name, payloads in work.items():
            if payloads:
                self.deliveries[name].kick()

    def _write(self, changes: list[dict[str, Any]], work: dict[str, list[Any]], states: dict[str, dict],
               now: float, keys: dict[str, list[str]]) -> dict[str, int]:
        """alerts.jsonl, the outboxes, then the state that says they are enqueued (file name ->
        state of each kind that changed); the seq of each outbox's last new record."""
        with self._write_lock:
            self.alert_log.append(changes)
            last = {}
            for name, payloads in work.items():
                records = self.deliveries[name].outbox.append(payloads, now, keys.get(name))
                if records:
                    last[name] = records[-1].seq
            for name, state in states.items():
                write_atomically(self.state_dir / name, json.dumps(state))
            return last

    async def _timer(self) -> None:
        """Each receiver kind at its next wakeup (a group due, an Alertmanager re-push), and
        at least every TICK_S."""
        while True:
            wake = [t for t in (kind.next_wakeup() for kind in self._in_use) if t is not None]
            timeout = max(0.01, min([TICK_S, *(t - time.time() for t in wake)]))
            await wait_set(self._wake, timeout)
            self._wake.clear()
            if self._closing:
                return
            try:
                async with self._lock:
                    await self._enqueue(time.time(), [])
            except OSError as e:  # disk trouble: the router is back to the state on disk; next round tries again
                if not self._enqueue_failing:
                    log.error("notify: cannot enqueue due notifications (%s); trying again every %g s, logged "
                              "once until it succeeds", e, TICK_S)
                self._enqueue_failing = True
                # Not at once: the groups restored from disk are due already (a full disk had been tried
                # every 10 ms, an error line each).
                await wait_set(self._wake, TICK_S)
            else:
                if self._enqueue_failing:
                    log.info("notify: enqueuing due notifications again")
                self._enqueue_failing = False
