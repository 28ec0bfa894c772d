"""The webhook kind: Alertmanager's webhook payload (version 4), one per group
notification, after Fleetwatch's own routing (pipeline/sinks/routing.py: grouping,
group timers, inhibit_rules, silences), shared by every webhook receiver."""

from __future__ import annotations

import collections
import hashlib
import json
import time
from typing import Any, Callable

from pipeline.config import AlertsConfig
from pipeline.model import fingerprint
from pipeline.sinks.receivers.base import Enqueued, ReceiverKind
from pipeline.sinks.routing import Notification, Router
from pipeline.sinks.silences import SilenceStore
from pipeline.sinks.webhook import Receiver, generator_url


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


class WebhookKind(ReceiverKind):
    kind = "webhook"
    state_file = "router.json"   # Alertmanager's notification log: what each group was told
    counts = "notifications"

    def __init__(self, cfg: AlertsConfig, receivers: list[Receiver], silences: SilenceStore | None) -> None:
        super().__init__(cfg, receivers, silences)
        self.router = Router(cfg, silences)  # ConfigError on an inhibit rule that does not compile
        self._expired: collections.deque[list[dict[str, Any]]] = collections.deque()  # (filled by receivers' threads)

    def add(self, changes: list[dict[str, Any]], now: float) -> None:
        self.router.add(changes, now)

    def payload(self, receiver: Receiver, note: Notification) -> Any:
        """What one group notification is to one receiver. A kind that wants Fleetwatch's
        routing with a payload of its own (a chat message) subclasses this kind and
        overrides `kind`, `state_file` and this."""
        return webhook_payload(receiver.name, note.group_key, note.group_labels, note.alerts, self.cfg.external_url)

    def expired(self, payloads: list[Any]) -> None:
        """A group's notification that never arrived: the next enqueue() has its group say it again. It had
        been lost for good: a receiver down past alerts.max_age_s never heard a resolution that went out
        then, and heard of an alert still firing only at the next repeat_interval (4 h)."""
        self._expired.extend(p["alerts"] for p in payloads if isinstance(p, dict) and isinstance(p.get("alerts"), list))

    def enqueue(self, changes: list[dict[str, Any]], now: float, acked: Callable[[str], int]) -> Enqueued:
        lost = False
        while self._expired:
            self.router.undelivered(self._expired.popleft(), now)
            lost = True
        notes = [n for n in self.router.due(now) if n.alerts]
        return Enqueued({r.name: [self.payload(r, n) for n in notes] for r in self.receivers},
                        bool(changes or notes or lost),
                        {r.name: [key(r.name, n) for n in notes] for r in self.receivers})

    def next_wakeup(self) -> float | None:
        return self.router.next_wakeup()

    def snapshot(self) -> dict[str, Any]:
        return self.router.snapshot()

    def restore(self, state: dict[str, Any], latest: dict[str, dict[str, Any]] | None) -> None:
        self.router.restore(state)
        if latest is not None:
            self.router.reconcile(latest, time.time())


KIND = WebhookKind
