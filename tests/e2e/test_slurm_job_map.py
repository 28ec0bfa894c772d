"""The Slurm Prolog/Epilog shipped (deploy/slurm/fleetwatch-job-map) under a real slurmctld
and slurmd whose node has GPUs as generic resources: the jobs Slurm starts and ends there
name themselves in the job map, and the NVML agent's samples carry them (the job column, the
hpc_job label). slurmd gives a Prolog the job's variables and nothing else (no PATH, none of
its own environment), which the unit test's hand-made environment could not show."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import make_config
from tests.services import Slurmctld, slurm_binary
from tests.test_nvml import H100

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "fleetwatch-job-map"
NODE = "gpu-a1"


@pytest.fixture()
def slurm(tmp_path):
    # A site that keeps the map elsewhere than /run/dcgm-job-map wraps the script: slurmd passes
    # a Prolog none of its own environment, so FLEETWATCH_JOB_MAP_DIR is set here.
    wrapper = tmp_path / "prolog"
    wrapper.write_text(f"#!/bin/bash\nFLEETWATCH_JOB_MAP_DIR={tmp_path / 'map'} exec {SCRIPT}\n")
    wrapper.chmod(0o755)
    ctl = Slurmctld({NODE: ""}, tmp_path / "slurm", slurmd_node=NODE, gpus=4, prolog=wrapper).start(timeout_s=60)
    yield ctl
    ctl.close()


def _sbatch(slurm, gpus: int, seconds: int) -> str:
    out = subprocess.run([slurm_binary("sbatch"), "--parsable", f"--gres=gpu:{gpus}", "--mem=100", "-w", NODE,
                          "-o", "/dev/null", "--wrap", f"sleep {seconds}"], env=slurm.env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return re.match(r"\d+", out.strip()).group(0)


def _until(what, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not (got := what()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(0.2)
    return got


def test_jobs_slurm_runs_on_gpus_name_themselves_in_the_agents_samples(slurm, tmp_path):
    from pipeline.sources.nvml import NvmlAgent
    from pipeline.sources.nvml_replay import NvmlReplay
    jobs = tmp_path / "map"
    with NvmlReplay(H100, gpus=4, latency=False).installed():
        agent = NvmlAgent(make_config(agent={"job_mapping_dir": str(jobs)}).agent, NODE)
        agent.open()
        first = _sbatch(slurm, 2, 60)
        second = _sbatch(slurm, 1, 60)

        def named():
            got = agent.scrape().samples.column("job").to_pylist()
            return got if sum(j is not None for j in got) == 3 else None
        during = _until(named)
        by_job = {j: [i for i, x in enumerate(during) if x == j] for j in (first, second)}
        assert len(by_job[first]) == 2 and len(by_job[second]) == 1, during  # Slurm's GPU indices, each job's own
        subprocess.run([slurm_binary("scancel"), first, second], env=slurm.env, check=True, timeout=30)
        after = _until(lambda: (got := agent.scrape().samples.column("job").to_pylist()) == [None] * 4 and got)
    assert after == [None] * 4
    assert sorted(p.name for p in jobs.iterdir()) == [".lock"]  # every epilog removed its lines
