"""Fleetwatch's alerts about itself from the process's health (ops/health.py), as alert
state changes for the alerts topic: notify delivers them like any other alert, as
sinks/archive_outage.py does for FleetwatchArchiveFailing.

- FleetwatchWatchdog (severity none): firing while the process is healthy (ready, and no
  role stalled), in processes that run detect. It resolves once the process has been
  unhealthy for `resolve_after` checks in a row, and when it stops. While it fires it is
  sent again every `daemon.watchdog_heartbeat_s` (`heartbeats()`): notify resolves a
  Watchdog whose heartbeats stopped (sinks/heartbeats.py), so one of a process killed
  outright ends too, and the dead-man's switch downstream trips.
- FleetwatchStalled (critical): one per role and what stalled (`role`, `stalled` labels),
  firing while health says so, resolved when the role moves again or the process stops.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import datetime, timezone

from pipeline.bus import Message, Topic
from pipeline.bus.base import HEARTBEAT
from pipeline.detect.catalog import raised
from pipeline.model import Alert, alerts_to_batch

WATCHDOG, STALLED = "FleetwatchWatchdog", "FleetwatchStalled"


class SelfAlerts:
    def __init__(self, site: str, instance: str, runbook_base_url: str, watchdog: bool, resolve_after: int,
                 wall: Callable[[], float] = time.time, heartbeat_s: float = 30.0) -> None:
        self.site, self.instance, self.runbook_base_url = site, instance, runbook_base_url
        self.watchdog, self.resolve_after, self.wall = watchdog, max(1, resolve_after), wall
        self.heartbeat_s = heartbeat_s
        self._beat = float("-inf")  # when the Watchdog was last sent
        self.firing: dict[tuple[str, ...], Alert] = {}  # (alertname, role, what) -> the firing alert
        self._unhealthy = 0  # checks in a row the Watchdog's process was unhealthy

    def update(self, healthy: bool, stalls: dict[tuple[str, str], str]) -> list[Alert]:
        """The state changes this check brings: alerts that start firing, and resolutions."""
        now = datetime.fromtimestamp(self.wall(), timezone.utc)
        changes = []
        for (role, what), detail in stalls.items():
            if (STALLED, role, what) not in self.firing:
                changes.append(self._fire((STALLED, role, what), now, {"role": role, "stalled": what},
                                          {"role": role, "detail": detail}))
        for key in [k for k in self.firing if k[0] == STALLED and (k[1], k[2]) not in stalls]:
            changes.append(self._resolve(key, now))
        if self.watchdog:
            ok = healthy and not stalls
            self._unhealthy = 0 if ok else self._unhealthy + 1
            if ok and (WATCHDOG,) not in self.firing:
                changes.append(self._fire((WATCHDOG,), now, {}, {}))
                self._beat = self.wall()
            elif (WATCHDOG,) in self.firing and self._unhealthy >= self.resolve_after:
                changes.append(self._resolve((WATCHDOG,), now))
        return changes

    def heartbeats(self) -> list[Alert]:
        """The firing Watchdog again, when a heartbeat is due (not a state change: notify
        only notes that its process is alive)."""
        if (WATCHDOG,) not in self.firing or self.wall() - self._beat < self.heartbeat_s:
            return []
        self._beat = self.wall()
        return [self.firing[(WATCHDOG,)]]

    def resolve_all(self) -> list[Alert]:
        """Everything firing, resolved now (the process stops)."""
        now = datetime.fromtimestamp(self.wall(), timezone.utc)
        return [self._resolve(key, now) for key in list(self.firing)]

    def _fire(self, key: tuple[str, ...], now: datetime, labels: dict[str, str], evidence: dict) -> Alert:
        alert = raised(key[0], {"site": self.site, "instance": self.instance, **labels}, evidence, now,
                       self.runbook_base_url)
        self.firing[key] = alert
        return alert

    def _resolve(self, key: tuple[str, ...], now: datetime) -> Alert:
        alert = self.firing.pop(key)
        return dataclasses.replace(alert, ends_at=max(now, alert.starts_at))


def message(alert: Alert, heartbeat: bool = False) -> Message:
    """The alert as a message of the alerts topic (keyed by fingerprint, as detect's are); a
    heartbeat (the firing Watchdog again) is marked so, and not archived."""
    return Message(Topic.ALERTS, alerts_to_batch([(alert.ends_at or alert.starts_at, alert)]), key=alert.fingerprint,
                   headers={HEARTBEAT: "1"} if heartbeat else {})
