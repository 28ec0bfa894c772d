"""`fleetwatch eval`: faster than real time, scored against ground truth, JSON as documented."""

from __future__ import annotations

import json

import pytest

from pipeline.analytics.evaluate import EvalRun, score
from pipeline.faults import FAULT_TYPES
from tests.conftest import fleetwatch

pytestmark = pytest.mark.slow


def test_eval_cli_writes_the_documented_json(tmp_path):
    r = fleetwatch("eval", "--duration", "3600", "--seed", "4", "--json", "out.json", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert set(out["faults"]) == set(FAULT_TYPES)
    for name, f in out["faults"].items():
        assert set(f) == {"injected", "detected", "recall", "precision", "ttd_p50_s", "ttd_p99_s"}
        assert isinstance(f["injected"], int) and 0 <= f["detected"] <= f["injected"]
        if f["injected"]:
            assert 0.0 <= f["recall"] <= 1.0
    assert out["node_hours"] == pytest.approx(32.0)
    assert out["false_alerts_per_1000_node_hours"] >= 0.0
    assert sum(f["injected"] for f in out["faults"].values()) >= 8
    assert "fault type" in r.stdout and "false alerts" in r.stdout
    # Deterministic for a seed.
    r2 = fleetwatch("eval", "--duration", "3600", "--seed", "4", "--json", "again.json", cwd=tmp_path, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["faults"] == out["faults"] and again["false_alerts"] == out["false_alerts"]


def _label(kind, start, end, node="r01-n01", gpu=0, rack="r01", normal=False):
    return {"fault_type": kind, "normal": normal, "rack": rack, "node": node, "gpu": gpu, "start": start, "end": end}


def test_scoring_rules():
    from datetime import datetime, timedelta, timezone
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    s = lambda x: t0 + timedelta(seconds=x)  # noqa: E731
    labels = [
        _label("pcie_replay_storm", s(100), s(400)),                  # detected after 5 s
        _label("pcie_replay_storm", s(1000), s(1300), gpu=1),         # missed
        _label("gpu_reset", s(2000), s(2001), gpu=2, normal=True),    # normal event
        _label("thermal_drift", s(3500), s(9000), gpu=3),             # too late to score
    ]
    alerts = [
        {"labels": {"alertname": "GpuPcieReplayStorm", "rack": "r01", "node": "r01-n01", "gpu": "0"}, "starts_at": s(105)},
        {"labels": {"alertname": "GpuPcieReplayStorm", "rack": "r01", "node": "r01-n01", "gpu": "5"}, "starts_at": s(110)},
        {"labels": {"alertname": "GpuNotReporting", "rack": "r01", "node": "r01-n01", "gpu": "2"}, "starts_at": s(2001)},
    ]
    out = score(EvalRun(labels, alerts, s(3600), node_hours=10.0, gpu_samples=0))
    p = out["faults"]["pcie_replay_storm"]
    assert (p["injected"], p["detected"], p["recall"], p["ttd_p50_s"]) == (2, 1, 0.5, 5.0)
    assert p["precision"] == 0.5  # one of its two alerts was on the wrong GPU
    assert out["faults"]["thermal_drift"]["injected"] == 0 and out["faults_not_scored"] == 1
    assert out["false_alerts"] == 2  # wrong GPU, and the alert a normal GPU reset caused
    assert out["false_alerts_per_1000_node_hours"] == 200.0
