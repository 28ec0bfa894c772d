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
        assert set(f) == {"injected", "without_signature", "detected", "recall", "precision", "ttd_p50_s",
                          "ttd_p99_s"}
        assert isinstance(f["injected"], int) and 0 <= f["detected"] <= f["injected"]
        assert isinstance(f["without_signature"], int) and f["without_signature"] >= 0
        if f["injected"]:
            assert 0.0 <= f["recall"] <= 1.0
    assert out["faults_without_signature"] == sum(f["without_signature"] for f in out["faults"].values())
    assert out["node_hours"] == pytest.approx(32.0)
    assert out["false_alerts_per_1000_node_hours"] >= 0.0
    assert out["normal"] == "realistic"  # the default: the harder normal (sources/simulate.py)
    assert set(out["false_alerts_by_normal_event"]) <= set(out["normal_events_by_type"]) <= {
        "gpu_reset", "node_reboot", "driver_upgrade"}
    assert sum(f["injected"] for f in out["faults"].values()) >= 8
    assert "fault type" in r.stdout and "false alerts" in r.stdout
    assert "demand_response" not in out  # only with --power-requests
    # Deterministic for a seed (a shorter run, twice: the hour above once is the suite's slowest eval).
    runs = [fleetwatch("eval", "--duration", "900", "--seed", "5", "--json", name, cwd=tmp_path, timeout=300)
            for name in ("a.json", "b.json")]
    assert all(x.returncode == 0 for x in runs), runs[0].stderr[-2000:]
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert a["faults"] == b["faults"] and a["false_alerts"] == b["false_alerts"]
    assert sum(f["injected"] for f in a["faults"].values()) >= 1  # (something to be the same)


def test_eval_with_the_simple_normal_runs_the_steady_fleet_and_says_so(tmp_path):
    r = fleetwatch("eval", "--duration", "1200", "--seed", "4", "--normal", "simple", "--json", "out.json",
                   cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["normal"] == "simple" and "normal: simple" in r.stdout
    assert set(out["normal_events_by_type"]) <= {"gpu_reset"}  # no rolling reboots
    # The same through the environment (fleet.normal).
    r2 = fleetwatch("eval", "--duration", "1200", "--seed", "4", "--json", "env.json", cwd=tmp_path, timeout=300,
                    env={"FLEETWATCH_FLEET__NORMAL": "simple"})
    assert r2.returncode == 0, r2.stderr[-2000:]
    again = json.loads((tmp_path / "env.json").read_text())
    assert again["faults"] == out["faults"] and again["false_alerts"] == out["false_alerts"]
    bad = fleetwatch("eval", "--duration", "60", "--normal", "odd", cwd=tmp_path)
    assert bad.returncode == 2 and "--normal" in bad.stderr


def test_eval_with_power_requests_scores_demand_response_and_capping_raises_no_fault_alert(tmp_path):
    """Demand-response events on the loaded simulated fleet (every node may lose up to half its
    work: class 3): the controller meets them by the meter, and the capped GPUs raise no
    fault alert (a capped GPU is not a straggler)."""
    (tmp_path / "fleetwatch.toml").write_text("[power]\ndefault_class = 3\n")
    r = fleetwatch("eval", "--duration", "3600", "--seed", "1", "--fault-interval", "0", "--power-requests", "3",
                   "--normal", "simple", "--config", "fleetwatch.toml", "--json", "out.json", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    dr = out["demand_response"]
    assert set(dr) == {"requests", "met", "rejected", "over_firm", "met_over_firm", "class_bound_exceeded",
                       "time_to_target_p99_s",
                       "reduction_shortfall_max_pct",
                       "throughput_cost_pct", "uniform_cap_cost_pct", "oracle_cap_cost_pct",
                       "reduction_true_min_pct",
                       "credit_error_max_pct", "restore_overshoot_max_kw", "restore_over_site_cap", "cap_not_binding_alerts"}
    assert dr["requests"] == 3 and dr["rejected"] == 0 and dr["met"] == 3
    assert dr["reduction_true_min_pct"] >= 98 and dr["restore_over_site_cap"] == 0 and dr["class_bound_exceeded"] == 0
    assert dr["time_to_target_p99_s"] <= 30 and 0 < dr["throughput_cost_pct"] < 50
    assert out["false_alerts"] == 0, out["false_alerts_by_alertname"]
    assert "demand response: requests 3" in r.stdout
    bad = fleetwatch("eval", "--duration", "60", "--power-requests", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "--power-requests -1: must be 0 or more" in bad.stderr


def test_eval_with_a_rack_cooling_loss_trips_the_breaker_and_quarantines_none_of_the_rack(tmp_path):
    """The remediation breaker's scenario, alone (no other fault to open the breaker first):
    every node of the hot rack asks for a quarantine, the rack alert refuses the first, the
    breaker trips on the second, and none of the rack is taken out of service."""
    r = fleetwatch("eval", "--duration", "2400", "--seed", "1", "--fault-interval", "0", "--rack-cooling-loss",
                   "--json", "out.json", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rem = json.loads((tmp_path / "out.json").read_text())["remediation"]
    loss = rem["rack_cooling_loss"]
    assert loss["rack"] == "r01" and loss["nodes"] == 8 and loss["nodes_asking"] >= 2
    assert loss["nodes_quarantined"] == 0 and loss["breaker_open"] is True
    assert set(loss["refused_by_guardrail"]) <= {"breaker", "rack_alert"} and loss["refused_by_guardrail"]["breaker"] >= 1
    assert rem["breaker_trips"] == 1 and rem["quarantines"] == 0 and rem["false_quarantines"] == 0
    assert "rack_cooling_loss" in r.stdout
