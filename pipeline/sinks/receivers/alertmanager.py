"""The alertmanager kind: receivers of kind `alertmanager` get Fleetwatch's alerts the way
Prometheus sends them, as a JSON list to POST <url>/api/v2/alerts.

Every state change is pushed (a resolution with its endsAt), and the alerts still
firing are pushed again every `alerts.resend_interval_s`. A firing alert's endsAt is a lease,
as Prometheus sends it: LEASE_RESENDS resend intervals after the push, stamped when the push
goes out (at_send), so a push that waited in an outbox through an outage is not delivered
already ended, and Alertmanager resolves the alerts of a Fleetwatch that stopped pushing a
few intervals later whatever its own `resolve_timeout`. Alertmanager groups, inhibits and
silences these itself: Fleetwatch's routing (grouping, inhibit_rules, silences) applies
to webhook receivers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from pipeline.config import AlertsConfig
from pipeline.sinks.receivers.base import Enqueued, ReceiverKind
from pipeline.sinks.silences import SilenceStore
from pipeline.model import iso_utc
from pipeline.sinks.webhook import Receiver, generator_url

CHUNK = 500  # alerts per push, so one request (and one outbox record) stays small
LEASE_RESENDS = 4  # a firing alert's endsAt: this many resend intervals after its push (Prometheus: 4)


def postable(alert: dict[str, Any], external_url: str) -> dict[str, Any]:
    """Alertmanager API v2 postableAlert of an alert object (annotations must be strings)."""
    out = {
        "labels": alert["labels"],
        "annotations": {k: v for k, v in alert["annotations"].items() if isinstance(v, str)},
        "startsAt": alert["startsAt"],
        "generatorURL": generator_url(external_url, alert["fingerprint"]),
    }
    if alert["status"] == "resolved":
        out["endsAt"] = alert["endsAt"]
    return out


def chunks(alerts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [alerts[i:i + CHUNK] for i in range(0, len(alerts), CHUNK)]


class FiringAlerts:
    """The alerts firing now (their postable form, by fingerprint) and when they were last
    pushed again; persisted with the notifier's state. A restart takes the firing alerts from
    alerts.jsonl, which also knows what changed while no Alertmanager receiver was configured."""

    def __init__(self, resend_interval_s: float, external_url: str) -> None:
        self.resend_interval_s = resend_interval_s
        self.external_url = external_url
        self._firing: dict[str, dict[str, Any]] = {}
        self.last_resend = 0.0

    def __len__(self) -> int:
        return len(self._firing)

    def changes(self, alerts: list[dict[str, Any]], now: float) -> list[list[dict[str, Any]]]:
        """The pushes for these state changes; the firing set follows them."""
        if not self._firing:  # the first firing alert was just pushed: its resend is an interval away
            self.last_resend = now
        out = []
        for a in alerts:
            p = postable(a, self.external_url)
            if a["status"] == "firing":
                self._firing[a["fingerprint"]] = p
            else:
                self._firing.pop(a["fingerprint"], None)
            out.append(p)
        return chunks(out)

    @property
    def next_resend(self) -> float | None:
        return self.last_resend + self.resend_interval_s if self._firing else None

    def resend(self, now: float) -> list[list[dict[str, Any]]]:
        """The firing alerts again, if a resend is due; [] otherwise."""
        if not self._firing or now < self.last_resend + self.resend_interval_s:
            return []
        self.last_resend = now
        return chunks(list(self._firing.values()))

    def snapshot(self) -> dict[str, Any]:
        return {"version": 1, "last_resend": self.last_resend, "firing": self._firing}

    def restore(self, state: dict[str, Any], latest: dict[str, dict[str, Any]] | None) -> None:
        """A receiver added since alerts fired gets them at once (no last_resend); an alert that
        resolved while none was configured is no longer pushed as firing (it had been, for ever).
        Without `latest` (after a failed write; an unreadable alerts.jsonl), its own state."""
        self.last_resend = float(state.get("last_resend", 0.0))
        self._firing = (dict(state.get("firing", {})) if latest is None else
                        {fp: postable(a, self.external_url) for fp, a in latest.items() if a["status"] == "firing"})


class AlertmanagerKind(ReceiverKind):
    kind = "alertmanager"
    state_file = "alertmanager.json"  # the firing alerts and the last re-push
    counts = "pushes"

    def __init__(self, cfg: AlertsConfig, receivers: list[Receiver], silences: SilenceStore | None,
                 state_dir: Path | None = None) -> None:
        super().__init__(cfg, receivers, silences, state_dir)
        self.firing = FiringAlerts(cfg.resend_interval_s, cfg.external_url)
        self._resend_seq: dict[str, int] = {}  # receiver -> last record of its latest re-push
        self._resent: set[str] = set()         # receivers given a re-push by the last enqueue()

    @staticmethod
    def post_url(url: str) -> str:
        parts = urlsplit(url)
        return parts._replace(path=parts.path.rstrip("/") + "/api/v2/alerts").geturl()

    def enqueue(self, changes: list[dict[str, Any]], now: float, acked: Callable[[str], int]) -> Enqueued:
        pushes = self.firing.changes(changes, now) if changes else []
        resend = self.firing.resend(now)
        out, self._resent = {}, set()
        for r in self.receivers:
            # At most one re-push waits in an outbox: an outage piles none up.
            again = resend if acked(r.name) >= self._resend_seq.get(r.name, 0) else []
            if again:
                self._resent.add(r.name)
            out[r.name] = pushes + again
        return Enqueued(out, bool(pushes or resend))

    def written(self, last_seq: dict[str, int]) -> None:
        for name in self._resent:
            self._resend_seq[name] = last_seq[name]

    def next_wakeup(self) -> float | None:
        return self.firing.next_resend

    def at_send(self, payload: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        ends = iso_utc(now + LEASE_RESENDS * self.cfg.resend_interval_s)
        return [a if "endsAt" in a else {**a, "endsAt": ends} for a in payload]

    def snapshot(self) -> dict[str, Any]:
        return self.firing.snapshot()

    def restore(self, state: dict[str, Any], latest: dict[str, dict[str, Any]] | None) -> None:
        self.firing.restore(state, latest)


KIND = AlertmanagerKind
