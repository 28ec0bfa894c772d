"""scripts/gpu-check, the one-shot check of the agent and its cap path on a real GPU, run here on
the shipped H100 recording (`--replay h100`) so that it keeps working between the runs on real
hardware (tests/data/h200 holds one)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest

from pipeline.sources.nvml import NvmlAgent
from pipeline.sources.nvml_replay import NvmlReplay
from tests.conftest import REPO, make_config

pytestmark = pytest.mark.slow


def test_gpu_check_caps_restores_and_runs_the_daemon_on_the_replay(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu-check"), "--out", str(out), "--replay", "h100",
                        "--step-s", "1", "--daemon-s", "10", "--record", "mine", "--scale", "0.1"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((out / "gpu-check.json").read_text())
    caps = report["caps"]
    assert caps["caps_w"] == [500, 350, 200]  # 5/7 and 1/2 of the default, and the minimum
    assert [(r["status"], r["enforced_w"]) for r in caps["results"]] == [
        ("ok", 500.0), ("ok", 350.0), ("ok", 200.0), ("out_of_range", None), ("restored", 700.0)]
    assert [s["enforced_w"] for s in caps["steady"]][-1] == 700.0
    assert report["idle"]["null_columns"] == ["container", "job", "namespace", "nvlink_crc_errors_total", "pod"]
    daemon = report["killed_then_daemon"]
    assert daemon["daemon_rc"] == 0 and daemon["gpu_samples"]["rows"] > 0
    assert any(x.startswith("DCGM_FI_DEV_POWER_USAGE{") for x in daemon["metrics_dcgm_lines"])
    summary = json.loads((out / "mine" / "mine_powercap_summary.json").read_text())
    assert [(s["target_mw"], s["result"]) for s in summary["set_log"]] == [
        (500_000, "ok"), (350_000, "ok"), (200_000, "ok"), (700_000, "restored")]
    written = (out / "gpu-check.json").read_text() + (out / "daemon.log").read_text()
    assert not re.search(rf"\b{re.escape(socket.gethostname())}\b", written)  # the host's name is not shared
    assert '"node": "gpu-check"' in written
    # --record: a recording the replay plays (no load here: no power-cap curve, its limits read-only)
    assert report["record"]["inventory_errors"] == [] and report["duty"]["cap"] == "ok"
    replay = NvmlReplay(out / "mine", gpus=2, latency=False)
    with replay.installed():
        agent = NvmlAgent(make_config().agent, "node-1")
        agent.open()
        rows = [agent.scrape().samples for _ in range(3)][-1].to_pylist()
    assert [r["model"] for r in rows] == ["NVIDIA H100 80GB HBM3"] * 2 and rows[0]["power_w"] > 0


def test_the_last_guard_puts_a_gpu_left_capped_back_at_its_own_limit():
    """gpu-check's `put_back`, on the replay: whatever left the GPU capped (a killed agent's cap
    the daemon never restored), the GPU ends at the limit it had, and says so."""
    import importlib.machinery
    import importlib.util

    import pynvml
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(REPO / "scripts" / "gpu-check"))
    gpu_check = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(gpu_check)
    replay = NvmlReplay("h100", gpus=1, latency=False)
    with replay.installed():
        own = gpu_check.own_limit_mw(0)
        pynvml.nvmlDeviceSetPowerManagementLimit(replay.gpus[0].handle, 400_000)
        capped = gpu_check.put_back(0, own)
        again = gpu_check.put_back(0, own)
    assert own == 700_000
    assert capped == (700.0, "set back to 700 W by the last guard", True)
    assert again == (700.0, "at its own limit", True)
