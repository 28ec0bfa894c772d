"""A power request's life in the store after it is over (issue 15, the review of the power
role): one report row for a request cancelled before its start and for one that ended while
the role was down (nulls where nothing was measured), the requests over pruned from the store
and from the role's memory a week after, and the store written off the event loop. The
simulated fleet and the role as tests/test_power_role.py drives them; the clock is the data's."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.bus import Topic
from pipeline.model import iso_utc
from pipeline.power.report import report_batch
from pipeline.power.store import NOT_STARTED, RETENTION_S, Change, RequestStore, request_store
from pipeline.roles.power import CANCELLED_DOWN, ENDED_DOWN, NEVER_TAKEN
from tests.conftest import fleetwatch
from tests.test_power_role import Harness

NOTHING_MEASURED = ("requested_kw", "baseline_kw", "reached_s", "reduction_p50_kw", "reduction_min_kw",
                    "energy_curtailed_kwh", "restore_peak_kw")
COSTS = ("gpus_capped", "throughput_lost_gpu_h", "throughput_lost_tflop", "uniform_lost_gpu_h")


def cli_store(h: Harness) -> RequestStore:
    """The store as `fleetwatch power request|cancel` opens it: another reader and writer."""
    return request_store(h.cfg.data_dir)


def idle(h: Harness, seconds: int) -> None:
    """The fleet runs on with no power role reading it."""
    for _ in range(seconds):
        h.sim.step()


def test_a_request_cancelled_before_its_start_gets_one_report_row_saying_nothing_ran(tmp_path):
    h = Harness(tmp_path)
    h.run(90)
    rid = h.ask(reduction_pct=5, start=iso_utc(h.sim.now + timedelta(seconds=400)), duration_s=60)
    h.run(2)
    assert h.store.entries()[0].state == "accepted"
    cli_store(h).cancel(rid, h.sim.now)
    h.run(3)
    (row,) = h.of(Topic.POWER_REPORTS)
    assert row["id"] == rid and row["state"] == "cancelled" and not row["met"]
    assert row["missed_reason"] == NOT_STARTED
    assert all(row[k] is None for k in NOTHING_MEASURED), row
    assert row["gpus_capped"] == 0 and row["throughput_lost_gpu_h"] == 0  # nothing ran: nothing capped or lost
    (entry,) = h.store.entries()
    assert entry.state == "cancelled" and entry.reported
    assert not h.role.ctl.requests  # the controller keeps only what it drives
    h.run(30)
    assert len(h.of(Topic.POWER_REPORTS)) == 1  # once


def test_one_cancelled_while_the_role_was_down_is_reported_at_its_next_start_and_only_then(tmp_path):
    h = Harness(tmp_path)
    h.run(90)
    before = h.ask(reduction_pct=5, start=iso_utc(h.sim.now + timedelta(seconds=1200)), duration_s=60)
    running = h.ask(reduction_pct=8, duration_s=600, start=iso_utc(h.sim.now + timedelta(seconds=300)))
    h.run(2)
    asyncio.run(h.role.close())  # the process stops; both wait for their start in the store
    store = cli_store(h)
    idle(h, 300 + 30)
    store.cancel(before, h.sim.now)
    again = Harness(tmp_path, sim=h.sim)
    again.run(60)  # `running` resumes: it is active now
    assert {e.id: e.state for e in again.store.entries()}[running] == "active"
    store.cancel(running, again.sim.now)  # cancelled while active, then the role stops before it sees it
    asyncio.run(again.role.close())
    third = Harness(tmp_path, sim=h.sim)
    third.run(5)
    rows = {r["id"]: r for r in third.of(Topic.POWER_REPORTS)}
    assert set(rows) == {running}, rows  # `before` was reported by the role before, once
    assert [r["id"] for r in again.of(Topic.POWER_REPORTS)] == [before]
    assert again.of(Topic.POWER_REPORTS)[0]["missed_reason"] == NOT_STARTED
    row = rows[running]
    assert row["state"] == "cancelled" and row["missed_reason"] == CANCELLED_DOWN and not row["met"]
    assert all(row[k] is None for k in NOTHING_MEASURED + COSTS), row  # what it did before the stop is lost
    states = {e.id: (e.state, bool(e.reported)) for e in third.store.entries()}
    assert states == {before: ("cancelled", True), running: ("cancelled", True)}
    fourth = Harness(tmp_path, sim=h.sim)
    fourth.run(5)
    assert not fourth.of(Topic.POWER_REPORTS)


def test_a_request_that_ended_while_the_role_was_down_is_reported_and_power_status_says_so(tmp_path):
    h = Harness(tmp_path)
    h.run(90)
    active = h.ask(reduction_pct=8, duration_s=120)
    waiting = h.ask(reduction_pct=5, start=iso_utc(h.sim.now + timedelta(seconds=200)), duration_s=60)
    h.run(30)
    asyncio.run(h.role.close())
    never = cli_store(h).add({"site": "site-a", "reduction_pct": 5, "duration_s": 60, "id": "never",
                              "start": iso_utc(h.sim.now + timedelta(seconds=400))}, "cli", h.sim.now)[0].id
    idle(h, 600)  # all three are over before the role comes back
    again = Harness(tmp_path, sim=h.sim)
    again.run(5)
    rows = {r["id"]: r for r in again.of(Topic.POWER_REPORTS)}
    assert set(rows) == {active, waiting, never}
    for rid, why in ((active, ENDED_DOWN), (waiting, ENDED_DOWN), (never, NEVER_TAKEN)):
        row = rows[rid]
        assert row["state"] == "done" and not row["met"] and row["missed_reason"] == why, row
        assert all(row[k] is None for k in NOTHING_MEASURED + COSTS), row
        assert row["ts"] == row["end"]  # when it was over, not when the role found out
    assert {e.id: e.state for e in again.store.entries()} == {active: "done", waiting: "done", never: "done"}
    out = fleetwatch("power", "status", "--data-dir", again.cfg.data_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(" done ") == 3 and "ended while the power role was down" in out.stdout, out.stdout
    # What `fleetwatch power report` reads back from the archive: nulls, said as such.
    from pipeline.sinks.parquet import ArchiveWriter
    writer = ArchiveWriter(again.cfg.archive_dir)
    writer.add("power_requests", report_batch(list(rows.values())))
    writer.flush()
    out = fleetwatch("power", "report", "--json", "--data-dir", again.cfg.data_dir)
    back = {r["id"]: r for r in json.loads(out.stdout)}
    assert back[never]["gpus_capped"] is None and back[never]["missed_reason"] == NEVER_TAKEN
    out = fleetwatch("power", "report", "--data-dir", again.cfg.data_dir)
    assert out.returncode == 0 and "NOT met; asked - from -" in out.stdout and "- GPUs capped" in out.stdout, out.stdout


def test_requests_over_are_pruned_a_week_after_from_the_store_and_the_role(tmp_path):
    h = Harness(tmp_path)
    old = h.sim.now - timedelta(seconds=RETENTION_S + 3600)
    recent = h.sim.now - timedelta(days=2)
    store = cli_store(h)
    for i, (rid, at) in enumerate((("old-done", old), ("old-rejected", old), ("old-cancelled", old),
                                   ("recent-done", recent))):
        store.add({"site": "site-a", "reduction_pct": 5, "duration_s": 60, "id": rid,
                   "start": iso_utc(at + timedelta(minutes=2 * i))}, "cli", at)
    store.cancel("old-cancelled", old)  # before its start, and never reported: it is reported first
    store.apply([Change("old-done", "done", "", reported=iso_utc(old)), Change("old-rejected", "rejected", "no"),
                 Change("recent-done", "done", "", reported=iso_utc(recent))])
    h.run(5)  # the role's first step prunes
    assert {e.id for e in h.store.entries()} == {"old-cancelled", "recent-done"}
    (row,) = h.of(Topic.POWER_REPORTS)
    assert row["id"] == "old-cancelled" and row["missed_reason"] == NOT_STARTED
    # A request run to its end: its numbers stay for `power status` (the controller forgets it), and
    # the role forgets it with the store a week after.
    h.run(85)
    rid = h.ask(reduction_pct=8, duration_s=60)
    h.run(60 + 150)
    t = h.role.tracked[rid]
    assert t.state == "done" and t.outcome is None and not h.role.ctl.requests
    (live,) = [r for r in json.loads(fleetwatch("power", "status", "--json", "--data-dir", h.cfg.data_dir).stdout)
               ["requests"] if r["id"] == rid]
    assert live["state"] == "done" and live["baseline_kw"] > 0 and live["achieved_kw"] is not None
    asyncio.run(h.role.flush(prune_at=h.sim.now + timedelta(seconds=RETENTION_S - 3600)))
    assert rid in h.role.tracked and rid in {e.id for e in h.store.entries()}
    asyncio.run(h.role.flush(prune_at=h.sim.now + timedelta(seconds=RETENTION_S + 3600)))
    assert rid not in h.role.tracked and not h.store.entries()
    assert rid not in h.role.status()["requests"]


def test_a_request_not_over_is_never_pruned(tmp_path):
    h = Harness(tmp_path)
    h.run(90)
    rid = h.ask(reduction_pct=5, start=iso_utc(h.sim.now + timedelta(days=30)), duration_s=60)
    h.run(2)
    asyncio.run(h.role.flush(prune_at=h.sim.now + timedelta(days=60)))
    assert [e.id for e in h.store.entries()] == [rid] and rid in h.role.tracked


def test_the_role_writes_the_store_from_its_worker_thread_not_the_event_loop(tmp_path, monkeypatch):
    writers: list[str] = []
    for name in ("_write", "write_status"):
        real = getattr(RequestStore, name)

        def spy(self, *args, _real=real):
            writers.append(threading.current_thread().name)
            return _real(self, *args)
        monkeypatch.setattr(RequestStore, name, spy)
    h = Harness(tmp_path)
    h.run(90)
    rid = h.ask(reduction_pct=8, duration_s=60)  # the CLI's write, not the role's
    writers.clear()
    h.run(60 + 150)
    asyncio.run(h.role.close())
    assert writers and all(w.startswith("power-store") for w in set(writers)), set(writers)
    assert {e.id: e.state for e in h.store.entries()} == {rid: "done"}
    assert json.loads(h.store.status_path.read_text())["requests"][rid]["state"] == "done"


def test_changes_the_file_could_not_take_are_written_once_it_is_fixed(tmp_path):
    h = Harness(tmp_path)
    h.run(90)
    rid = h.ask(reduction_pct=8, duration_s=60)
    h.run(10)
    good = h.store.path.read_text(encoding="utf-8")
    h.store.path.write_text("{not json", encoding="utf-8")
    h.run(60 + 150)
    assert h.role.tracked[rid].state == "done"
    h.store.path.write_text(good, encoding="utf-8")  # fixed by hand, as it was before
    h.run(2)
    (entry,) = h.store.entries()
    assert entry.state == "done" and entry.reported


@pytest.mark.parametrize("state", ["done", "cancelled", "rejected"])
def test_the_store_keeps_a_request_over_a_week_after_its_last_news(tmp_path, state):
    store = RequestStore(Path(tmp_path) / "power")
    from pipeline.analytics.evaluate import EVAL_EPOCH
    now = EVAL_EPOCH
    store.add({"site": "site-a", "reduction_kw": 5, "duration_s": 3600, "id": "r", "start": iso_utc(now)}, "cli", now)
    store.apply([Change("r", state, "x", reported=iso_utc(now) if state != "rejected" else "")])
    week = timedelta(seconds=RETENTION_S)
    assert store.apply([], prune_at=now + week) == (True, [])  # within a week of its end (an hour after start)
    assert store.apply([], prune_at=now + week + timedelta(hours=2)) == (True, ["r"])
    assert not RequestStore(Path(tmp_path) / "power").entries()
