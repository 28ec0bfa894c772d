"""Rotation of alerts.jsonl and the dead-letter files (sinks/files.Rotation): daily and by
size, the old file kept beside under its day, the alerts still firing carried into the new
alerts.jsonl, rotated files past their keep deleted."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline.analytics.alerts_table import AlertQuery, query
from pipeline.model import iso_utc
from pipeline.sinks.alerts import AlertLog, read_jsonl
from pipeline.sinks.files import Rotation, append_durably, rotate
from pipeline.sources.mqtt import DeadLetterFile

DAY = 86400.0


def age(path: Path, days: float) -> None:
    """As if last written `days` ago."""
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def alert(name: str, status: str, at: float) -> dict:
    return {"fingerprint": name, "status": status, "labels": {"alertname": name, "severity": "warning"},
            "annotations": {}, "startsAt": iso_utc(at - 60), "endsAt": iso_utc(at) if status == "resolved"
            else "0001-01-01T00:00:00Z", "generatorURL": ""}


def test_a_file_rotates_on_a_new_day_and_at_its_size_and_old_ones_go(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    now = datetime(2026, 3, 5, 12, tzinfo=timezone.utc).timestamp()
    append_durably(path, "a\n")
    os.utime(path, (now - 3600, now - 3600))  # written today: stays
    assert rotate(path, Rotation(max_bytes=100), now=now) is None and path.read_text() == "a\n"
    os.utime(path, (now - DAY, now - DAY))  # written yesterday: kept under that day
    kept = rotate(path, Rotation(max_bytes=100), now=now)
    assert kept == tmp_path / "x.2026-03-04.jsonl" and kept.read_text() == "a\n" and path.read_text() == ""
    append_durably(path, "b" * 99 + "\n")  # today, at its size: kept under today, numbered
    os.utime(path, (now, now))
    assert rotate(path, Rotation(max_bytes=100), now=now) == tmp_path / "x.2026-03-05.jsonl"
    append_durably(path, "c" * 99 + "\n")
    os.utime(path, (now, now))
    assert rotate(path, Rotation(max_bytes=100), now=now) == tmp_path / "x.2026-03-05.1.jsonl"
    # Thirty days on, the rotated files of March 4 and 5 go, the newer stay; other files are not touched.
    (tmp_path / "x.2026-04-04.jsonl").write_text("d\n")
    (tmp_path / "y.2026-03-01.jsonl").write_text("other\n")
    append_durably(path, "e\n")
    os.utime(path, (now + 30 * DAY, now + 30 * DAY))
    rotate(path, Rotation(max_bytes=100, keep_days=30), now=now + 31 * DAY)
    assert {p.name for p in tmp_path.iterdir()} == {"x.2026-04-04.jsonl", "x.2026-04-04.1.jsonl", "x.jsonl",
                                                    "y.2026-03-01.jsonl"}


def test_the_alert_log_carries_what_fires_into_the_new_day(tmp_path: Path) -> None:
    log = AlertLog(tmp_path / "alerts.jsonl", Rotation())
    t = time.time()
    log.append([alert("A", "firing", t - DAY), alert("B", "firing", t - DAY)])
    log.append([alert("B", "resolved", t - DAY + 600)])
    age(log.path, 1)
    log.append([alert("C", "firing", t)])
    [kept] = tmp_path.glob("alerts.*.jsonl")
    assert [json.loads(x)["fingerprint"] for x in kept.read_text().splitlines()] == ["A", "B", "B"]
    assert [json.loads(x)["fingerprint"] for x in log.path.read_text().splitlines()] == ["A", "C"]
    latest, bad = read_jsonl(log.path)
    assert {k: v["status"] for k, v in latest.items()} == {"A": "firing", "C": "firing"} and not bad
    listing = query(tmp_path, AlertQuery(since_s=None))  # and B, resolved yesterday, from the rotated file
    assert {a["fingerprint"]: a["status"] for a in listing.alerts} == {"A": "firing", "B": "resolved", "C": "firing"}


def across_a_day(dead: DeadLetterFile) -> None:
    """Dead letter "one" written yesterday, "two" today; then closed."""
    dead.write("bms/x", b"{", "bad_json", "one")
    dead.settle()
    age(dead.path, 1)
    dead.write("bms/x", b"}", "bad_json", "two")
    dead.close()


def test_the_mqtt_dead_letters_rotate_under_an_open_handle(tmp_path: Path) -> None:
    dead = DeadLetterFile(tmp_path / "mqtt.jsonl", Rotation())
    across_a_day(dead)
    [kept] = tmp_path.glob("mqtt.*.jsonl")
    assert [json.loads(x)["detail"] for x in kept.read_text().splitlines()] == ["one"]
    assert [json.loads(x)["detail"] for x in dead.path.read_text().splitlines()] == ["two"]


def test_a_file_named_like_a_rotated_one_but_no_date_stops_no_rotation(tmp_path: Path) -> None:
    """A stray alerts.2025-02-30.jsonl beside it: the pruning's date parse had raised out of every append to a
    rotated file (alerts.jsonl, the dead letters), and killed the MQTT dead letters' thread."""
    (tmp_path / "mqtt.2025-02-30.jsonl").write_text("")
    dead = DeadLetterFile(tmp_path / "mqtt.jsonl", Rotation())
    across_a_day(dead)
    assert [json.loads(x)["detail"] for x in dead.path.read_text().splitlines()] == ["two"]
    assert dead.unwritten == 0 and (tmp_path / "mqtt.2025-02-30.jsonl").exists()


def test_without_hard_links_the_old_file_is_copied(tmp_path: Path, monkeypatch) -> None:
    def no_links(*_):
        raise PermissionError("operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "alerts.jsonl"
    append_durably(path, "a\n")
    age(path, 1)
    kept = rotate(path, Rotation())
    assert kept is not None and kept.read_text() == "a\n" and path.read_text() == ""
