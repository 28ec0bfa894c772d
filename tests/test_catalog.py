"""The alert catalog is the single source of truth: what it says about each alert holds
for the alerts the detectors really raise (labels, evidence, detector, fire-after,
suppression), its inhibit rules name catalog alerts, and the tables generated from it
(runbooks/README.md, docs/detection.md) are current."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import docgen
from pipeline.bus import Message, Topic
from pipeline.config import DEFAULT_INHIBIT_RULES
from pipeline.detect.catalog import ALERTS, ALERTS_BY_NAME, DETECTOR_ALERTS, SCOPE_LABELS, SCOPES, \
    SEVERITIES, explained_by, inhibit_rules
from pipeline.detect.engine import Engine
from pipeline.model import EVENT
from tests.conftest import REPO, make_config
from tests.test_detect import Harness

G = 8  # GPUs per node in the harness


def _gpu(rack: int, node: int, index: int, nodes_per_rack: int = 4) -> int:
    return (rack * nodes_per_rack + node) * G + index


def _faults() -> list:
    """Every simulator fault at once, each on its own rack, node or GPU of a 8-rack site."""
    h = Harness(seed=11, racks=8, nodes_per_rack=4)
    h.run(180)
    for kind, target, params in (
            ("coolant_flow_loss", {"rack": 0}, {"flow_factor": 0.15}), ("coolant_leak", {"rack": 1}, None),
            ("pdu_overload", {"rack": 2}, None),
            ("rack_cooling_degraded", {"rack": 3}, {"extra_c": 32.0, "rate_c_per_s": 0.2, "liquid_factor": 0.7}),
            ("hw_power_brake", {"node": 16}, None), ("node_cooling_degraded", {"node": 17}, None),
            ("thermal_runaway", {"gpu": _gpu(5, 0, 3)}, None), ("straggler_gpu", {"gpu": _gpu(5, 1, 3)}, None),
            ("pcie_replay_storm", {"gpu": _gpu(5, 2, 3)}, None), ("nvlink_crc_storm", {"gpu": _gpu(5, 3, 3)}, None),
            ("stuck_power_sensor", {"gpu": _gpu(6, 0, 3)}, None), ("ecc_uncorrectable", {"gpu": _gpu(6, 1, 3)}, None),
            ("gpu_fell_off_bus", {"gpu": _gpu(6, 2, 3)}, None)):
        h.sim.inject(kind, duration_s=900, params=params, **target)
    h.sim.group_busy[:] = True
    h.sim.group_intensity[:] = 1.0
    h.run(300)
    return h.changes


def _the_rest() -> list:
    """What no simulator fault raises: XIDs, silent GPUs and nodes, a GPU near its own slowdown
    threshold, forced clocks, a drifting flow meter, the site over its power cap, a power cap
    that saves nothing."""
    h = Harness(seed=19, racks=4, nodes_per_rack=4)
    h.engine = Engine(make_config(detect={"site_power_cap_w": 1.0, "cap_not_binding_samples": 10},
                                  fleet=h.cfg.fleet.__dict__))
    hot, slowed, silent_gpu, silent_node = _gpu(0, 0, 1), _gpu(0, 1, 2), _gpu(0, 2, 5), 3 * 4 + 2
    slack = _gpu(0, 3, 6)  # capped at 500 W, its job drawing 300 W: the cap saves nothing

    def mutate(topic, batch):
        if topic == Topic.GPU:
            uuid = batch.column("gpu_uuid").to_numpy(zero_copy_only=False)
            limit = batch.column("slowdown_temp_c").to_numpy(zero_copy_only=False).copy()
            limit[uuid == h.sim.gpu_uuids[hot]] = 40.0
            reasons = batch.column("clock_event_reasons").to_numpy(zero_copy_only=False).copy()
            reasons[uuid == h.sim.gpu_uuids[slowed]] |= 0x48
            mine = uuid == h.sim.gpu_uuids[slack]
            reasons[mine] &= ~0x4
            cap = batch.column("power_limit_w").to_numpy(zero_copy_only=False).copy()
            power = batch.column("power_w").to_numpy(zero_copy_only=False).copy()
            cap[mine], power[mine] = 500.0, 300.0
            for name, values in (("slowdown_temp_c", limit), ("clock_event_reasons", reasons),
                                 ("power_limit_w", cap), ("power_w", power)):
                batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values))
            keep = (uuid != h.sim.gpu_uuids[silent_gpu]) & (
                batch.column("node").to_numpy(zero_copy_only=False) != h.sim.node_names[silent_node])
            return batch.filter(pa.array(keep))
        if topic == Topic.FACILITY:
            hit = pc.and_(pc.equal(batch.column("device"), "cdu-r02"),
                          pc.equal(batch.column("metric"), "flow_lpm")).to_numpy(zero_copy_only=False)
            value = batch.column("value").to_numpy(zero_copy_only=False).copy()
            value[hit] *= 1.4
            return batch.set_column(batch.schema.get_field_index("value"), "value", pa.array(value))
        return batch
    h.sim.group_busy[:] = True
    h.sim.group_intensity[:] = 1.0
    h.run(240)
    h.run(60, mutate)
    rows = []
    for g, code in ((_gpu(1, 0, 0), 74), (_gpu(1, 1, 0), 92), (_gpu(1, 2, 0), 119), (_gpu(1, 3, 0), 31)):
        n = int(h.sim.gpu_node[g])
        rows.append({"ts": h.changes[-1][0], "site": h.cfg.fleet.site, "rack": h.sim.rack_names[h.sim.node_rack[n]],
                     "node": h.sim.node_names[n], "gpu": int(h.sim.gpu_index[g]), "gpu_uuid": h.sim.gpu_uuids[g],
                     "kind": "xid", "code": code, "text": "injected by the test"})
    h.changes += h.engine.process(Message(Topic.EVENTS, pa.RecordBatch.from_pylist(rows, schema=EVENT))).alerts
    return h.changes


def _drift() -> list:
    h = Harness(seed=11)
    h.run(180)
    h.sim.inject("thermal_drift", gpu=_gpu(1, 1, 3), duration_s=1200, params={"rate_c_per_h": 40.0})
    h.run(1200)
    return h.changes


@pytest.fixture(scope="module")
def runs() -> list[list]:
    """State changes of three short runs that together raise every detector alert (~5 s)."""
    return [_faults(), _the_rest(), _drift()]


@pytest.fixture(scope="module")
def raised(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for changes in runs:
        for _, a in changes:
            if a.ends_at is None:
                out.setdefault(a.alertname, []).append(a)
    return out


def test_the_runs_raise_every_detector_alert(raised):
    missing = [s.name for s in DETECTOR_ALERTS if s.name not in raised]
    assert missing == [], f"no scenario here raises {missing}: add one to tests/test_catalog.py"


def test_every_summary_placeholder_is_a_label_or_an_evidence_key_the_detector_emits(raised):
    for spec in ALERTS:
        declared = set(SCOPE_LABELS[spec.scope]) | set(spec.evidence)
        assert set(spec.placeholders) <= declared, (
            f"{spec.name}: summary reads {sorted(set(spec.placeholders) - declared)}, neither a {spec.scope} label "
            f"nor in its catalog evidence")
        assert set(spec.evidence) <= set(spec.placeholders), f"{spec.name}: evidence lists keys its summary never uses"
    for name, alerts in raised.items():
        spec = ALERTS_BY_NAME[name]
        for a in alerts:
            assert set(a.labels) >= {"alertname", "severity", *SCOPE_LABELS[spec.scope]}, (name, a.labels)
            assert a.labels["severity"] == spec.severity
            missing = set(spec.evidence) - set(a.evidence)
            assert not missing, f"{name}: the detector emitted evidence {sorted(a.evidence)}, without {missing}"
            assert set(spec.placeholders) <= set(a.labels) | set(a.evidence)


def test_the_catalog_names_the_detector_of_every_alert(raised):
    for name, alerts in raised.items():
        assert {a.detector for a in alerts} == {ALERTS_BY_NAME[name].detector}, name
    assert all(s.detector and s.family for s in ALERTS)


def test_site_scoped_alerts_carry_the_site_and_an_empty_rack(raised):
    for spec in DETECTOR_ALERTS:  # PowerTargetMissed, the power role's: tests/test_power_role.py
        if spec.scope == "site":
            assert all(a.labels["rack"] == "" for a in raised[spec.name])


def test_fire_after_is_what_the_engine_applies():
    cfg = make_config()
    engine = Engine(cfg)
    for spec in DETECTOR_ALERTS:
        want = spec.fire_after if isinstance(spec.fire_after, int) else getattr(cfg.detect, spec.fire_after)
        assert engine.trackers[spec.name].fire_after == want, spec.name


def _contains(outer: dict[str, str], scope: str, inner: dict[str, str]) -> bool:
    return all(inner.get(k) == outer.get(k) for k in SCOPE_LABELS[scope])


def test_no_alert_fires_while_an_alert_that_suppresses_it_fires_on_its_target(runs):
    """Engine-internal suppression agrees with the catalog's `suppresses`: an alert never
    starts while a catalog suppressor of it fires on the same GPU, node or rack."""
    suppressors = {t: [s for s in ALERTS if t in s.suppresses] for t in ALERTS_BY_NAME}
    checked = 0
    for changes in runs:
        firing: dict[str, dict] = {}
        for _, a in changes:
            if a.ends_at is not None:
                firing.pop(a.fingerprint, None)
                continue
            for s in suppressors[a.alertname]:
                live = [f for f in firing.values() if f.alertname == s.name and _contains(f.labels, s.scope, a.labels)]
                assert not live, f"{a.alertname} {a.labels} fired while {s.name} {live[0].labels} fired"
                checked += 1
            firing[a.fingerprint] = a
    assert checked


def test_the_engine_s_rack_suppression_is_the_catalog_s():
    """The engine reads which rack alerts explain a symptom off the catalog (explained_by):
    the coolant alerts explain the GPUs' thermal symptoms, one view of them (siblings.py)
    serves all three. RackThermalAnomaly, judged by the site tier apart from them, only
    inhibits them at notify; RackHeatImbalance explains nothing."""
    thermal = {t: set(explained_by(t, "rack")) for t in ("GpuOverTemperature", "GpuThermalDrift", "GpuHwSlowdown")}
    assert len({frozenset(v) for v in thermal.values()}) == 1
    assert thermal["GpuOverTemperature"] == {"CoolantFlowLoss", "CoolantLeak"}
    assert set(explained_by("RackHeatImbalance", "rack")) == {"CoolantFlowLoss", "CoolantLeak", "PduOverload"}
    assert {"GpuOverTemperature", "RackHeatImbalance"} <= set(ALERTS_BY_NAME["RackThermalAnomaly"].inhibits)
    assert ALERTS_BY_NAME["RackHeatImbalance"].explains == ()


def test_every_inhibit_rule_names_catalog_alerts():
    for rule in DEFAULT_INHIBIT_RULES:
        for regex in (rule.source, rule.target):
            names = regex.split("|")
            assert all(n in ALERTS_BY_NAME for n in names), f"{regex}: {[n for n in names if n not in ALERTS_BY_NAME]}"
    for spec in ALERTS:
        for name in spec.suppresses + spec.inhibits:
            assert name in ALERTS_BY_NAME, f"{spec.name} explains {name}, which is no catalog alert"
        assert spec.name not in spec.explains
        assert spec.scope in SCOPES and spec.severity in SEVERITIES


def test_default_inhibit_rules_are_derived_from_the_catalog():
    assert [(r.source, r.target, r.equal) for r in DEFAULT_INHIBIT_RULES] == [tuple(r) for r in inhibit_rules()]
    assert [(r.source, r.target, r.equal) for r in DEFAULT_INHIBIT_RULES] == [
        ("CoolantFlowLoss|CoolantLeak",
         "GpuOverTemperature|GpuThermalRunaway|GpuThermalDrift|GpuHwSlowdown|NodeThermalAnomaly", ["site", "rack"]),
        ("RackThermalAnomaly", "GpuOverTemperature|GpuThermalRunaway|GpuThermalDrift|GpuHwSlowdown|"
         "NodeThermalAnomaly|RackHeatImbalance", ["site", "rack"]),
        ("NodeNotReporting", "GpuNotReporting", ["site", "rack", "node"])]


def test_generated_docs_are_current():
    """The alert table (docs/detection.md), the runbook index and the configuration reference
    are what scripts/update-docs writes from the code."""
    assert docgen.update(REPO, check=True) == [], "a generated table is stale: run scripts/update-docs"


def test_update_docs_check_changes_nothing_and_fails_on_a_stale_table(tmp_path):
    for name, (path, _) in docgen.GENERATED.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        begin, end = docgen.markers(name, path)
        block = f"{begin}\nold\n{end}"
        (tmp_path / path).write_text(f"intro\n{block}\nrest\n")
    assert sorted(docgen.update(tmp_path, check=True)) == sorted(p for p, _ in docgen.GENERATED.values())
    assert "old" in (tmp_path / "docs" / "detection.md").read_text()
    docgen.update(tmp_path)
    text = (tmp_path / "docs" / "detection.md").read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "`SitePowerOverCap` | warning | site" in text
    assert docgen.update(tmp_path, check=True) == []
