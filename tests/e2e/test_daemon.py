"""`fleetwatch run` as a user runs it: a real process, real signals, a real webhook receiver,
and what lands in Parquet and alerts.jsonl."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request

import duckdb
import polars as pl
import pytest

from pipeline.model import fingerprint
from tests.conftest import fleetwatch
from tests.helpers import FAST, archived, reported_samples, run_on_terminal, start, wait_for

pytestmark = pytest.mark.slow


def test_run_for_a_duration_lands_everything(tmp_path, receiver):
    r = fleetwatch("run", "--duration", "12", "--data-dir", "data", "--seed", "3", cwd=tmp_path,
                   env=FAST | {"FLEETWATCH_ALERTS__WEBHOOKS": receiver.url, "FLEETWATCH_ALERTS__GROUP_WAIT_S": "0",
                               "FLEETWATCH_ALERTS__GROUP_INTERVAL_S": "0"}, timeout=120)
    assert r.returncode == 0, r.stderr
    data = tmp_path / "data"
    # Not a terminal: periodic status log lines instead of a live line.
    assert re.search(r"GPU samples/s .*nodes healthy \d+ suspect \d+ failing \d+", r.stderr)
    gpu = archived(data, "gpu_samples")
    assert gpu.height == reported_samples(r.stderr) > 0
    assert gpu.select(pl.struct("gpu_uuid", "ts").is_unique().all()).item()  # no duplicates
    assert archived(data, "facility_samples").height > 0
    labels = archived(data, "fault_labels")
    assert labels.height >= 3 and set(labels.columns) >= {"fault_type", "rack", "node", "gpu", "start", "end"}
    alerts = archived(data, "alerts")
    firing = alerts.filter(pl.col("status") == "firing")
    assert firing.height >= 3
    # alerts.jsonl has the same state changes, in Alertmanager's shape.
    lines = [json.loads(x) for x in (data / "alerts.jsonl").read_text().splitlines()]
    assert sorted((a["fingerprint"], a["status"]) for a in lines) == \
        sorted(zip(alerts["fingerprint"].to_list(), alerts["status"].to_list()))
    for a in lines:
        assert a["fingerprint"] == fingerprint(a["labels"])
        assert {"summary", "description", "runbook_url"} <= set(a["annotations"])
        runbook = a["annotations"]["runbook_url"]  # the page installed with Fleetwatch, opened as a user would
        assert runbook.startswith("file://") and runbook.endswith(f"/{a['labels']['alertname']}.md")
        assert urllib.request.urlopen(runbook).read().startswith(b"# ")
    assert archived(data, "node_health").height >= 1
    # Printed on the console too.
    for a in lines[:3]:
        assert a["annotations"]["summary"] in r.stdout
    # The webhook got Alertmanager v4 payloads, one per group (alerts.group_by), with every
    # firing alert but the inhibited ones (logged as muted), and resolutions of those it got.
    delivered = {(a["fingerprint"], a["status"]) for p in receiver.payloads for a in p["alerts"]}
    muted = set(re.findall(r"alert \w+ ([0-9a-f]{16}) muted", r.stderr))
    assert delivered <= {(a["fingerprint"], a["status"]) for a in lines}
    assert {fp for fp, status in delivered if status == "firing"} == \
        {a["fingerprint"] for a in lines if a["status"] == "firing"} - muted
    for p in receiver.payloads:
        assert p["version"] == "4" and p["receiver"] == "webhook-1"
        assert set(p) >= {"status", "alerts", "groupLabels", "commonLabels", "commonAnnotations", "externalURL",
                          "groupKey", "truncatedAlerts"}
        labels = p["alerts"][0]["labels"]
        assert p["groupLabels"] == {k: labels[k] for k in ("alertname", "site", "rack") if k in labels}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_flushes_everything_and_exits_0(tmp_path, sig):
    p = start(tmp_path)
    data = tmp_path / "data"
    try:
        wait_for(lambda: list((data / "archive" / "gpu_samples").rglob("*.parquet")))
        # Readable while the daemon runs, by polars and DuckDB.
        assert archived(data, "gpu_samples").height > 0
        n = duckdb.connect().execute(f"select count(*) from read_parquet('{data}/archive/gpu_samples/**/*.parquet', "
                                     f"hive_partitioning=true)").fetchall()[0][0]
        assert n > 0
        time.sleep(1.5)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)  # drains and exits on its own (how fast is no test's business)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert archived(data, "gpu_samples").height == reported_samples(err)  # nothing lost
    assert not list((data / "archive" / ".staging").iterdir())


def test_live_status_line_on_a_terminal(tmp_path):
    returncode, screen = run_on_terminal(tmp_path, "--duration", "6", stderr_too=False, quiet_s=30)
    assert returncode == 0
    assert screen.count("\r\x1b[K") >= 3  # rewritten in place, about once a second
    status = re.findall(r"GPU samples/s +alerts firing \d+ \(raised \d+\) +nodes healthy (\d+) suspect (\d+) failing (\d+)",
                        screen)
    assert status and all(sum(map(int, counts)) == 16 for counts in status)  # 2 racks x 8 nodes, all counted


DRAIN_HELD = """
import sys
import pipeline.daemon
from pipeline.cli import main
pipeline.daemon.DRAIN_SAY_S = 1.0  # (30 s in the product)
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_held_by_a_hung_write_says_which_role_it_waits_on(tmp_path):
    """alerts.jsonl on a hung disk (a FIFO: its open waits for ever) when SIGTERM comes: the drain waits on
    notify. It had said nothing until its supervisor killed it; it now says which role holds it, and how to
    exit at once."""
    import os
    import subprocess
    import sys
    import threading
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST
    proc = subprocess.Popen([sys.executable, "-c", DRAIN_HELD, "run", "--data-dir", str(tmp_path / "data")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = []
    guard = threading.Timer(120, proc.kill)  # (a stop that never says it ends here, and the test fails)
    guard.start()
    try:
        for line in proc.stderr:
            said.append(line)
            if "ready:" in line:
                os.mkfifo(tmp_path / "fifo")
                os.replace(tmp_path / "fifo", tmp_path / "data" / "alerts.jsonl")
                proc.send_signal(signal.SIGTERM)
            if "still draining" in line:
                break
    finally:
        guard.cancel()
        proc.kill()
        proc.wait()
    assert re.search(r"stopping: still draining after \d+ s, waiting on role [a-z, ]*\bnotify\b", said[-1]), said[-5:]
    assert "another SIGTERM or SIGINT exits at once" in said[-1]
