"""End-to-end: `fleetwatch run` with the NVML agent (moved from tests/test_nvml.py)."""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest

from pipeline.config import ConfigError, Unavailable
from pipeline.sources.nvml import NvmlDriverNotLoaded, NvmlUnavailable
from pipeline.sources.nvml_replay import NvmlReplay
from tests.conftest import H100, H200, fleetwatch
from tests.helpers import archived
from tests.test_nvml import TRACE, agent


@pytest.mark.parametrize("name, model", [("h100", "NVIDIA H100 80GB HBM3"), ("h200", "NVIDIA H200")])
def test_the_archive_holds_what_the_gpu_reported(tmp_path, name, model):
    """`fleetwatch run --replay`: 8 replayed H100s (or H200s) through the whole daemon. Power,
    temperatures, clocks, clock reasons and utilisation in Parquet are the recorded
    trace's, at the speed it was recorded, in base units; NVLink (not supported in those VMs) is null."""
    r = fleetwatch("run", "--replay", name, "--duration", "8", "--data-dir", "data", cwd=tmp_path,
                   env={"FLEETWATCH_AGENT__INTERVAL_S": "0.5", "FLEETWATCH_AGENT__NODE": "gpu-node-7"}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = archived(tmp_path / "data", "gpu_samples").sort("gpu", "ts")
    assert rows["gpu"].n_unique() == 8 and rows.height >= 8 * 10
    assert set(rows["node"]) == {"gpu-node-7"} and set(rows["model"]) == {model}
    trace = TRACE if name == "h100" else [json.loads(x) for x in (H200 / "h200_load_trace.jsonl").read_text().splitlines()]
    stride = len(trace) // 8
    for gpu, got in rows.group_by("gpu"):  # at its recorded speed: 0.5 s scrapes of a 10 Hz trace, 5 rows a scrape
        start = gpu[0] * stride
        want = [trace[(start - 1 + 5 * (k + 1)) % len(trace)] for k in range(got.height)]

        def recorded(column: str, divisor: float = 1.0) -> list[float]:
            return [row[column] / divisor for row in want]
        assert got["power_w"].to_list() == recorded("power_mw", 1000)  # mW -> W
        wraps = [(start - 1 + 5 * (k + 1)) // len(trace) for k in range(got.height)]  # the counter keeps counting
        assert got["energy_j"].to_list() == pytest.approx([(row["energy_mj"] + w * (trace[-1]["energy_mj"] -
                                                                                   trace[0]["energy_mj"])) / 1000
                                                           for row, w in zip(want, wraps)], abs=1e-6)  # mJ -> J
        assert got["gpu_temp_c"].to_list() == recorded("temp_c")
        assert got["mem_temp_c"].to_list() == recorded("fv_82")
        assert got["sm_clock_mhz"].to_list() == recorded("sm_mhz")
        assert got["mem_clock_mhz"].to_list() == recorded("mem_mhz")
        assert got["clock_event_reasons"].to_list() == recorded("throttle")
        assert got["util_gpu"].to_list() == recorded("util_gpu", 100)  # % -> 0-1
        assert got["mem_used_bytes"].to_list() == recorded("mem_used_b")
    assert rows["nvlink_crc_errors_total"].null_count() == rows.height  # NOT_SUPPORTED -> null, never 0
    assert rows["pcie_replay_total"].null_count() == 0
    assert "0 alerts raised" in r.stderr  # the recorded load and cooldown are normal operation
    if name == "h200":  # rows remapped before (5 correctable, 2 not), none pending or failed: no alert
        assert set(rows["remapped_rows_correctable"]) == {5} and set(rows["remapped_rows_uncorrectable"]) == {2}
        assert set(rows["remapped_rows_failure"]) == {False} and set(rows["remapped_rows_pending"]) == {False}


def test_eight_replayed_h200s_at_the_default_interval_raise_nothing(tmp_path):
    """The replay plays its 10 Hz trace at the speed it was recorded. Played a row a scrape (ten
    times slower), an H200's load start (13 C in 0.1 s, its 1 s power average a second behind) read
    as a GpuThermalRunaway on each GPU in turn, the first 26 s in."""
    r = fleetwatch("run", "--replay", "h200", "--duration", "40", "--data-dir", "data", cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 alerts raised" in r.stderr, [x for x in (r.stdout + r.stderr).splitlines() if "FIRING" in x]
    rows = archived(tmp_path / "data", "gpu_samples")
    assert rows["gpu_temp_c"].max() >= 55 and rows["power_w"].max() > 650  # loads started and ran meanwhile


def test_eight_replayed_h200s_scraped_every_0_2_s_raise_nothing(tmp_path):
    """At 0.2-s scrapes an H200's load start had 5 evaluations in a row of a GPU hotter than its
    power explains (its temperature leads its 1 s power average by up to a second), and 3 fired
    GpuThermalRunaway, 2 s in. A streak must now last as long as at 1 s (`detect.streak_s`)."""
    r = fleetwatch("run", "--replay", "h200", "--duration", "15", "--data-dir", "data", cwd=tmp_path,
                   env={"FLEETWATCH_AGENT__INTERVAL_S": "0.2"}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 alerts raised" in r.stderr, [x for x in (r.stdout + r.stderr).splitlines() if "FIRING" in x]
    rows = archived(tmp_path / "data", "gpu_samples")
    assert rows.height >= 8 * 10 and rows["gpu_temp_c"].max() >= 50  # scrapes came (75 each, unloaded), a load started


def test_no_driver_is_one_clear_message_and_exit_status_2(tmp_path):
    """No library: a setup problem, status 2. The driver not loaded yet (a boot that starts the agent first, a
    driver upgrade) is a moment: status 75, which systemd restarts (with 2, RestartPreventExitStatus=2 had
    left a GPU node's agent dead after every such boot)."""
    replay = NvmlReplay(H100, init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with replay.installed(), pytest.raises(NvmlDriverNotLoaded, match="the NVIDIA driver is not loaded"):
        agent().open()
    replay = NvmlReplay(H100, init_error=pynvml.NVML_ERROR_NO_PERMISSION)
    with replay.installed(), pytest.raises(NvmlUnavailable, match="may not open the GPUs"):
        agent().open()
    assert issubclass(NvmlDriverNotLoaded, Unavailable) and not issubclass(NvmlDriverNotLoaded, ConfigError)
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this host has NVML: the no-library case cannot be shown here")
    r = fleetwatch("run", "--source", "nvml", "--duration", "5", "--data-dir", "data", cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "NVML: the NVML library (libnvidia-ml.so.1) is not installed" in r.stderr
    assert "nvidia-smi" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("is not installed") == 1  # said once


HUNG_AGENT = """
import asyncio, sys, threading
import pipeline.sources.nvml as nvml
from pipeline.cli import EX_TEMPFAIL
from pipeline.sources.nvml_replay import NvmlReplay
from tests.test_nvml import agent
nvml.HANG_S = 3.0  # (the agent's own bound is 30 s)
replay = NvmlReplay(nvml.Path("pipeline/sources/recordings/h100"), gpus=2, latency=False)
answering = NvmlReplay.nvmlDeviceGetTemperature
calls = [0]

def hangs_at_the_fifth(self, handle, sensor):
    calls[0] += 1
    if calls[0] >= 5 and self._gpu(handle).index == 1:
        threading.Event().wait()  # for ever, as a call in a hung driver
    return answering(self, handle, sensor)
NvmlReplay.nvmlDeviceGetTemperature = hangs_at_the_fifth

async def published(batch):
    pass
with replay.installed():
    try:
        asyncio.run(agent(interval_s=0.2).run(published, published, asyncio.Event()))
    except nvml.NvmlHung as e:
        print(e, file=sys.stderr)
        sys.exit(EX_TEMPFAIL)  # (as the command does with an Unavailable)
"""


def test_an_agent_whose_nvml_call_hangs_says_which_and_exits_75_to_be_started_again(tmp_path):
    """The process ends although its NVML thread never comes back (a ThreadPoolExecutor's thread would
    have been joined at exit, for ever), with status 75 and the call named."""
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", HUNG_AGENT], cwd=repo, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")})
    assert r.returncode == 75, r.stderr[-3000:]
    assert re.search(r"NVML has not answered for \d+ s \(reading GPU 1 \(GPU-[-0-9a-f]+\)\) on node", r.stderr)
    assert "Traceback" not in r.stderr
