"""The local alert log: alerts.jsonl, every alert state change, whatever the receivers do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.model import parse_iso_utc
from pipeline.sinks.files import Rotation, append_durably


class AlertLog:
    """Append-only JSON lines, one per alert state change, fsynced per batch; rotated daily and
    by size (`rotation`, sinks/files.Rotation), the new file starting with the latest line of
    every alert still firing, so that a reader of alerts.jsonl alone knows what fires."""

    def __init__(self, path: Path, rotation: Rotation | None = None) -> None:
        self.path = Path(path)
        self.rotation = rotation
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.open("a").close()  # there from the start, before the first alert: tail -F and tools find it

    def append(self, alerts: list[dict[str, Any]]) -> None:
        if not alerts:
            return
        append_durably(self.path, "".join(_line(a) for a in alerts), self.rotation, carry=firing_lines)


def _line(alert: dict[str, Any]) -> str:
    return json.dumps(alert, sort_keys=True) + "\n"


def firing_lines(path: Path) -> str:
    """The latest line of each alert firing in the log at `path`, oldest change first."""
    latest, _ = read_jsonl(path)
    return "".join(_line(a) for a in sorted((a for a in latest.values() if a["status"] == "firing"), key=changed_at))


def changed_at(alert: dict[str, Any]) -> float:
    """When the alert last changed state: its end when resolved, else its start."""
    return parse_iso_utc(alert["endsAt"] if alert["status"] == "resolved" else alert["startsAt"])


def read_jsonl(path: Path) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """Latest alert per fingerprint, and the numbers of lines that did not parse (a daemon
    mid-write leaves a partial last line; that one is not reported)."""
    latest: dict[str, dict[str, Any]] = {}
    bad: list[int] = []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            a = json.loads(line)
            changed_at(a)  # a line that is JSON but no alert object counts as unreadable too
            if not (isinstance(a["labels"], dict) and isinstance(a["fingerprint"], str)):
                raise TypeError("not an alert object")
            latest[a["fingerprint"]] = a
        except (ValueError, KeyError, TypeError, AttributeError):
            if n < len(lines):  # the last piece has no newline yet: still being written
                bad.append(n)
    return latest, bad
