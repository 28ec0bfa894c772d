"""Alerts that live on heartbeats, which their process sends again every
`daemon.watchdog_heartbeat_s` while they fire: FleetwatchWatchdog (a detect process,
ops/selfalerts.py) and FleetwatchArchiveFailing (an archive that cannot write,
sinks/archive_outage.py).

notify passes the first firing and the resolution on as state changes, and keeps the
repeats to itself: they change nothing (no alerts.jsonl line, no notification), they say
the process is alive. One not heard of for MISSED heartbeats is resolved here: its process
was killed outright (SIGKILL, OOM) or cut off, and could not resolve it, so the
dead-man's switch downstream must trip instead of being fed by notify's re-sends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.model import iso_utc

log = logging.getLogger("fleetwatch")

MISSED = 3  # heartbeats missed in a row before the alert's process counts as gone
HEARTBEAT_ALERTS = frozenset({"FleetwatchWatchdog", "FleetwatchArchiveFailing"})
# Of those, the ones that say something is wrong: resolved for silence only while notify hears
# other messages within a heartbeat (the Watchdogs beat that often), so that notify cut off from
# the bus, or lagging behind it, never tells operators that a full disk is fixed.
CONDITIONS = frozenset({"FleetwatchArchiveFailing"})


class Heartbeats:
    def __init__(self, heartbeat_s: float, clock: Callable[[], float] = time.time) -> None:
        self.heartbeat_s, self.expire_after_s, self.clock = heartbeat_s, MISSED * heartbeat_s, clock
        self.heard: dict[str, tuple[float, dict[str, Any]]] = {}  # fingerprint -> (last heard, the firing alert)
        self.last_message = clock()  # when notify last heard any alert (CONDITIONS)

    def seed(self, latest: dict[str, dict[str, Any]]) -> None:
        """After a restart: heartbeat alerts alerts.jsonl says are firing, as heard now (their
        process gets MISSED heartbeats to show it is still alive)."""
        now = self.clock()
        for fp, a in latest.items():
            if a.get("status") == "firing" and a.get("labels", {}).get("alertname") in HEARTBEAT_ALERTS:
                self.heard[fp] = (now, a)

    def take(self, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The state changes among `alerts`; a repeat of a firing heartbeat alert only says it is alive."""
        now, out = self.clock(), []
        if alerts:
            self.last_message = now
        for a in alerts:
            if a["labels"].get("alertname") in HEARTBEAT_ALERTS:
                fp = a["fingerprint"]
                if a["status"] != "firing":
                    self.heard.pop(fp, None)
                elif fp in self.heard:
                    self.heard[fp] = (now, self.heard[fp][1])
                    continue
                else:
                    self.heard[fp] = (now, a)
            out.append(a)
        return out

    def expired(self) -> list[dict[str, Any]]:
        """Resolutions of the heartbeat alerts not heard of for MISSED heartbeats."""
        now, out = self.clock(), []
        hearing = now - self.last_message <= self.heartbeat_s
        for fp, (heard, a) in list(self.heard.items()):
            if now - heard > self.expire_after_s and (hearing or a["labels"].get("alertname") not in CONDITIONS):
                del self.heard[fp]
                log.warning("notify: %s of %s: no heartbeat for %.0f s (daemon.watchdog_heartbeat_s = %g): "
                            "resolved, its process is gone", a["labels"].get("alertname"),
                            a["labels"].get("instance", "?"), now - heard, self.heartbeat_s)
                out.append({**a, "status": "resolved", "endsAt": iso_utc(now)})
        return out

    def wait_s(self) -> float:
        """How often notify should look (a quarter of a heartbeat, at most 1 s)."""
        return min(1.0, self.heartbeat_s / 4)
