"""When the archive cannot write (full disk, permission error, archive/ deleted): retry
with backoff, hold the data within a bound, and alert.

The archive sink (`sinks/archive_sink.py`) asks `due()` before each write. The first
failed write of an outage logs once and returns the `FleetwatchArchiveFailing` alert,
firing, which the role publishes on the alerts topic: notify delivers it like any
other alert. The first write that succeeds again returns it resolved. While it fires it
is sent again every `daemon.watchdog_heartbeat_s` (`heartbeat()`), so that notify resolves
the alert of an archive that stopped while failing (sinks/heartbeats.py): over Kafka its
successor, on another host or under another name, cannot. Detection and alerting never
wait on the archive.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone

from pipeline.detect.catalog import raised
from pipeline.model import Alert, iso_utc

log = logging.getLogger("fleetwatch")

ALERTNAME = "FleetwatchArchiveFailing"


def describe(error: BaseException) -> str:
    return str(error) if isinstance(error, OSError) else repr(error)


class ArchiveOutage:
    def __init__(self, site: str, runbook_base_url: str, retry_max_s: float, retry_initial_s: float = 1.0,
                 heartbeat_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.site = site
        self.heartbeat_s, self.clock = heartbeat_s, clock
        self._beat = float("-inf")  # when the firing alert was last sent
        self.instance = socket.gethostname()
        self.runbook_base_url = runbook_base_url
        self.retry_initial_s = min(retry_initial_s, retry_max_s)
        self.retry_max_s = retry_max_s
        self.failures = 0        # failed write attempts, every outage
        self.outages = 0
        self.since: float | None = None  # wall time the current outage began
        self.error = ""
        self.alert: Alert | None = None
        self.dropped = 0         # rows shed in the current outage (in-process)
        self._delay = self.retry_initial_s
        self._next = 0.0

    @property
    def failing(self) -> bool:
        return self.since is not None

    def due(self) -> bool:
        """May the archive try to write now? Always, unless it is failing and backing off."""
        return self.since is None or time.monotonic() >= self._next

    def failed(self, error: BaseException, held_rows: int) -> Alert | None:
        """A write failed; returns the firing alert when this starts an outage."""
        self.failures += 1
        self.error = describe(error)
        self._next = time.monotonic() + self._delay
        started = self.since is None
        if started:
            self.since, self.outages, self.dropped = time.time(), self.outages + 1, 0
            log.error("archive cannot write (%s): holding %d rows in memory and retrying with backoff (up to %g s); "
                      "detection and alerting go on; %s firing", self.error, held_rows, self.retry_max_s, ALERTNAME)
            self.alert = self._alert(held_rows)
            self._beat = self.clock()
        else:
            log.debug("archive write failed again (%s), next try in %.1f s", self.error, self._delay)
        self._delay = min(self._delay * 2, self.retry_max_s)
        return self.alert if started else None

    def heartbeat(self) -> Alert | None:
        """The firing alert again, when a heartbeat is due (not a state change: notify only
        notes that the failing archive is still there)."""
        if self.alert is None or self.clock() - self._beat < self.heartbeat_s:
            return None
        self._beat = self.clock()
        return self.alert

    def shed(self, dropped: dict[str, int], bound_mb: float) -> None:
        """Rows dropped to stay within the bound (in-process): logged once per outage."""
        if not dropped:
            return
        if self.dropped == 0:
            log.warning("archive: %g MB held while it cannot write (archive.outage_buffer_mb): dropping the oldest "
                        "rows from now on, counted per dataset; logged once per outage", bound_mb)
        self.dropped += sum(dropped.values())

    def recovered(self, held_rows: int) -> Alert | None:
        """A write succeeded; returns the resolved alert when this ends an outage."""
        if self.since is None:
            return None
        log.warning("archive writing again after %.0f s: %d rows held were written, %d rows dropped in this outage, "
                    "%d failed attempts so far; %s resolved", time.time() - self.since, held_rows, self.dropped,
                    self.failures, ALERTNAME)
        resolved = dataclasses.replace(self.alert, ends_at=datetime.now(timezone.utc))
        self.since, self.alert, self._delay = None, None, self.retry_initial_s
        return resolved

    def _alert(self, held_rows: int) -> Alert:
        now = datetime.now(timezone.utc)
        return raised(ALERTNAME, {"site": self.site, "instance": self.instance},
                      {"error": self.error, "held_rows": held_rows, "since": iso_utc(now)}, now, self.runbook_base_url,
                      score=float(held_rows), shown={"since": iso_utc(now, "seconds")})

    def status(self, held_rows: int, dropped_total: int) -> str:
        """For the status line: empty unless the archive is failing or had to drop rows."""
        parts = []
        if self.since is not None:
            parts.append(f"archive FAILING {time.time() - self.since:.0f} s, {held_rows:,} rows held")
        if dropped_total:
            parts.append(f"{dropped_total:,} rows dropped")
        return ", ".join(parts)
