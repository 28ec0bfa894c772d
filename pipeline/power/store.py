"""Power requests on disk, shared by the command line and the power role.

`<data_dir>/power/requests.json` holds every request and its state (the silences' pattern,
sinks/silences.py): `fleetwatch power request|cancel` and the role's HTTP endpoint add and
cancel under an advisory lock and replace the file atomically; the power role re-reads it
when it changes, judges each new request against the fleet's live state and writes its
verdict and each change of phase back. `<data_dir>/power/status.json` is the role's live
view (baseline, target, achieved, capped GPUs), replaced as it runs; `fleetwatch power
status` shows both.

States: pending (not judged by the role yet), accepted (before its start), active,
restoring (the caps rise), done, cancelled, rejected (`reason` says why).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import ConfigError
from pipeline.model import iso_utc
from pipeline.power.request import PowerRequest, Rejected, from_dict, validate
from pipeline.sinks.files import SharedJson

log = logging.getLogger("fleetwatch")

STATES = ("pending", "accepted", "active", "restoring", "done", "cancelled", "rejected")
OPEN = ("pending", "accepted", "active", "restoring")  # not over: an overlap with these is refused


@dataclass
class Entry:
    """One request as stored: its JSON form (`start` "now" until the role takes it: the role's
    clock says when now is, which for a simulated fleet is not the wall clock's) and its state."""
    request: dict[str, Any]
    state: str = "pending"
    reason: str = ""
    submitted: str = ""
    cancelled: str = ""  # when a cancel was asked (RFC 3339); the role ends the request

    @property
    def id(self) -> str:
        return str(self.request["id"])

    def parsed(self, now: datetime) -> PowerRequest:
        return from_dict(self.request, str(self.request.get("source") or "cli"), now)

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request, "state": self.state, "reason": self.reason, "submitted": self.submitted,
                "cancelled": self.cancelled}


class RequestStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.file = SharedJson(self.folder / "requests.json", "power requests")
        self.path = self.file.path
        self.status_path = self.folder / "status.json"
        self._entries: dict[str, Entry] = {}
        self._unwritable = ""  # why the role's last write failed (logged once)
        self.refresh()

    # ---- writers (the CLI, the role's HTTP endpoint and its verdicts) ----------------------

    def add(self, data: dict[str, Any], source: str, now: datetime) -> tuple[Entry, PowerRequest]:
        """Store a request after the checks that need no fleet (its form, not in the past, not
        overlapping one not over); Rejected says why not. The role judges the rest."""
        req = from_dict(data, source, now)
        with self._locked():
            if req.id in self._entries:
                raise Rejected(f"id {req.id} is taken by request {req.id} ({self._entries[req.id].state}); use another "
                               f"id, or none (one is made up)")
            open_ = [e.parsed(now) for e in self._entries.values() if e.state in OPEN and not e.cancelled]
            validate(req, now, [r for r in open_ if r.end > now])
            doc = req.to_dict()
            if data.get("start") in (None, "", "now"):
                doc["start"] = "now"
            entry = Entry(doc, submitted=iso_utc(now))
            self._entries[entry.id] = entry
            self._write()
        return entry, req

    def cancel(self, request_id: str, now: datetime) -> Entry:
        """Ask for a request's end (an id or a unique prefix): the role drops one not started and
        restores the caps of an active one in steps."""
        with self._locked():
            e = self._find(request_id)
            if e.state in OPEN and not e.cancelled:
                e.cancelled = iso_utc(now)
                if e.state in ("pending", "accepted"):
                    e.state, e.reason = "cancelled", "cancelled before its start"
                self._write()
            return e

    def set_state(self, request_id: str, state: str, reason: str = "", start: str | None = None) -> None:
        """The role's verdict or a change of phase; `start`: the time a start of "now" came to be
        (a restart resumes the request from it, not from its own now). A file that cannot be read
        or written (edited by hand into garbage, a full disk) is logged once: the role goes on
        with the state in its memory and its status file, and writes it once the file is fixed."""
        try:
            with self._locked():
                e = self._entries.get(request_id)
                if e is None or ((e.state, e.reason) == (state, reason) and start in (None, e.request.get("start"))):
                    return
                e.state, e.reason = state, reason
                if start is not None:
                    e.request["start"] = start
                self._write()
            self._unwritable = ""
        except (ConfigError, OSError) as why:
            if str(why) != self._unwritable:
                log.error("power request %s is %s, but %s cannot take it: %s", request_id, state, self.path, why)
                self._unwritable = str(why)

    def write_status(self, status: dict[str, Any]) -> None:
        """The role's live view of its requests (baseline, target, achieved)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # Replaced whole (a reader never sees half of it), not fsynced: it is rewritten every second
        # from the role's memory, and the event loop must not wait on the disk for it.
        tmp = self.status_path.with_name(f".{self.status_path.name}.tmp")
        tmp.write_text(json.dumps(status, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.status_path)

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


__all__ = ["Entry", "RequestStore", "Rejected", "request_store", "STATES"]
