"""Silences: label matchers that mute matching alerts for a while (Alertmanager's model).

They live in one JSON file, `<data_dir>/silences.json`, which `fleetwatch silence`
writes (atomically: a temporary file renamed over it) and a running daemon re-reads
when it changes. Each entry has the shape of Alertmanager's API v2 silence
(`matchers` with `isRegex`/`isEqual`, RFC 3339 `startsAt`/`endsAt`): without its `id`,
an entry can be POSTed to an Alertmanager's /api/v2/silences as it is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from pipeline.config import ConfigError
from pipeline.humanize import age
from pipeline.model import iso_utc, parse_iso_utc
from pipeline.sinks.files import SharedJson

log = logging.getLogger(__name__)

OPS = ("=", "!=", "=~", "!~")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*')
_NEEDS_QUOTES = re.compile(r'[\s,"]')
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, what: str) -> float:
    """Seconds of '90s', '30m', '2h', '1d' or '45' (seconds); ConfigError naming `what` otherwise."""
    m = _DURATION.fullmatch(text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{what} {text!r}: expected a positive duration such as 90s, 30m, 2h, 1d or "
                          f"a number of seconds")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass(frozen=True)
class Matcher:
    """`name op value`; regexes match the whole label value, a missing label is ''."""
    name: str
    op: str
    value: str
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"matcher {self.name}{self.op}{self.value}: unknown operator {self.op!r}; "
                              f"use one of {' '.join(OPS)}")
        if self.op in ("=~", "!~"):
            try:
                object.__setattr__(self, "_regex", re.compile(self.value))
            except re.error as e:
                raise ConfigError(f"matcher {self}: {self.value!r} is not a valid regular expression ({e})") from None

    @classmethod
    def parse(cls, text: str) -> Matcher:
        """'alertname=GpuXid', 'rack=~r0[12]', 'node!=n3', 'severity!~info|warning'; the value may be quoted."""
        m = _MATCHER.fullmatch(text)
        if not m:
            raise ConfigError(f"matcher {text!r}: expected LABEL=VALUE, LABEL!=VALUE, LABEL=~REGEX or "
                              f"LABEL!~REGEX, e.g. alertname=GpuXid or rack=~r0[12]")
        name, op, value = m.groups()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        return cls(name, op, value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        v = labels.get(self.name, "")
        if self._regex is not None:
            return (self._regex.fullmatch(v) is not None) == (self.op == "=~")
        return (v == self.value) == (self.op == "=")

    def __str__(self) -> str:
        quoted = _NEEDS_QUOTES.search(self.value) or not self.value
        return f"{self.name}{self.op}{json.dumps(self.value) if quoted else self.value}"


@dataclass(frozen=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    created_by: str
    comment: str

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "matchers": [{"name": m.name, "value": m.value, "isRegex": m.op in ("=~", "!~"),
                          "isEqual": m.op in ("=", "=~")} for m in self.matchers],
            "startsAt": iso_utc(self.starts_at, "microseconds"), "endsAt": iso_utc(self.ends_at, "microseconds"),
            "createdBy": self.created_by, "comment": self.comment,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Silence:
        ops = {(False, True): "=", (False, False): "!=", (True, True): "=~", (True, False): "!~"}
        return cls(id=str(d["id"]),
                   matchers=tuple(Matcher(m["name"], ops[bool(m.get("isRegex")), bool(m.get("isEqual", True))],
                                          m["value"]) for m in d["matchers"]),
                   starts_at=parse_iso_utc(d["startsAt"]), ends_at=parse_iso_utc(d["endsAt"]),
                   created_by=str(d.get("createdBy", "")), comment=str(d.get("comment", "")))


class SilenceStore:
    """The silences of one file. Writers (the CLI) read, change and replace the file under
    an advisory lock; readers (the daemon) call refresh() to pick up changes."""

    def __init__(self, path: Path) -> None:
        self.file = SharedJson(path, "silences")
        self.path = self.file.path
        self._silences: dict[str, Silence] = {}
        self.refresh()

    def add(self, matchers: Iterable[Matcher | str], duration_s: float, created_by: str, comment: str,
            now: float | None = None) -> Silence:
        ms = tuple(m if isinstance(m, Matcher) else Matcher.parse(m) for m in matchers)
        if not ms:
            raise ConfigError("a silence needs at least one matcher, e.g. -m alertname=GpuXid -m rack=r01")
        if not duration_s > 0:
            raise ConfigError(f"silence duration {duration_s}: must be > 0 seconds")
        if not comment.strip():
            raise ConfigError("a silence needs a comment saying why (e.g. the ticket), so others know")
        if all(m.matches({}) for m in ms):  # Alertmanager refuses these too: they would mute far too much
            raise ConfigError(f"matchers {', '.join(map(str, ms))} all match an empty label, so they would also "
                              f"mute every alert without those labels; add one that needs a value, "
                              f"e.g. -m alertname=GpuXid")
        start = time.time() if now is None else now
        silence = Silence(uuid.uuid4().hex, ms, start, start + duration_s, created_by, comment)
        with self._locked():
            self._silences[silence.id] = silence
            self._write()
        return silence

    def expire(self, silence_id: str, now: float | None = None) -> Silence:
        """End a silence now (an id or a unique prefix of one); an expired one is returned unchanged."""
        now = time.time() if now is None else now
        with self._locked():
            found = [s for i, s in self._silences.items() if i.startswith(silence_id.strip())] if silence_id else []
            if not found:
                raise ConfigError(f"no silence with id {silence_id!r} in {self.path}; "
                                  f"`fleetwatch silence list --all` shows the ids")
            if len(found) > 1:
                raise ConfigError(f"id prefix {silence_id!r} matches {len(found)} silences "
                                  f"({', '.join(s.id for s in found)}); give more of the id")
            s = found[0]
            if s.ends_at <= now:
                return s
            s = Silence(s.id, s.matchers, min(s.starts_at, now), now, s.created_by, s.comment)
            self._silences[s.id] = s
            self._write()
            return s

    def all(self) -> list[Silence]:
        return sorted(self._silences.values(), key=lambda s: (s.starts_at, s.id))

    def active(self, now: float) -> list[Silence]:
        return [s for s in self.all() if s.active(now)]

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if the silences changed. A file that does not
        parse is logged (once per version) and the last good set kept."""
        if not self.file.changed():
            return False
        try:
            silences = self._read()
        except ConfigError as e:
            log.warning("%s; keeping the %d silences read before", e, len(self._silences))
            return False
        changed = silences != self._silences
        self._silences = silences
        return changed

    def _read(self) -> dict[str, Silence]:
        doc = self.file.read()
        try:
            return {s.id: s for s in map(Silence.from_json, doc["silences"])} if doc is not None else {}
        except (ValueError, KeyError, TypeError, ConfigError) as e:
            raise self.file.unreadable(e) from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Writers one at a time (two operators adding silences at once), on the file as it is now."""
        with self.file.locked():
            self._silences = self._read()
            yield

    def _write(self) -> None:
        self.file.write({"version": 1, "silences": [s.to_json() for s in self.all()]})


def silence_store(data_dir: str | os.PathLike[str]) -> SilenceStore:
    """The store a daemon and the CLI share: `<data_dir>/silences.json`."""
    return SilenceStore(Path(data_dir) / "silences.json")


def silences_table(silences: list[Silence], now: float, path: Path, expired_too: bool = False) -> str:
    """Silences as an aligned text table, then a line saying how many and from where."""
    if not silences:
        return f"no {'' if expired_too else 'active '}silences (in {path})"
    head = ["ID", "MATCHERS", "ENDS", "CREATED BY", "COMMENT"]
    rows = [[s.id, " ".join(map(str, s.matchers)),
             f"in {age(s.ends_at - now)}" if s.active(now) else
             f"starts in {age(s.starts_at - now)}" if s.starts_at > now else f"ended {age(now - s.ends_at)} ago",
             s.created_by, s.comment] for s in silences]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in [head, *rows]]
    lines.append(f"{'silences' if expired_too else 'active silences'}: {len(silences)} (in {path})")
    return "\n".join(lines)
