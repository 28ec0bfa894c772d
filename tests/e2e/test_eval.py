"""End-to-end: `fleetwatch eval` as a user runs it (the scoring rules stay in tests/test_eval.py)."""

from __future__ import annotations

import json

import pytest

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
