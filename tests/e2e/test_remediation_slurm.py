"""From a simulated fault to a drained Slurm node and back, end to end: `fleetwatch run --apply`
with the Slurm backend against a real slurmctld and a real slurmd running the node. The fault
(an uncorrectable ECC error: reset_gpu) raises GpuUncorrectableEcc; remediation drains the node
with a reason naming the alert and its fingerprint, waits for it to be drained, resets the GPU
through the site's action script, runs the validation check, and resumes the node. Every
transition lands in the remediation_events Parquet dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from tests.conftest import fleetwatch
from tests.services import Slurmctld

NODE = "r01-n01"  # the simulated fleet's one node, and Slurm's
# The seed's first fault is a pending row remap (reset_gpu); a failed remap (30% of the simulator's
# ECC faults) means replace, and the node would wait in needs_repair for a person.


@pytest.fixture()
def slurm(tmp_path):
    ctl = Slurmctld({NODE: ""}, tmp_path / "slurm", slurmd_node=NODE).start(timeout_s=60)
    yield ctl
    ctl.close()


def _show(slurm) -> str:
    return subprocess.run(["scontrol", "show", "node", NODE, "--oneliner"], env=slurm.env, capture_output=True,
                          text=True, timeout=30).stdout


def test_a_simulated_fault_drains_the_slurm_node_resets_validates_and_resumes_it(slurm, tmp_path):
    actions = tmp_path / "reset.sh"  # the site's tooling: records what it was asked
    actions.write_text(f'#!/bin/bash\necho "$1 $2 $3" >> {tmp_path}/actions\ncat > {tmp_path}/case.json\n')
    check = tmp_path / "check.sh"
    check.write_text(f'#!/bin/bash\necho "$1" >> {tmp_path}/checks\necho "diag: pass"\n')
    for f in (actions, check):
        f.chmod(0o755)
    config = tmp_path / "fleetwatch.toml"
    config.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[fleet]
racks = 1
nodes_per_rack = 1
faults = ["ecc_uncorrectable"]
fault_interval_s = 20
gpu_reset_interval_s = 0
[remediate]
backend = "slurm"
action_command = "{actions}"
validate_command = "{check}"
breaker_fleet_pct = 100
breaker_rack_pct = 100
interval_s = 0.5
cooldown_s = 86400
[archive]
flush_interval_s = 1
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | {"SLURM_CONF": str(slurm.config)}
    daemon = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--apply",
                               "--speed", "4", "--seed", "1"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and daemon.poll() is None:
            line = _show(slurm)
            state = line.split("State=")[1].split()[0] if "State=" in line else "?"
            if not seen or seen[-1] != state:
                seen.append(state)
                if "DRAIN" in state:
                    drained_line = line
            if (tmp_path / "checks").exists() and "DRAIN" not in state and any("DRAIN" in s for s in seen):
                break
            time.sleep(0.2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        out = daemon.communicate(timeout=120)[0]
    assert daemon.returncode == 0, out[-3000:]
    assert any("DRAIN" in s for s in seen), f"the node was never drained: states {seen}\n{out[-3000:]}"
    assert seen[-1].startswith("IDLE") and "DRAIN" not in seen[-1], f"not resumed: states {seen}\n{out[-5000:]}"
    reason = drained_line.split("Reason=")[1]
    assert reason.startswith("fleetwatch: GpuUncorrectableEcc fingerprint=")
    fingerprint = reason.split("fingerprint=")[1].split()[0]
    assert (tmp_path / "actions").read_text().split() == [NODE, "reset_gpu", "GpuUncorrectableEcc"]
    assert json.loads((tmp_path / "case.json").read_text())["fingerprint"] == fingerprint
    assert (tmp_path / "checks").read_text().split() == [NODE]

    events = pl.read_parquet(tmp_path / "data" / "archive" / "remediation_events" / "**" / "*.parquet",
                             hive_partitioning=False).sort("ts")
    moves = events.filter(pl.col("from_state") != pl.col("to_state"))
    assert moves.select("from_state", "to_state").rows()[:5] == [
        ("healthy", "quarantined"), ("quarantined", "drained"), ("drained", "action"), ("action", "validating"),
        ("validating", "healthy")]
    first = moves.head(5)
    assert first["applied"].to_list() == [True, True, True, True, True] and not first["dry_run"].any()
    assert set(first["fingerprint"]) == {fingerprint} and set(first["remediation"]) == {"reset_gpu"}
    assert "diag: pass" in first["detail"][4]

    status = fleetwatch("remediation", "status", "--config", str(config), "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["dry_run"] is False
