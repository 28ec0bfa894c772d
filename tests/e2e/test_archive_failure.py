"""End-to-end: `fleetwatch` processes with a full disk (tmpfs), a deleted archive, Kafka roles (moved
from tests/test_archive_failure.py)."""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.helpers import FAST, archived, wait_for
from tests.test_archive import staged
from tests.test_archive_failure import gpu_files


ALERT = "FleetwatchArchiveFailing"


DROPPED = re.compile(r"archive: (\d+) failed write attempts in (\d+) outages, (\d+) rows dropped(?: (\{.*\}))?")


SUMMARY = (r"stopped after [\d.]+ s: (\d+) GPU samples published, (\d+) GPU samples, (\d+) alerts raised, "
           r"(\d+) rows archived")


@contextlib.contextmanager
def tmpfs(path: Path, size: str, inodes: int | None = None):
    """A small tmpfs at `path` (of `inodes` files at most); skips the test where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Write a filler file until at most `leave` bytes are free on path's filesystem
    (all of it: leave=0, until the disk is full)."""
    filler = path / "filler"
    chunk = b"\0" * 65536
    with open(filler, "ab") as f:
        while free_bytes(path) > leave:
            try:
                f.write(chunk[:max(4096, min(len(chunk), free_bytes(path) - leave))])
                f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    return filler


def start_run(tmp_path: Path, data: Path, env: dict[str, str]) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST | env
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--data-dir", str(data)], cwd=tmp_path,
                            env=full, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log_path = tmp_path / "run.log"
    return proc


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    finally:
        proc.kill()
    text = proc.log_path.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def webhook_alerts(receiver, name: str | None = None, status: str | None = None) -> list[dict]:
    return [a for p in list(receiver.payloads) for a in p["alerts"]
            if (name is None or a["labels"]["alertname"] == name) and (status is None or a["status"] == status)]


def test_full_disk_in_process_alerts_keep_flowing_and_drops_are_counted(tmp_path, receiver):
    """`fleetwatch run` with its data_dir on a 32 MB tmpfs. Filled up to under
    archive.min_free_mb, the archive stops writing and raises FleetwatchArchiveFailing
    on the webhook; detector alerts keep reaching the webhook and alerts.jsonl; past
    archive.outage_buffer_mb the oldest rows are dropped and counted. A `.staging` that
    is a file is a second outage. Once space returns, the archive writes again, the
    alert resolves, and every GPU sample published is archived or counted as dropped."""
    with tmpfs(tmp_path / "data", "32m") as data:
        proc = start_run(tmp_path, data, {
            "FLEETWATCH_ALERTS__WEBHOOKS": receiver.url, "FLEETWATCH_ALERTS__GROUP_WAIT_S": "0",
            "FLEETWATCH_ALERTS__GROUP_INTERVAL_S": "0", "FLEETWATCH_ARCHIVE__MIN_FREE_MB": "6",
            "FLEETWATCH_ARCHIVE__OUTAGE_BUFFER_MB": "1", "FLEETWATCH_ARCHIVE__RETRY_MAX_S": "1"})
        try:
            wait_for(lambda: gpu_files(data), timeout=120)
            filler = fill(data, leave=3 * 2**20)  # 3 MB left: under the archive's 6 MB floor, room for notify
            wait_for(lambda: webhook_alerts(receiver, ALERT, "firing"), timeout=60)
            firing = webhook_alerts(receiver, ALERT, "firing")[0]
            assert "MB free, under archive.min_free_mb" in firing["annotations"]["summary"]
            assert firing["annotations"]["runbook_url"].endswith(f"/{ALERT}.md")
            assert firing["labels"]["severity"] == "critical" and firing["labels"]["instance"]
            # During the outage: detection and delivery go on, and the archive writes nothing.
            files, seen = gpu_files(data), len(webhook_alerts(receiver))
            lines = len((data / "alerts.jsonl").read_text().splitlines())
            wait_for(lambda: len(webhook_alerts(receiver)) >= seen + 3, timeout=60)
            wait_for(lambda: len((data / "alerts.jsonl").read_text().splitlines()) >= lines + 3, timeout=60)
            wait_for(lambda: "dropping the oldest rows" in proc.log_path.read_text(), timeout=60)
            wait_for(lambda: re.search(r"archive FAILING \d+ s, [\d,]+ rows held, [\d,]+ rows dropped",
                                       proc.log_path.read_text()), timeout=30)
            assert gpu_files(data) == files
            assert proc.poll() is None
            # Space returns: it writes again and the alert resolves.
            filler.unlink()
            wait_for(lambda: webhook_alerts(receiver, ALERT, "resolved"), timeout=60)
            wait_for(lambda: len(gpu_files(data)) > len(files), timeout=60)
            assert re.search(r"archive writing again after \d+ s: \d+ rows held were written, [1-9]\d* rows "
                             r"dropped in this outage", proc.log_path.read_text())
            # A second outage of another kind: .staging is in the way (a file), then cleared.
            staging = data / "archive" / ".staging"

            def block_staging() -> bool:  # the writer may create it again between the two steps: retry
                shutil.rmtree(staging, ignore_errors=True)
                try:
                    staging.write_text("not a folder")
                    return True
                except IsADirectoryError:
                    return False
            wait_for(block_staging, timeout=60)
            wait_for(lambda: len(webhook_alerts(receiver, ALERT, "firing")) >= 2, timeout=60)
            staging.unlink()
            wait_for(lambda: len(webhook_alerts(receiver, ALERT, "resolved")) >= 2, timeout=60)
            assert proc.poll() is None
        finally:
            log = stop(proc)
        published = int(re.search(SUMMARY, log).group(1))
        failures, outages, dropped, per_dataset = DROPPED.search(log).groups()
        dropped_gpu = ast.literal_eval(per_dataset).get("gpu_samples", 0)
        gpu = archived(data, "gpu_samples")
        print(f"in-process full disk: {published} GPU samples published, {gpu.height} archived, {dropped_gpu} "
              f"dropped ({dropped} rows in all), {failures} failed attempts in {outages} outages")
        assert int(outages) == 2 and int(failures) >= 2
        assert dropped_gpu > 0 and gpu.height > 0
        assert gpu.height + dropped_gpu == published  # every sample is archived or counted as dropped
        assert gpu.select(pl.struct("gpu_uuid", "ts").is_unique().all()).item()
        assert not staged(data / "archive")  # no partial file left behind
        # The outage alert is archived with the rest, firing and resolved.
        mine = archived(data, "alerts").filter(pl.col("alertname") == ALERT)
        assert sorted(mine["status"].to_list()) == ["firing", "firing", "resolved", "resolved"]


def test_archive_deleted_while_running_is_created_again(tmp_path):
    """`rm -rf archive/` under a running daemon: the next flush creates it again."""
    data = tmp_path / "data"
    proc = start_run(tmp_path, data, {})
    try:
        wait_for(lambda: gpu_files(data), timeout=120)
        (data / "archive").rename(tmp_path / "gone")  # rm -rf, atomically for the daemon that writes into it
        shutil.rmtree(tmp_path / "gone")
        wait_for(lambda: gpu_files(data), timeout=60)
        assert proc.poll() is None
    finally:
        log = stop(proc)
    assert archived(data, "gpu_samples").height > 0
    assert "role archive failed" not in log


@pytest.fixture(scope="module")
def broker():
    from tests.services import KafkaBroker
    b = KafkaBroker().start()
    yield b
    b.close()


def offset_ranges(data: Path, dataset: str) -> dict[int, list[tuple[int, int]]]:
    """{partition: sorted (first, last) offset ranges} from the archive's file names
    (`part-p<partition>-o<first>-<last>`; a range split over hours is one range)."""
    ranges: dict[int, set[tuple[int, int]]] = {}
    for f in (data / "archive" / dataset).rglob("part-p*.parquet"):
        m = re.fullmatch(r"part-p(\d+)-o(\d+)-(\d+)", f.stem)
        ranges.setdefault(int(m.group(1)), set()).add((int(m.group(2)), int(m.group(3))))
    return {p: sorted(r) for p, r in ranges.items()}


def published_so_far(simulate: subprocess.Popen) -> int:
    """GPU samples the simulate process has published, from its latest status line."""
    counts = re.findall(r"([\d,]+) GPU samples published", simulate.log_path.read_text())
    return int(counts[-1].replace(",", "")) if counts else 0


def alert_log(data: Path, status: str) -> list[dict]:
    import json
    path = data / "alerts.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [a for a in lines if a["labels"]["alertname"] == ALERT and a["status"] == status]


@pytest.mark.kafka
def test_full_disk_over_kafka_loses_nothing(broker, tmp_path):
    """simulate, archive and notify processes over Kafka, the archive on an 16 MB tmpfs
    filled to the last byte (OSError 28 mid-file). The archive commits nothing, pauses
    reading past archive.outage_buffer_mb, and FleetwatchArchiveFailing reaches notify
    over the alerts topic. Space returns: it writes what it held and reads on, and the
    alert resolves. A second outage, during which that archive is stopped: a new
    archive resumes from the last commit. Every offset lands in Parquet exactly once."""
    from tests.e2e.test_kafka import role_env, start_role, stop_in_order
    data = tmp_path / "data"
    with tmpfs(data / "archive", "16m") as archive_fs:
        env = role_env("f", FLEETWATCH_KAFKA__PARTITIONS="3", FLEETWATCH_FLEET__SPEED="5",
                       FLEETWATCH_ARCHIVE__MIN_FREE_MB="0", FLEETWATCH_ARCHIVE__OUTAGE_BUFFER_MB="0.5",
                       FLEETWATCH_ARCHIVE__RETRY_MAX_S="1", FLEETWATCH_ALERTS__GROUP_WAIT_S="0")
        procs = {"notify": start_role("notify", broker, tmp_path, env),
                 "archive-a": start_role("archive", broker, tmp_path, env),
                 "simulate": start_role("simulate", broker, tmp_path, env)}
        try:
            wait_for(lambda: gpu_files(data), timeout=120)
            # Outage 1: the disk fills up; the archive pauses and recovers in place.
            filler = fill(archive_fs, leave=0)
            wait_for(lambda: alert_log(data, "firing"), timeout=90)
            log_a = procs["archive-a"].log_path
            wait_for(lambda: "reading paused" in log_a.read_text(), timeout=60)
            assert re.search(r"archive cannot write \(\[Errno 28\]", log_a.read_text())
            backlog = published_so_far(procs["simulate"]) + 5000  # more waits on Kafka than the archive holds
            wait_for(lambda: published_so_far(procs["simulate"]) >= backlog, timeout=90)
            files = gpu_files(data)
            filler.unlink()
            wait_for(lambda: alert_log(data, "resolved"), timeout=90)
            wait_for(lambda: len(gpu_files(data)) > len(files), timeout=60)
            assert not staged(archive_fs)  # the partial file is gone
            # Outage 2: full again, and this archive is stopped while it cannot write.
            filler = fill(archive_fs, leave=0)
            wait_for(lambda: len(alert_log(data, "firing")) >= 2, timeout=90)
            wait_for(lambda: log_a.read_text().count("reading paused") >= 2, timeout=60)
            backlog = published_so_far(procs["simulate"]) + 5000
            wait_for(lambda: published_so_far(procs["simulate"]) >= backlog, timeout=90)
            logs = stop_in_order({"archive-a": procs.pop("archive-a")}, [["archive-a"]])
            held = re.search(r"archive: stopping while it cannot write \(.*\): (\d+) rows held are not committed",
                             logs["archive-a"])
            assert held and int(held.group(1)) > 0, logs["archive-a"][-2000:]
            filler.unlink()
            procs["archive-b"] = start_role("archive", broker, tmp_path, env)
            wait_for(lambda: "redelivered" in procs["archive-b"].log_path.read_text()
                     or len(gpu_files(data)) > len(files), timeout=60)
            logs |= stop_in_order(procs, [["simulate"], ["archive-b", "notify"]])
        finally:
            for p in procs.values():
                p.kill()
        published = int(re.search(SUMMARY, logs["simulate"]).group(1))
        gpu = archived(data, "gpu_samples")
        ranges = offset_ranges(data, "gpu_samples")
        print(f"Kafka full disk: {published} GPU samples published, {gpu.height} archived, "
              f"{sum(len(r) for r in ranges.values())} files over {len(ranges)} partitions; "
              f"archive A: {DROPPED.search(logs['archive-a']).group(0)}, stopped holding {held.group(1)} rows "
              f"uncommitted; archive B wrote {re.search(SUMMARY, logs['archive-b']).group(4)} rows")
        assert int(re.search(SUMMARY, logs["archive-b"]).group(4)) >= int(held.group(1))  # B read them again
        assert gpu.height == published > 0
        assert gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item() == published
        for partition, spans in ranges.items():  # each partition's offsets from 0, no gap, no overlap
            assert spans[0][0] == 0, (partition, spans[:3])
            for (_, last), (first, _) in zip(spans, spans[1:]):
                assert first == last + 1, (partition, last, first)
        assert DROPPED.search(logs["archive-a"]).group(3) == "0"  # over Kafka nothing is ever dropped


@pytest.mark.kafka
def test_a_rebalance_while_the_disk_is_full_loses_nothing(broker, tmp_path):
    """Archive A cannot write (disk full) when archive B joins the group: A hands its
    partitions over uncommitted, drops what it held for them, and B (failing too) reads
    them again from the last commit. Space returns: every offset lands exactly once."""
    from tests.e2e.test_kafka import role_env, start_role, stop_in_order
    data = tmp_path / "data"
    with tmpfs(data / "archive", "16m") as archive_fs:
        env = role_env("g", FLEETWATCH_KAFKA__PARTITIONS="4", FLEETWATCH_FLEET__SPEED="5",
                       FLEETWATCH_ARCHIVE__MIN_FREE_MB="0", FLEETWATCH_ARCHIVE__RETRY_MAX_S="1")
        procs = {"archive-a": start_role("archive", broker, tmp_path, env),
                 "simulate": start_role("simulate", broker, tmp_path, env)}
        try:
            wait_for(lambda: gpu_files(data), timeout=120)
            filler = fill(archive_fs, leave=0)
            log_a = procs["archive-a"].log_path
            wait_for(lambda: "archive cannot write" in log_a.read_text(), timeout=60)
            procs["archive-b"] = start_role("archive", broker, tmp_path, env)
            wait_for(lambda: "handed over uncommitted" in log_a.read_text(), timeout=90)
            wait_for(lambda: "archive cannot write" in procs["archive-b"].log_path.read_text(), timeout=90)
            filler.unlink()
            for name in ("archive-a", "archive-b"):
                wait_for(lambda: "archive writing again" in procs[name].log_path.read_text(), timeout=90)
            logs = stop_in_order(procs, [["simulate"], ["archive-a", "archive-b"]])
        finally:
            for p in procs.values():
                p.kill()
        gpu = archived(data, "gpu_samples")  # before the tmpfs goes
    published = int(re.search(SUMMARY, logs["simulate"]).group(1))
    rows = {n: int(re.search(SUMMARY, logs[n]).group(4)) for n in ("archive-a", "archive-b")}
    print(f"rebalance on a full disk: {published} GPU samples published, {gpu.height} archived, rows written {rows}")
    assert rows["archive-a"] > 0 and rows["archive-b"] > 0
    assert gpu.height == published > 0
    assert gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item() == published


def test_a_disk_full_to_the_last_byte_stops_no_role_and_loses_no_alert(tmp_path, receiver):
    """Something else fills the data disk completely: alerts.jsonl, the outboxes, the
    checkpoint and the archive all fail. No role stops; notify holds its alert changes
    and tries again; once space returns every alert change is in alerts.jsonl and on
    the webhook, and the daemon drains and exits 0."""
    with tmpfs(tmp_path / "data", "32m") as data:
        proc = start_run(tmp_path, data, {
            "FLEETWATCH_ALERTS__WEBHOOKS": receiver.url, "FLEETWATCH_ALERTS__GROUP_WAIT_S": "0",
            "FLEETWATCH_ALERTS__GROUP_INTERVAL_S": "0", "FLEETWATCH_ARCHIVE__MIN_FREE_MB": "0",
            "FLEETWATCH_ARCHIVE__RETRY_MAX_S": "1"})
        try:
            wait_for(lambda: gpu_files(data) and (data / "alerts.jsonl").read_text(), timeout=120)
            filler = fill(data, leave=0)
            wait_for(lambda: "notify: cannot write" in proc.log_path.read_text(), timeout=120)
            assert proc.poll() is None
            held_at = len((data / "alerts.jsonl").read_text().splitlines())
            filler.unlink()
            wait_for(lambda: "notify: writing again" in proc.log_path.read_text(), timeout=60)
            wait_for(lambda: len((data / "alerts.jsonl").read_text().splitlines()) > held_at, timeout=60)
            assert proc.poll() is None
        finally:
            log = stop(proc)
        assert "Traceback" not in log
        print("\n".join(x for x in log.splitlines() if "notify:" in x or "stopped after" in x))
        lines = [json.loads(x) for x in (data / "alerts.jsonl").read_text().splitlines()]
        changes = {(a["fingerprint"], a["status"]) for a in lines}
        wait_for(lambda: {(a["fingerprint"], a["status"]) for a in webhook_alerts(receiver)} >= changes, timeout=60)
        archived_alerts = archived(data, "alerts")
        assert set(zip(archived_alerts["fingerprint"], archived_alerts["status"])) >= changes - {
            (a["fingerprint"], a["status"]) for a in lines if a["labels"]["alertname"] == ALERT}
