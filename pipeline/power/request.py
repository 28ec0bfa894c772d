"""A power request: a site (or some of its racks) asked to shed load for a while.

It is the `power_request` record (schemas/power_request.v1.json), whichever way it came
(the CLI, the daemon's HTTP endpoint, the grid-signal topic): `from_dict` reads the JSON
form, `validate` decides whether the site takes it. A refusal is a `Rejected` whose
message says what was wrong and what would be accepted; it never half-accepts.
"""

from __future__ import annotations

import re

import math
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa

from pipeline.model import POWER_REQUEST, iso_utc

GOALS = ("target_kw", "reduction_kw", "reduction_pct")
START_GRACE_S = 30.0   # a start this far in the past is taken as "now" (clock skew, transit)
DEFAULT_RAMP_S = 30.0
# The longest request and the farthest start taken: a demand-response event lasts hours and is
# announced a day or so ahead, so a week and a year are generous; past them a request is a typo
# (20000000d), and its end is past what a time can hold (year 9999) or a report row's (2262).
MAX_DURATION_S = 7 * 86400.0
MAX_AHEAD_S = 365 * 86400.0


class Rejected(ValueError):
    """The request is refused; the message says why."""


ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a request id that is safe in a topic, a file and a log

@dataclass(frozen=True)
class PowerRequest:
    site: str
    start: datetime
    duration_s: float
    target_kw: float | None = None
    reduction_kw: float | None = None
    reduction_pct: float | None = None
    racks: tuple[str, ...] = ()
    ramp_s: float = DEFAULT_RAMP_S
    source: str = "cli"
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    ts: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)

    def goal(self) -> str:
        """The request's goal, in words."""
        if self.target_kw is not None:
            return f"hold at or under {self.target_kw:g} kW"
        if self.reduction_kw is not None:
            return f"shed {self.reduction_kw:g} kW"
        return f"shed {self.reduction_pct:g}%"

    def where(self) -> str:
        return f"site {self.site}" + (f" racks {','.join(self.racks)}" if self.racks else "")

    def reduction_w(self, baseline_kw: float) -> float:
        """The watts to shed from `baseline_kw` (what the covered load draws without the request)."""
        if self.target_kw is not None:
            return max(0.0, baseline_kw - self.target_kw) * 1000.0
        if self.reduction_kw is not None:
            return self.reduction_kw * 1000.0
        return baseline_kw * self.reduction_pct / 100.0 * 1000.0

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["racks"] = list(self.racks)
        out["start"], out["ts"] = iso_utc(self.start), iso_utc(self.ts)
        return out

    def to_batch(self) -> pa.RecordBatch:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["racks"] = ",".join(self.racks) or None
        return pa.RecordBatch.from_pylist([row], schema=POWER_REQUEST)


def sender_id(data: dict[str, Any]) -> str:
    """The id a request's sender gave ("" for none): an id 0 is the sender's too, to answer and to know again."""
    given = data.get("id")
    return "" if given is None else str(given)


def from_dict(data: dict[str, Any], source: str, now: datetime | None = None) -> PowerRequest:
    """A request from its JSON form (schemas/power_request.v1.json's names; `start` and `ts`
    RFC 3339 times or "now", default now; `racks` a list or comma-separated; `ramp_s`
    default 30). Rejected for an unknown or malformed field, saying which."""
    now = now or datetime.now(timezone.utc)
    known = {f.name for f in fields(PowerRequest)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise Rejected(f"unknown field(s) {', '.join(unknown)}; a power request has: {', '.join(sorted(known))}")
    for name in ("site", "duration_s"):
        if data.get(name) in (None, ""):
            raise Rejected(f"{name} is missing")
    if len(str(data["site"])) > 128:
        raise Rejected(f"site {str(data['site'])[:40]!r}...: at most 128 characters")
    kw: dict[str, Any] = {"site": str(data["site"]), "source": source}
    for name in ("duration_s", "ramp_s", *GOALS):
        if data.get(name) is not None:
            try:
                if isinstance(data[name], bool):  # (float(True) is 1: a 1% request for a sender's slip)
                    raise TypeError
                kw[name] = float(data[name])
            except (TypeError, ValueError, OverflowError):  # (an integer of 400 digits)
                raise Rejected(f"{name} = {data[name]!r}: not a number") from None
    racks = data.get("racks")
    racks = () if racks is None or racks == "" else racks  # (false or 0 is no "whole site")
    if isinstance(racks, str):
        racks = [r for r in racks.split(",") if r]
    if not isinstance(racks, (list, tuple)) or not all(isinstance(r, str) and r for r in racks):
        shown = repr(data.get("racks"))
        raise Rejected(f"racks = {shown[:80]}{'...' if len(shown) > 80 else ''}: a list of rack names (or empty for the "
                       f"whole site)")
    if len(racks) > 10_000 or any(len(r) > 128 for r in racks):
        raise Rejected(f"racks: {len(racks)} names, the longest {max(map(len, racks))} characters: at most 10,000 "
                       f"of at most 128 characters")
    kw["racks"] = tuple(racks)
    kw["start"] = _time(data.get("start"), "start", now)
    kw["ts"] = _time(data.get("ts"), "ts", now)
    if sender_id(data):
        if isinstance(data["id"], bool) or not isinstance(data["id"], (str, int)):
            raise Rejected(f"id = {str(data['id'])[:40]}: a string")
        kw["id"] = sender_id(data)
        if not ID.fullmatch(kw["id"]):  # it names files' entries, topics and log lines
            raise Rejected(f"id {kw['id'][:40]!r}{'...' if len(kw['id']) > 40 else ''}: at most 128 letters, digits "
                           f"and . _ : - (or none: one is made up)")
    return PowerRequest(**kw)


def _time(value: Any, name: str, now: datetime) -> datetime:
    if value in (None, "", "now"):
        return now
    try:
        t = datetime.fromisoformat(str(value).upper().replace("Z", "+00:00"))  # (RFC 3339 allows t and z)
    except ValueError:
        raise Rejected(f"{name} = {value!r}: not a time; give RFC 3339 (2026-12-01T18:00:00Z) or \"now\"") from None
    if t.tzinfo is None:
        raise Rejected(f"{name} = {value!r}: give the time zone (a Z for UTC)")
    try:
        return t.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:00:00-05:00 is past the last time in UTC
        raise Rejected(f"{name} = {value!r}: out of range") from None


def in_range(req: PowerRequest, now: datetime) -> None:
    """Rejected unless `req` lasts at most MAX_DURATION_S and starts at most MAX_AHEAD_S after
    `now`: what makes its `end` a time (checked before anything reads it, a stored request's too)."""
    if not math.isfinite(req.duration_s) or req.duration_s <= 0:
        raise Rejected(f"duration_s = {req.duration_s:g}: must be positive")
    if req.duration_s > MAX_DURATION_S:
        raise Rejected(f"duration_s = {req.duration_s:g}: at most {MAX_DURATION_S:g} s ({MAX_DURATION_S / 86400:g} "
                       f"days); a demand-response event lasts hours, not weeks: send a longer one as several")
    ahead = (req.start - now).total_seconds()
    if ahead > MAX_AHEAD_S:
        raise Rejected(f"start {iso_utc(req.start)} is {ahead / 86400:.0f} days ahead (now {iso_utc(now)}); at most "
                       f"{MAX_AHEAD_S / 86400:g} days ahead are taken: send it nearer its time")


def validate(req: PowerRequest, now: datetime, accepted: list[PowerRequest], baseline_kw: float | None = None,
             flexible_kw: float | None = None) -> None:
    """Whether the site takes `req` now, given the requests it has `accepted` (not yet
    over), the covered load's baseline and what it can shed within every GPU's class
    (when known). Raises Rejected saying why not."""
    goals = [g for g in GOALS if getattr(req, g) is not None]
    if len(goals) != 1:
        raise Rejected(f"give exactly one of {', '.join(GOALS)} (got {', '.join(goals) or 'none'})")
    value = getattr(req, goals[0])
    if goals[0] == "reduction_pct" and 0 < value < 1:  # a fraction for a percentage sheds 100 times less
        raise Rejected(f"reduction_pct = {value:g}: a percentage, from 1 to under 100 ({100 * value:g} for "
                       f"{100 * value:g}%)")
    if not math.isfinite(value) or value <= 0 or (goals[0] == "reduction_pct" and value >= 100):
        allowed = "from 1 to under 100" if goals[0] == "reduction_pct" else "positive"
        raise Rejected(f"{goals[0]} = {value:g}: must be {allowed}")
    if not math.isfinite(req.duration_s) or req.duration_s <= 0:
        raise Rejected(f"duration_s = {req.duration_s:g}: must be positive")
    if not math.isfinite(req.ramp_s) or req.ramp_s <= 0 or req.ramp_s > req.duration_s:
        raise Rejected(f"ramp_s = {req.ramp_s:g}: must be positive and no longer than duration_s ({req.duration_s:g})")
    in_range(req, now)
    late = (now - req.start).total_seconds()
    if late > START_GRACE_S:
        raise Rejected(f"start {iso_utc(req.start)} is {late:.0f} s in the past (now {iso_utc(now)}); "
                       f"send a start from now on, or \"now\"")
    for other in accepted:
        if other.id == req.id:
            raise Rejected(f"id {req.id} is taken by an accepted request; cancel it first or use another id")
        # One request at a time per site, racks or not: the power loop runs one (two on other racks had both
        # been accepted, and the second never ran).
        if other.site == req.site and other.start < req.end and req.start < other.end:
            raise Rejected(f"overlaps request {other.id} ({other.where()}, {iso_utc(other.start)} to "
                           f"{iso_utc(other.end)}, {other.goal()}): a site runs one request at a time; cancel it "
                           f"first or start after it ends")
    if baseline_kw is not None:
        if req.target_kw is not None and req.target_kw >= baseline_kw:
            raise Rejected(f"target_kw = {req.target_kw:g}: {req.where()} draws {baseline_kw:.1f} kW, already under it")
        wanted_kw = req.reduction_w(baseline_kw) / 1000.0
        if flexible_kw is not None and wanted_kw > flexible_kw:
            raise Rejected(f"{req.goal()} asks {wanted_kw:.1f} kW of {req.where()}, which can shed at most "
                           f"{flexible_kw:.1f} kW now within every GPU's flexibility class (baseline "
                           f"{baseline_kw:.1f} kW); ask for less")
