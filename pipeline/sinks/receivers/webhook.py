"""The webhook kind: Alertmanager's webhook payload (version 4), one per group
notification, after Fleetwatch's own routing (pipeline/sinks/routing.py: grouping,
group timers, inhibit_rules, silences), shared by every webhook receiver."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.config import AlertsConfig
from pipeline.model import fingerprint
from pipeline.sinks.files import write_atomically
from pipeline.sinks.receivers.base import Enqueued, ReceiverKind
from pipeline.sinks.routing import Notification, Router
from pipeline.sinks.silences import SilenceStore
from pipeline.sinks.webhook import Receiver, generator_url

log = logging.getLogger("pipeline.sinks.notify")


def webhook_payload(receiver: str, group_key: str, group_labels: dict[str, str], alerts: list[dict[str, Any]],
                    external_url: str) -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4) of one group notification; the alerts
    keep Fleetwatch's detector, score and evidence (Alertmanager consumers ignore them)."""
    out = [{**a, "generatorURL": generator_url(external_url, a["fingerprint"])} for a in alerts]
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": _common([a["labels"] for a in alerts]),
        "commonAnnotations": _common([a["annotations"] for a in alerts]),
        "externalURL": external_url,
        "alerts": out,
    }


def _common(dicts: list[dict[str, str]]) -> dict[str, str]:
    first = dicts[0] if dicts else {}
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in dicts[1:])}


def key(receiver: str, note: Notification) -> str:
    """A notification's Idempotency-Key, from what it is: its receiver, its group, the group's notification
    before it and the alerts it holds. Made again after a crash that came before the group's state was
    written, it is the same notification under the same key, which the receiver drops (a random key had
    made it a second page)."""
    said = sorted((a.get("fingerprint") or fingerprint(a["labels"]), a["status"]) for a in note.alerts)
    return hashlib.sha256(json.dumps([receiver, note.group_key, note.after, said]).encode()).hexdigest()[:32]


def _times(alerts: list[dict[str, Any]]) -> float:
    """A number for the alerts' own times (each one's startsAt and endsAt), a re-told notification's `after`:
    told again after a restart it is the same notification under the same Idempotency-Key, which the
    receiver drops; another incident of the same alerts is another notification."""
    said = sorted((a.get("fingerprint") or fingerprint(a["labels"]), a.get("startsAt", ""), a.get("endsAt", ""))
                  for a in alerts)
    return float(int(hashlib.sha256(json.dumps(said).encode()).hexdigest()[:12], 16))


class WebhookKind(ReceiverKind):
    kind = "webhook"
    state_file = "router.json"   # Alertmanager's notification log: what each group was told
    counts = "notifications"

    def __init__(self, cfg: AlertsConfig, receivers: list[Receiver], silences: SilenceStore | None,
                 state_dir: Path | None = None) -> None:
        super().__init__(cfg, receivers, silences, state_dir)
        self.router = Router(cfg, silences)  # ConfigError on an inhibit rule that does not compile
        # What each receiver lost (notifications dead-lettered after alerts.max_age_s of failures), by group:
        # (group labels, the lost alerts by fingerprint), filled by the receivers' threads; `due`: receivers
        # to be told where those groups stand at the next enqueue(); `told`: what that enqueue took, until
        # it is written (a write that fails puts it back). Lost and told are kept in <kind>-owed.json until
        # written: a restart had forgotten them (a resolution lost for good).
        self._lost: dict[str, dict[str, tuple[dict[str, str], dict[str, dict[str, Any]]]]] = {}
        self._due: set[str] = set()
        self._told: dict[str, dict[str, tuple[dict[str, str], dict[str, dict[str, Any]]]]] = {}
        self._lost_lock = threading.Lock()
        self._owed_path = state_dir / f"{self.kind}-owed.json" if state_dir is not None else None
        self._owed_write_lock = threading.Lock()  # (writers one at a time, each with what is owed as it writes)
        self._owed_loaded = False
        self._owed_failing = False

    def add(self, changes: list[dict[str, Any]], now: float) -> None:
        self.router.add(changes, now)

    def payload(self, receiver: Receiver, note: Notification) -> Any:
        """What one group notification is to one receiver. A kind that wants Fleetwatch's
        routing with a payload of its own (a chat message) subclasses this kind and
        overrides `kind`, `state_file` and this (and `expired`, which reads this payload's
        groupKey, groupLabels and alerts)."""
        return webhook_payload(receiver.name, note.group_key, note.group_labels, note.alerts, self.cfg.external_url)

    def expired(self, receiver: str, payloads: list[Any]) -> None:
        """(A receiver's thread) its notifications that never arrived. Lost for good, a receiver down past
        alerts.max_age_s had never heard a resolution sent then, and of an alert still firing only at the next
        repeat_interval (4 h). Where their groups stand is said to it alone, once nothing of it waits (below)."""
        with self._lost_lock:
            groups = self._lost.setdefault(receiver, {})
            for p in payloads:
                if not (isinstance(p, dict) and isinstance(p.get("groupKey"), str)
                        and isinstance(p.get("alerts"), list)):
                    continue
                labels, alerts = groups.setdefault(p["groupKey"], (dict(p.get("groupLabels") or {}), {}))
                alerts.update((a.get("fingerprint") or fingerprint(a["labels"]), a) for a in p["alerts"]
                              if isinstance(a, dict) and isinstance(a.get("labels"), dict))
        self._keep_owed()  # (on disk before the notifier acks them)

    def resend(self, receiver: str) -> None:
        """(A receiver's thread) it delivers again after an outage, or lost its last notification: what it
        lost goes out at the next enqueue(). (While it stays down, that is once per alerts.max_age_s.)"""
        with self._lost_lock:
            if receiver in self._lost:
                self._due.add(receiver)

    def _standing(self, now: float) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
        """Where each lost group stands, for the receivers due to hear it, with their keys."""
        with self._lost_lock:
            self._told = {r: self._lost.pop(r) for r in self._due if r in self._lost}
            self._due.clear()
        payloads: dict[str, list[Any]] = {}
        keys: dict[str, list[str]] = {}
        by_name = {r.name: r for r in self.receivers}
        for name, groups in self._told.items():
            for group_key, (labels, lost) in groups.items():
                alerts = self.router.standing(group_key, lost)
                if alerts and name in by_name:
                    note = Notification(group_key, labels, alerts, after=-_times(alerts))
                    payloads.setdefault(name, []).append(self.payload(by_name[name], note))
                    keys.setdefault(name, []).append(key(name, note))
        return payloads, keys

    def enqueue(self, changes: list[dict[str, Any]], now: float, acked: Callable[[str], int]) -> Enqueued:
        payloads, keys = self._standing(now)
        notes = [n for n in self.router.due(now) if n.alerts]
        for r in self.receivers:
            payloads.setdefault(r.name, []).extend(self.payload(r, n) for n in notes)
            keys.setdefault(r.name, []).extend(key(r.name, n) for n in notes)
        return Enqueued(payloads, bool(changes or notes or self._told), keys)

    def written(self, last_seq: dict[str, int]) -> None:
        # What was told is in the outboxes now: owed no more. The file follows in a thread (this is the event
        # loop); a crash before it tells them again, under the same keys, which the receiver drops.
        if self._told:
            with self._lost_lock:
                self._told = {}
            threading.Thread(target=self._keep_owed, name="notify-owed", daemon=True).start()

    def _keep_owed(self) -> None:
        """(Not on the event loop) what is lost and not yet written to an outbox, to <kind>-owed.json. A
        disk that refuses it leaves it in memory (a restart then forgets it, as before), said once."""
        if self._owed_path is None:
            return
        with self._owed_write_lock:
            with self._lost_lock:  # (held for the copy only: the event loop takes it too)
                owed: dict[str, dict[str, list]] = {}
                for held in (self._lost, self._told):
                    for receiver, groups in held.items():
                        mine = owed.setdefault(receiver, {})
                        for group_key, (labels, alerts) in groups.items():
                            mine.setdefault(group_key, [labels, {}])[1].update(alerts)
                text = json.dumps({"version": 1, "owed": owed})
            try:
                write_atomically(self._owed_path, text)
            except OSError as e:
                if not self._owed_failing:
                    log.error("notify: cannot keep what webhook receivers lost in %s (%s): they are told it when "
                              "they deliver again, unless notify restarts first", self._owed_path, e)
                self._owed_failing = True
            else:
                self._owed_failing = False

    def _load_owed(self) -> None:
        """(At start, under _lost_lock) what receivers were owed when notify stopped: told at the first
        enqueue (one still down waits for it in its outbox)."""
        path = self._owed_path
        try:
            owed = json.loads(path.read_text())["owed"] if path is not None and path.exists() else {}
            loaded = {receiver: {group_key: (dict(labels), dict(alerts)) for group_key, (labels, alerts)
                                 in groups.items()} for receiver, groups in owed.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("notify: %s is unreadable (%s): what webhook receivers lost before the restart is not told "
                      "to them again (it is in their dead-letter files)", path, e)
            return
        self._lost.update(loaded)
        self._due.update(loaded)

    def next_wakeup(self) -> float | None:
        return self.router.next_wakeup()

    def snapshot(self) -> dict[str, Any]:
        return self.router.snapshot()

    def restore(self, state: dict[str, Any], latest: dict[str, dict[str, Any]] | None) -> None:
        self.router.restore(state)
        if latest is not None:
            self.router.reconcile(latest, time.time())
        with self._lost_lock:  # (after a write that failed: what it was to say is lost still)
            if not self._owed_loaded:
                self._owed_loaded = True
                self._load_owed()
            for receiver, groups in self._told.items():
                for group_key, (labels, lost) in groups.items():
                    mine = self._lost.setdefault(receiver, {}).setdefault(group_key, (labels, {}))[1]
                    mine.update({fp: a for fp, a in lost.items() if fp not in mine})
                self._due.add(receiver)
            self._told = {}


KIND = WebhookKind
