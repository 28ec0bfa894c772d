"""`fleetwatch eval` scoring against ground truth (the command itself: tests/e2e/test_eval.py)."""

from __future__ import annotations

from pipeline.analytics.evaluate import EvalRun, score


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
