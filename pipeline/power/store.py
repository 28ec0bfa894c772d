"""Power requests on disk, shared by the command line and the power role.

`<data_dir>/power/requests.json` holds every request and its state (the silences' pattern,
sinks/silences.py): `fleetwatch power request|cancel` and the role's HTTP endpoint add and
cancel under an advisory lock and replace the file atomically; the power role re-reads it
when it changes, judges each new request against the fleet's live state and writes its
verdict and each change of phase back. `<data_dir>/power/status.json` is the role's live
view (baseline, target, achieved, capped GPUs), replaced as it runs; `fleetwatch power
status` shows both.

States: pending (not judged by the role yet), accepted (before its start), active,
restoring (the caps rise), done, cancelled, rejected (`reason` says why). `reported`: when
the role sent the request's report row; `baseline_kw` and `base_it_kw`: the baseline it took
at its start (the meter's, and the PDUs' that its adjustment counts from). The
role prunes a request over `RETENTION_S` after the last of its end, its cancel and its
report, so the file (read whole at every change) does not grow with every request ever made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import ConfigError
from pipeline.model import iso_utc
from pipeline.power.request import PowerRequest, Rejected, from_dict, in_range, validate
from pipeline.sinks.files import RewrittenFile, SharedJson

log = logging.getLogger("fleetwatch")

STATES = ("pending", "accepted", "active", "restoring", "done", "cancelled", "rejected")
OPEN = ("pending", "accepted", "active", "restoring")  # not over: an overlap with these is refused
NOT_STARTED = "cancelled before its start"
RETENTION_S = 7 * 86400.0  # a request over stays listed (`fleetwatch power status`) this long; its report row is
                           # archived (`fleetwatch power report`)


@dataclass
class Entry:
    """One request as stored: its JSON form (`start` "now" until the role takes it: the role's
    clock says when now is, which for a simulated fleet is not the wall clock's) and its state."""
    request: dict[str, Any]
    state: str = "pending"
    reason: str = ""
    submitted: str = ""
    cancelled: str = ""  # when a cancel was asked (RFC 3339); the role ends the request
    reported: str = ""   # when the role sent its power_request_report row (RFC 3339, the role's clock)
    baseline_kw: float | None = None  # the baseline taken at its start, before its caps: a restart resumes on it
                                      # (the meter then is held down by the caps the agents still apply)
    base_it_kw: float | None = None   # the PDUs' sum over the same window (the adjustment's reference)

    @property
    def id(self) -> str:
        return str(self.request["id"])

    @property
    def unreported(self) -> bool:
        """Cancelled before its start and no report row sent yet (nothing ran): the role sends one.
        Every other request over was reported by the role as it ended it."""
        return self.state == "cancelled" and self.reason == NOT_STARTED and not self.reported

    def last_news(self) -> datetime | None:
        """The last of its submission, its end, its cancel and its report: it is kept RETENTION_S after."""
        times = [when(s) for s in (self.submitted, self.cancelled, self.reported)]
        start, duration = when(self.request.get("start")), self.request.get("duration_s")
        if start is not None and isinstance(duration, (int, float)):
            try:
                times.append(start + timedelta(seconds=float(duration)))
            except (OverflowError, ValueError):  # past year 9999 (stored by an older version): no end to keep it by
                pass
        return max((t for t in times if t is not None), default=None)

    def parsed(self, now: datetime) -> PowerRequest:
        return from_dict(self.request, str(self.request.get("source") or "cli"), now)

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request, "state": self.state, "reason": self.reason, "submitted": self.submitted,
                "cancelled": self.cancelled, "reported": self.reported, "baseline_kw": self.baseline_kw, "base_it_kw": self.base_it_kw}


@dataclass(frozen=True)
class Change:
    """The role's write of one request: its verdict or phase, the time a start of "now" came to
    be (a restart resumes the request from it, not from its own now), when its report went out,
    the baseline taken at its start."""
    id: str
    state: str
    reason: str = ""
    start: str | None = None
    reported: str = ""
    baseline_kw: float | None = None
    base_it_kw: float | None = None

    def then(self, later: "Change") -> "Change":
        """This change, and a later one of the same request (the file only needs the last state)."""
        return Change(self.id, later.state, later.reason, later.start or self.start, later.reported or self.reported,
                      self.baseline_kw if later.baseline_kw is None else later.baseline_kw,
                      self.base_it_kw if later.base_it_kw is None else later.base_it_kw)


def when(value: Any) -> datetime | None:
    """A stored time (RFC 3339); None for none, "now" or garbage."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value and value != "now" else None
    except ValueError:
        return None


class RequestStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.file = SharedJson(self.folder / "requests.json", "power requests")
        self.path = self.file.path
        self.status_path = self.folder / "status.json"
        self._status_file = RewrittenFile(log, self.status_path, "power", "`fleetwatch power status` shows older "
                                          "numbers", durable=False)
        self._entries: dict[str, Entry] = {}
        self._unwritable = ""  # why the role's last write failed (logged once)
        self.refresh()

    # ---- writers (the CLI, the role's HTTP endpoint and its verdicts) ----------------------

    def add(self, data: dict[str, Any], source: str, now: datetime) -> tuple[Entry, PowerRequest]:
        """Store a request after the checks that need no fleet (its form, not in the past, not
        overlapping one not over); Rejected says why not. The role judges the rest."""
        try:
            req = from_dict(data, source, now)
        except ArithmeticError as why:  # a value no arithmetic takes: the sender is told, never a traceback
            raise Rejected(f"not a valid power request: {why}") from None
        with self._locked():
            if req.id in self._entries:
                raise Rejected(f"id {req.id} is taken by request {req.id} ({self._entries[req.id].state}); use another "
                               f"id, or none (one is made up)")
            validate(req, now, self._open(now))
            doc = req.to_dict()
            if data.get("start") in (None, "", "now"):
                doc["start"] = "now"
            entry = Entry(doc, submitted=iso_utc(now))
            self._entries[entry.id] = entry
            self._write()
        return entry, req

    def _open(self, now: datetime) -> list[PowerRequest]:
        """The requests not over, not cancelled, that a new one may overlap. One that does not read
        as a request or is out of range (edited by hand, or stored by an older version) is left out:
        the role rejects it, and it must not stop every other request from being stored."""
        out = []
        for e in self._entries.values():
            if e.state in OPEN and not e.cancelled:
                try:
                    req = e.parsed(now)
                    in_range(req, now)
                except Rejected:
                    continue
                if req.end > now:
                    out.append(req)
        return out

    def cancel(self, request_id: str, now: datetime) -> Entry:
        """Ask for a request's end (an id or a unique prefix): the role drops one not started and
        restores the caps of an active one in steps."""
        with self._locked():
            e = self._find(request_id)
            if e.state in OPEN and not e.cancelled:
                e.cancelled = iso_utc(now)
                if e.state in ("pending", "accepted"):
                    e.state, e.reason = "cancelled", NOT_STARTED
                self._write()
            return e

    def apply(self, changes: list[Change], prune_at: datetime | None = None) -> tuple[bool, list[str]]:
        """The role's changes in one write, and with `prune_at` (the role's now) the requests over
        and reported dropped RETENTION_S after their last news: (written, the ids pruned). Blocks
        on the lock and the disk: the role calls it off its event loop. A file that cannot be
        read or written (edited by hand into garbage, a full disk) is logged once and nothing is
        written (False): the role goes on with the state in its memory and its status file, and
        writes it once the file is fixed."""
        try:
            with self._locked():
                dirty = False
                for c in changes:
                    e = self._entries.get(c.id)
                    if e is None or ((e.state, e.reason) == (c.state, c.reason)
                                     and c.start in (None, e.request.get("start")) and c.reported in ("", e.reported)
                                     and c.baseline_kw in (None, e.baseline_kw) and c.base_it_kw in (None, e.base_it_kw)):
                        continue
                    e.state, e.reason = c.state, c.reason
                    if c.start is not None:
                        e.request["start"] = c.start
                    e.reported = c.reported or e.reported
                    if c.baseline_kw is not None:
                        e.baseline_kw, e.base_it_kw = c.baseline_kw, c.base_it_kw
                    dirty = True
                pruned = []
                if prune_at is not None:
                    before = prune_at - timedelta(seconds=RETENTION_S)
                    pruned = [e.id for e in self._entries.values() if e.state not in OPEN and not e.unreported
                              and (e.last_news() or prune_at) < before]
                    for i in pruned:
                        del self._entries[i]
                if dirty or pruned:
                    self._write()
            self._unwritable = ""
            return True, pruned
        except (ConfigError, OSError) as why:
            if str(why) != self._unwritable:
                log.error("power request %s, but %s cannot take it: %s",
                          "; ".join(f"{c.id} is {c.state}" for c in changes) or "pruning", self.path, why)
                self._unwritable = str(why)
            return False, []

    def write_status(self, status: dict[str, Any]) -> bool:
        """The role's live view of its requests (baseline, target, achieved); off its event loop.
        Not fsynced: it is rewritten every second from the role's memory."""
        return self._status_file.write(json.dumps(status, indent=1, default=str) + "\n")

    # ---- readers ----------------------------------------------------------------------

    def known(self, request_id: str) -> bool:
        return request_id in self._entries

    def entries(self) -> list[Entry]:
        """In the order they came."""
        return list(self._entries.values())

    def status(self) -> dict[str, Any]:
        """What the role last wrote ({} before it ran)."""
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if it did. One that does not parse is logged and
        the last good set kept."""
        if not self.file.changed():
            return False
        try:
            self._entries = self._read()
        except ConfigError as e:
            log.warning("%s; keeping the %d power requests read before", e, len(self._entries))
            return False
        return True

    def _find(self, request_id: str) -> Entry:
        found = [e for i, e in self._entries.items() if request_id and i.startswith(request_id.strip())]
        if not found:
            raise ConfigError(f"no power request with id {request_id!r} in {self.path}; `fleetwatch power status` "
                              f"shows the ids")
        if len(found) > 1:
            raise ConfigError(f"id prefix {request_id!r} matches {len(found)} requests "
                              f"({', '.join(e.id for e in found)}); give more of the id")
        return found[0]

    def _read(self) -> dict[str, Entry]:
        doc = self.file.read()
        try:
            known = {f.name for f in dataclasses.fields(Entry)}  # a key an operator added is not a reason to stop
            return ({e.id: e for e in (Entry(**{k: v for k, v in d.items() if k in known}) for d in doc["requests"])}
                    if doc is not None else {})
        except (ValueError, KeyError, TypeError) as e:
            raise self.file.unreadable(e) from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Writers one at a time, each on the file as it is now (no writer loses another's change)."""
        with self.file.locked():
            self._entries = self._read()
            yield

    def _write(self) -> None:
        self.file.write({"version": 1, "requests": [e.to_json() for e in self.entries()]})


def request_store(data_dir: str | os.PathLike[str]) -> RequestStore:
    """The store the role and the CLI share: `<data_dir>/power/`."""
    return RequestStore(Path(data_dir) / "power")


__all__ = ["Change", "Entry", "RequestStore", "Rejected", "request_store", "STATES", "when"]
