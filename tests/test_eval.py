"""`fleetwatch eval` scoring against ground truth (the command itself: tests/e2e/test_eval.py)."""

from __future__ import annotations

from datetime import datetime, timezone

from pipeline.analytics.evaluate import EvalRun, score, table


def _label(kind, start, end, node="r01-n01", gpu=0, rack="r01", normal=False, fault_id=0):
    return {"fault_id": fault_id, "fault_type": kind, "normal": normal, "rack": rack, "node": node, "gpu": gpu,
            "start": start, "end": end}


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


def test_a_fault_without_a_signature_is_counted_apart_not_missed():
    from datetime import datetime, timedelta, timezone
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    s = lambda x: t0 + timedelta(seconds=x)  # noqa: E731
    labels = [_label("stuck_power_sensor", s(100), s(700), gpu=0, fault_id=1),   # found
              _label("stuck_power_sensor", s(1000), s(1600), gpu=1, fault_id=2),  # an idle GPU that stayed put
              _label("stuck_power_sensor", s(2000), s(2600), gpu=2, fault_id=3)]  # the same, alerted anyway
    alerts = [{"labels": {"alertname": "GpuPowerSensorStuck", "rack": "r01", "node": "r01-n01", "gpu": g},
               "starts_at": s(t)} for g, t in (("0", 130), ("2", 2400))]
    run = EvalRun(labels, alerts, s(3600), node_hours=1.0, gpu_samples=0, without_signature=frozenset({2, 3}))
    out = score(run)
    p = out["faults"]["stuck_power_sensor"]
    assert (p["injected"], p["without_signature"], p["detected"], p["recall"]) == (1, 2, 1, 1.0)
    assert out["faults_without_signature"] == 2 and out["false_alerts"] == 0
    assert "without a signature (not scored): 2" in table(out)
    missed = score(EvalRun(labels, alerts, s(3600), node_hours=1.0, gpu_samples=0))["faults"]["stuck_power_sensor"]
    assert (missed["injected"], missed["without_signature"], missed["recall"]) == (3, 0, 0.6667)


def test_the_simulator_knows_a_stuck_sensor_that_hid_nothing():
    """A sensor frozen on a GPU that stays idle hid nothing (its draw flickers 0.3 W around
    71 W); one frozen under a load that moves hid what the load did."""
    from tests.conftest import make_config
    from pipeline.sources.simulate import FleetSimulator
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 8, "fault_interval_s": 0, "gpu_reset_interval_s": 0,
                             "seed": 5})
    sim = FleetSimulator(cfg.fleet, start=datetime(2026, 1, 1, tzinfo=timezone.utc))
    sim.group_busy[:] = False
    sim.group_until[:] = 1e9
    idle = sim.inject("stuck_power_sensor", gpu=0, duration_s=120)
    sim.step()
    job = sim.node_group[4]  # (another job group's node than GPU 0's)
    assert job != sim.node_group[0]
    loaded = sim.inject("stuck_power_sensor", gpu=4 * 8, duration_s=120)
    sim.step()
    sim.group_busy[job] = True  # its job starts after its sensor froze at idle
    sim.group_intensity[job] = 1.0
    for _ in range(60):
        sim.step()
    assert sim.without_signature() == {idle.fault_id}
    assert loaded.fault_id not in sim.without_signature() and sim.hidden_w[loaded.fault_id] > 100.0


def test_remediation_is_scored_by_the_alerts_own_explanation():
    """A quarantine is timed against the fault on its node, even when the node's clock runs
    behind and its alert starts before the fault's label; one a rack fault explains is counted
    apart; one no fault explains is false."""
    from datetime import timedelta

    from pipeline.analytics.remediation_eval import score as remediation_score
    from tests.conftest import make_config
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    s = lambda x: t0 + timedelta(seconds=x)  # noqa: E731
    labels = [_label("gpu_fell_off_bus", s(1000), s(1400), node="r01-n01", gpu=0, fault_id=1),
              _label("rack_cooling_degraded", s(5000), s(5600), node=None, gpu=None, rack="r03", fault_id=2)]

    def alert(name, node, gpu, start, end, remediation):
        return {"labels": {"alertname": name, "severity": "critical", "site": "site-a", "rack": node[:3],
                           "node": node, "gpu": gpu}, "starts_at": s(start), "ends_at": s(end),
                "remediation": remediation}
    alerts = [alert("GpuFellOffBus", "r01-n01", "0", 997, 1400, "reboot_node"),          # 3 s early: a clock
              alert("GpuUncorrectableEcc", "r02-n03", "1", 3000, 3300, "reset_gpu"),      # no fault at all
              alert("GpuOverTemperature", "r03-n02", "4", 5100, 5500, "drain_inspect")]   # the rack's fault
    nodes = {f"r0{r}-n0{n}": f"r0{r}" for r in range(1, 5) for n in range(1, 9)}
    run = EvalRun(labels, alerts, s(7200), node_hours=64.0, gpu_samples=0, nodes=nodes)
    out = remediation_score(run, make_config())
    assert (out["quarantines"], out["false_quarantines"], out["quarantines_for_rack_faults"]) == (3, 1, 1)
    assert out["time_to_quarantine_p50_s"] == 0.0 and out["breaker_trips"] == 0
