"""`fleetwatch alerts` and `fleetwatch silence`, run as a user runs them."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.model import Alert, alerts_to_batch
from pipeline.sinks.parquet import ArchiveWriter
from tests.conftest import fleetwatch

def mk(now: datetime, name: str, severity: str, where: dict[str, str], started_min_ago: float,
       ended_min_ago: float | None = None) -> Alert:
    labels = {"alertname": name, "severity": severity, "site": "site-a", **where}
    return Alert(labels, {"summary": f"{name} at {'/'.join(where.values())}", "runbook_url": f"runbooks/{name}.md"},
                 now - timedelta(minutes=started_min_ago), "test", 1.0, {"x": 1.0},
                 None if ended_min_ago is None else now - timedelta(minutes=ended_min_ago))


@pytest.fixture
def history() -> list[Alert]:
    """Alert state changes in the order they happened, timed back from now (taken per test:
    the table shows ages, and a session can take minutes to reach a test)."""
    now = datetime.now(timezone.utc)
    ecc = {"rack": "r02", "node": "r02-n01", "gpu": "0"}
    straggler = {"rack": "r02", "node": "r02-n05", "gpu": "7"}
    return [mk(now, "GpuUncorrectableEcc", "critical", ecc, 3 * 1440),
            mk(now, "GpuUncorrectableEcc", "critical", ecc, 3 * 1440, 2 * 1440),
            mk(now, "GpuStraggler", "warning", straggler, 120),
            mk(now, "GpuStraggler", "warning", straggler, 120, 60),
            mk(now, "CoolantFlowLoss", "critical", {"rack": "r01"}, 30),
            mk(now, "CoolantFlowLoss", "critical", {"rack": "r01"}, 30, 20),
            mk(now, "GpuXid", "critical", {"rack": "r01", "node": "r01-n03", "gpu": "2"}, 10),
            mk(now, "CoolantFlowLoss", "critical", {"rack": "r01"}, 5)]


@pytest.fixture
def data_dir(tmp_path: Path, history: list[Alert]) -> Path:
    """alerts.jsonl as a daemon writes it, caught mid-append (a partial last line)."""
    lines = "".join(json.dumps(a.to_json(), sort_keys=True) + "\n" for a in history)
    (tmp_path / "alerts.jsonl").write_text(lines + '{"annotations": {"summ')
    return tmp_path


def alerts(data_dir: Path, *args: str):
    p = fleetwatch("alerts", "--data-dir", str(data_dir), *args, timeout=60)
    assert p.returncode == 0, p.stderr
    return p


def rows(stdout: str) -> list[list[str]]:
    """The table's rows as cells (cells are separated by two or more spaces)."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["STATUS", "SEVERITY", "ALERT", "WHERE", "SINCE", "(UTC)", "SUMMARY"]
    return [re.split(r"\s{2,}", line) for line in lines[1:] if line.startswith(("firing ", "resolved "))]


def names(stdout: str) -> list[str]:
    return [r[2] for r in rows(stdout)]


def test_alerts_table_latest_state_firing_first_then_critical_then_newest(data_dir, history):
    p = alerts(data_dir)
    assert p.stderr == ""
    table = rows(p.stdout)
    assert [r[:4] for r in table] == [
        ["firing", "critical", "CoolantFlowLoss", "site-a/r01"],  # fired again 5 min ago: the latest state wins
        ["firing", "critical", "GpuXid", "site-a/r01/r01-n03/gpu2"],
        ["resolved", "warning", "GpuStraggler", "site-a/r02/r02-n05/gpu7"],
    ]  # the ECC error resolved two days ago: older than the default --since 24h
    xid = next(a for a in history if a.alertname == "GpuXid")
    # Ages are the CLI's own "now" minus the alert's times: their shape, not how long the CLI took to start.
    assert re.fullmatch(rf"{xid.starts_at:%Y-%m-%d %H:%M:%S} \(1\dm ago\)", table[1][4]), table[1][4]
    assert re.search(r"\(2h\d\dm ago, lasted 1h00m\)$", table[2][4]), table[2][4]
    assert table[1][5] == "GpuXid at r01/r01-n03/2"
    assert p.stdout.splitlines()[-1] == f"3 alerts (2 firing, 1 resolved); from {data_dir / 'alerts.jsonl'}"


@pytest.mark.parametrize("args, expected", [
    (["--status", "active"], ["CoolantFlowLoss", "GpuXid"]),
    (["--status", "resolved", "--since", "0"], ["GpuUncorrectableEcc", "GpuStraggler"]),
    (["--status", "resolved", "--since", "3d"], ["GpuUncorrectableEcc", "GpuStraggler"]),
    (["--since", "30m"], ["CoolantFlowLoss", "GpuXid"]),
    (["--rack", "r02", "--since", "7d"], ["GpuUncorrectableEcc", "GpuStraggler"]),
    (["--severity", "warning"], ["GpuStraggler"]),
    (["--node", "r01-n03"], ["GpuXid"]),
    (["--site", "site-b"], []),
])
def test_alerts_filters(data_dir, args, expected):
    p = alerts(data_dir, *args)
    if expected:
        assert names(p.stdout) == expected
    else:
        assert p.stdout == f"no alerts match the filters (4 recorded); from {data_dir / 'alerts.jsonl'}\n"


def test_alerts_limit_says_what_it_left_out(data_dir):
    p = alerts(data_dir, "--limit", "1")
    assert names(p.stdout) == ["CoolantFlowLoss"]
    assert "1 alert (1 firing, 0 resolved); 2 more not shown (raise --limit)" in p.stdout.splitlines()[-1]


def test_alerts_json_is_the_alert_objects(data_dir, history):
    got = json.loads(alerts(data_dir, "--json", "--since", "0").stdout)
    latest = {a.fingerprint: a.to_json() for a in history}
    assert {a["fingerprint"] for a in got} == set(latest)
    assert all(a == latest[a["fingerprint"]] for a in got)
    assert [a["labels"]["alertname"] for a in got][:2] == ["CoolantFlowLoss", "GpuXid"]


def test_alerts_reports_a_corrupt_line_but_not_the_one_being_written(data_dir):
    path = data_dir / "alerts.jsonl"
    lines = path.read_text().split("\n")
    path.write_text("\n".join([*lines[:2], "garbage", '{"status": "firing"}', *lines[2:]]))
    p = alerts(data_dir)
    assert names(p.stdout) == ["CoolantFlowLoss", "GpuXid", "GpuStraggler"]
    assert p.stdout.splitlines()[-1] == f"warning: skipped 2 unreadable lines of {path} (line 3, 4)"


def test_alerts_read_the_archive_when_there_is_no_alerts_jsonl(tmp_path, history):
    writer = ArchiveWriter(tmp_path / "archive")
    writer.add("alerts", alerts_to_batch([(a.ends_at or a.starts_at, a) for a in history]))
    writer.flush()
    p = alerts(tmp_path)
    assert [r[:3] for r in rows(p.stdout)] == [["firing", "critical", "CoolantFlowLoss"],
                                              ["firing", "critical", "GpuXid"],
                                              ["resolved", "warning", "GpuStraggler"]]
    assert p.stdout.splitlines()[-1].endswith(f"from {tmp_path / 'archive' / 'alerts'}")


def test_alerts_with_no_data_say_where_they_looked(tmp_path):
    p = alerts(tmp_path)
    assert p.stdout == (f"no alerts recorded yet: neither {tmp_path / 'alerts.jsonl'} nor "
                        f"{tmp_path / 'archive' / 'alerts'} exists.\n"
                        f"A running daemon (fleetwatch run) writes them; if it runs elsewhere, pass its --data-dir.\n")
    p = alerts(tmp_path, "--json")
    assert p.stdout == "[]\n" and "no alerts recorded yet" in p.stderr


@pytest.mark.parametrize("args, says", [
    (["--data-dir", "/nonexistent/fw"], "data_dir '/nonexistent/fw' does not exist; pass the daemon's --data-dir"),
    (["--since", "2x"], "--since '2x': expected a positive duration such as 90s, 30m, 2h, 1d"),
    (["--limit", "0"], "--limit 0: must be at least 1"),
    (["--severity", "bad"], "invalid choice: 'bad'"),
])
def test_alerts_bad_usage_exits_2_saying_what_to_do(tmp_path, args, says):
    p = fleetwatch("alerts", "--data-dir", str(tmp_path), *args, timeout=60)
    assert p.returncode == 2 and says in p.stderr, p.stderr


def test_alerts_of_a_real_run(tmp_path):
    env = {"FLEETWATCH_FLEET__RACKS": "2", "FLEETWATCH_FLEET__NODES_PER_RACK": "4",
           "FLEETWATCH_FLEET__FAULT_INTERVAL_S": "10", "FLEETWATCH_ALERTS__CONSOLE": "false"}
    run = fleetwatch("run", "--duration", "4", "--speed", "0", "--data-dir", str(tmp_path), env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    written = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    latest = {a["fingerprint"]: a for a in written}
    assert latest, "the run raised no alerts"
    shown = json.loads(alerts(tmp_path, "--json", "--since", "0", "--limit", "1000").stdout)
    assert {a["fingerprint"]: a for a in shown} == latest
    p = alerts(tmp_path, "--status", "active", "--since", "0", "--limit", "1000")
    firing = sum(a["status"] == "firing" for a in latest.values())
    assert len(rows(p.stdout)) == firing if firing else "no alerts match" in p.stdout


# ---- silences ----------------------------------------------------------------------------------

def silence(data_dir: Path, *args: str, **env: str):
    return fleetwatch("silence", *args, "--data-dir", str(data_dir), env=env, timeout=60)


def test_silence_add_list_expire(tmp_path):
    p = silence(tmp_path, "add", "-m", "alertname=GpuXid", "-m", "rack=~r0[12]", "--duration", "90m",
                "--comment", "reseating r01-n03", USER="ana")
    assert p.returncode == 0, p.stderr
    m = re.fullmatch(r"silence ([0-9a-f]{32}) added: mutes alertname=GpuXid, rack=~r0\[12\] until "
                     r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+)\n", p.stdout)
    assert m, p.stdout
    sid = m.group(1)
    listing = silence(tmp_path, "list").stdout.splitlines()
    assert listing[0].split() == ["ID", "MATCHERS", "ENDS", "CREATED", "BY", "COMMENT"]
    cells = re.split(r"\s{2,}", listing[1])
    assert cells[:2] == [sid, "alertname=GpuXid rack=~r0[12]"] and cells[3:] == ["ana", "reseating r01-n03"]
    assert re.fullmatch(r"in 1h[0-2]\dm", cells[2]), cells[2]  # 90 minutes from `add`, less the time since
    assert listing[2] == f"active silences: 1 (in {tmp_path / 'silences.json'})"

    assert silence(tmp_path, "expire", sid[:6]).stdout == f"silence {sid} expired\n"
    assert silence(tmp_path, "expire", sid).stdout == f"silence {sid} had already expired\n"
    assert silence(tmp_path, "list").stdout == f"no active silences (in {tmp_path / 'silences.json'})\n"
    expired = silence(tmp_path, "list", "--all").stdout.splitlines()
    assert re.fullmatch(r"ended (\d+s|\d+m\d\ds) ago", re.split(r"\s{2,}", expired[1])[2]), expired[1]


@pytest.mark.parametrize("args, says", [
    (["-m", "alertname~GpuXid", "--comment", "x"], "matcher 'alertname~GpuXid': expected LABEL=VALUE"),
    (["-m", "rack=~r0[", "--comment", "x"], "is not a valid regular expression"),
    (["-m", "rack!=r01", "--comment", "x"], "add one that needs a value, e.g. -m alertname=GpuXid"),
    (["-m", "rack=r01", "--comment", "x", "--duration", "forever"], "--duration 'forever': expected a positive"),
    (["-m", "rack=r01"], "the following arguments are required: --comment"),
    (["--comment", "x"], "the following arguments are required: -m/--matcher"),
])
def test_silence_add_bad_input_exits_2(tmp_path, args, says):
    p = silence(tmp_path, "add", *args)
    assert p.returncode == 2 and says in p.stderr, p.stderr
    assert not (tmp_path / "silences.json").exists()


def test_silence_expire_unknown_id_exits_2(tmp_path):
    p = silence(tmp_path, "expire", "deadbeef")
    assert p.returncode == 2
    assert p.stderr == (f"fleetwatch: no silence with id 'deadbeef' in {tmp_path / 'silences.json'}; "
                        f"`fleetwatch silence list --all` shows the ids\n")
