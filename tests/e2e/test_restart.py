"""End-to-end: `fleetwatch run` stopped and started again (moved from tests/test_restart.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from pipeline.detect.checkpoint import CheckpointUnreadable, LocalCheckpoint
from pipeline.detect.engine import Engine
from pipeline.model import fingerprint
from tests.conftest import make_config
from tests.test_restart import logged, saved_uuids


FAST = {"FLEETWATCH_FLEET__SPEED": "20", "FLEETWATCH_FLEET__RACKS": "2", "FLEETWATCH_DAEMON__STATUS_INTERVAL_S": "1",
        "FLEETWATCH_ARCHIVE__FLUSH_INTERVAL_S": "1", "FLEETWATCH_DAEMON__CHECKPOINT_INTERVAL_S": "0.5",
        "FLEETWATCH_FLEET__GPU_RESET_INTERVAL_S": "0", "FLEETWATCH_ALERTS__GROUP_WAIT_S": "0",
        "FLEETWATCH_ALERTS__GROUP_INTERVAL_S": "0", "FLEETWATCH_ARCHIVE__UPKEEP_INTERVAL_S": "0"}


FAULTY = {"FLEETWATCH_FLEET__FAULT_INTERVAL_S": "5", "FLEETWATCH_FLEET__FAULTS": "pcie_replay_storm,nvlink_crc_storm"}


QUIET = {"FLEETWATCH_FLEET__FAULT_INTERVAL_S": "0"}


def start(tmp_path: Path, env: dict, seed: int = 3) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST | env
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--data-dir", str(tmp_path / "data"),
                             "--seed", str(seed)], cwd=tmp_path, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def latest(lines: list[dict]) -> dict[str, dict]:
    return {a["fingerprint"]: a for a in lines}


def firing_in(lines: list[dict]) -> set[str]:
    return {fp for fp, a in latest(lines).items() if a["status"] == "firing"}


def checkpointed_alerts(data: Path) -> set[str]:
    path = data / "state" / LocalCheckpoint.FILE
    if not path.exists():
        return set()
    try:
        batch = LocalCheckpoint(Engine(make_config()), path.parent).load()
    except CheckpointUnreadable:
        return set()
    return {fingerprint(a["labels"]) for text in (batch.column("alerts").to_pylist() if batch else []) if text
            for a in json.loads(text).values()}


def stop(p: subprocess.Popen, sig: int) -> str:
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert p.returncode == 0, err
    return err


def delivered(receiver) -> set[tuple[str, str]]:
    return {(a["fingerprint"], a["status"]) for p in list(receiver.payloads) for a in p["alerts"]}


def restart_resolves(tmp_path: Path, receiver, sig: int) -> None:
    data = tmp_path / "data"
    hook = {"FLEETWATCH_ALERTS__WEBHOOKS": receiver.url}
    p = start(tmp_path, FAULTY | hook)
    try:
        # Alerts firing, told to the receiver, and in a checkpoint (SIGKILL leaves only that).
        wait_for(lambda: len(firing_in(logged(data)) & checkpointed_alerts(data)
                             & {fp for fp, s in delivered(receiver) if s == "firing"}) >= 2,
                 "alerts firing, delivered and checkpointed")
        stop(p, sig)
    finally:
        p.kill()
    at_stop = firing_in(logged(data))
    assert at_stop
    told_firing = {fp for fp, s in delivered(receiver) if s == "firing"}
    lines_before = len(logged(data))
    # The same fleet, no faults now: every alert firing at the stop must resolve.
    p = start(tmp_path, QUIET | hook)
    try:
        wait_for(lambda: not (firing_in(logged(data)) & at_stop), "the alerts firing at the stop to resolve")
        wait_for(lambda: {(fp, "resolved") for fp in told_firing & at_stop} <= delivered(receiver),
                 "resolved notifications at the webhook")
        err2 = stop(p, signal.SIGTERM)
    finally:
        p.kill()
    assert "detect: restored the detector state" in err2, err2
    after = logged(data)[lines_before:]
    for fp in at_stop:
        mine = [a["status"] for a in after if a["fingerprint"] == fp]
        assert mine == ["resolved"], (fp, mine)  # resolved once, never raised again as new
    assert not [a for a in after if a["labels"]["alertname"] in ("GpuNotReporting", "NodeNotReporting")]
    archived = pl.scan_parquet(data / "archive" / "alerts", hive_partitioning=True).collect()
    assert set(archived.filter(pl.col("status") == "resolved")["fingerprint"].to_list()) >= at_stop
    assert (data / "state" / LocalCheckpoint.FILE).exists()


@pytest.mark.slow
def test_after_sigterm_a_restart_resolves_the_alerts_firing_at_the_stop(tmp_path, receiver):
    restart_resolves(tmp_path, receiver, signal.SIGTERM)


@pytest.mark.slow
def test_after_sigkill_a_restart_resumes_from_the_last_periodic_checkpoint(tmp_path, receiver):
    restart_resolves(tmp_path, receiver, signal.SIGKILL)


@pytest.mark.slow
def test_a_corrupt_checkpoint_does_not_stop_the_daemon(tmp_path):
    state = tmp_path / "data" / "state"
    state.mkdir(parents=True)
    (state / LocalCheckpoint.FILE).write_bytes(b"\x00garbage" * 100)
    p = start(tmp_path, QUIET)
    try:
        wait_for(lambda: list(state.glob("*.unreadable-*")) and (state / LocalCheckpoint.FILE).exists(),
                 "the bad checkpoint set aside and a new one written")
        err = stop(p, signal.SIGTERM)
    finally:
        p.kill()
    assert "cannot be restored" in err and "starting cold" in err, err
    assert len(list(state.glob(f"{LocalCheckpoint.FILE}.unreadable-*"))) == 1
    assert LocalCheckpoint(Engine(make_config()), state).load().num_rows > 0


@pytest.mark.slow
def test_gpus_with_new_uuids_after_a_restart_are_replacements(tmp_path):
    """A restart whose GPUs all report under new UUIDs (here: another simulator seed) sees
    replacements: one gpu_replaced event per GPU in the archive, no GpuNotStaleness, and
    only the new UUIDs in the checkpoint."""
    data = tmp_path / "data"
    p = start(tmp_path, QUIET)
    try:
        wait_for(lambda: (data / "state" / LocalCheckpoint.FILE).exists(), "a checkpoint")
        stop(p, signal.SIGTERM)
    finally:
        p.kill()
    before = saved_uuids(data / "state")
    assert len(before) == 128
    p = start(tmp_path, QUIET, seed=4)  # the seed is in every simulated GPU's UUID
    archive = data / "archive"

    def replaced() -> int:
        if not list((archive / "events").rglob("*.parquet")):
            return 0
        return pl.scan_parquet(archive / "events", hive_partitioning=True) \
            .filter(pl.col("kind") == "gpu_replaced").collect().height

    def scrapes_of_new_gpus() -> int:
        return pl.scan_parquet(archive / "gpu_samples", hive_partitioning=True) \
            .filter(~pl.col("gpu_uuid").is_in(list(before))).select(pl.col("ts").n_unique()).collect().item()
    try:
        wait_for(lambda: replaced() == 128, "128 gpu_replaced events archived")
        # Well past the staleness limit (3 intervals) and fire_after: GpuNotReporting would show.
        wait_for(lambda: scrapes_of_new_gpus() >= 30, "30 scrapes of the new GPUs archived")
        stop(p, signal.SIGTERM)
    finally:
        p.kill()
    assert replaced() == 128
    assert not [a for a in logged(data) if a["labels"]["alertname"] in ("GpuNotReporting", "NodeNotReporting")]
    after = saved_uuids(data / "state")
    assert len(after) == 128 and not after & before
