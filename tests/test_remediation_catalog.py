"""The machine-readable remediation of each alert (detect/catalog.py, issue 18): in the catalog,
an XID's own where it differs, carried on the alert (annotation and archived column) and in
node health (the costliest of its alerts'), and derived for what older versions wrote."""

from __future__ import annotations

import json
from datetime import timedelta

import pyarrow as pa
import pytest

from pipeline.bus import Message, Topic
from pipeline.detect.catalog import ALERTS, REMEDIATIONS, XID_ALERTS, XID_REMEDIATIONS, costliest, remediation
from pipeline.detect.engine import Engine
from pipeline.model import ALERT_V1, EVENT, NODE_HEALTH, NODE_HEALTH_V1, alert_rows, alerts_to_batch, upgraded
from pipeline.sources.simulate import FleetSimulator
from tests.archives import T0
from tests.conftest import make_config


def test_every_alert_names_a_remediation_and_only_gpu_and_node_alerts_act():
    for spec in ALERTS:
        assert spec.remediation in REMEDIATIONS, spec.name
        if spec.scope not in ("gpu", "node"):
            assert spec.remediation == "none", f"{spec.name}: a {spec.scope} alert is not a node's to fix"
    assert {s.remediation for s in ALERTS} >= {"none", "reset_gpu", "reboot_node", "drain_inspect"}
    assert set(XID_REMEDIATIONS.values()) <= set(REMEDIATIONS)


@pytest.mark.parametrize("name, xid, expected", [
    ("GpuXid", 13, "none"),                     # an application's fault
    ("GpuXid", 62, "reset_gpu"),                # micro-controller halt
    ("GpuUncorrectableEcc", 48, "reset_gpu"),   # apply the remap
    ("GpuUncorrectableEcc", 64, "replace"),     # the remap failed: RMA
    ("GpuFellOffBus", 79, "reboot_node"),
    ("GpuXid", 154, "drain_inspect"),           # the driver names its recovery action
])
def test_an_xid_s_remediation(name, xid, expected):
    assert XID_ALERTS.get(xid, "GpuXid") == name
    assert remediation(name, {"xid": xid, "what": "..."}) == expected


def test_a_row_remap_failure_seen_by_nvml_s_flag_is_replaced_as_xid_64_says():
    assert remediation("GpuUncorrectableEcc", {"what": "row remap failure", "remap_failure": True}) == "replace"
    assert remediation("GpuUncorrectableEcc", {"what": "row remap pending", "remap_failure": False}) == "reset_gpu"


def test_the_costliest():
    assert costliest([]) == "none"
    assert costliest(["reset_gpu", "drain_inspect", "none"]) == "drain_inspect"
    assert costliest(["replace", "reboot_node"]) == "replace"


def test_an_alert_and_its_node_carry_the_remediation_from_detection_to_the_archive():
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 2, "fault_interval_s": 0, "gpu_reset_interval_s": 0})
    sim, engine = FleetSimulator(cfg.fleet, start=T0), Engine(cfg)
    for _ in range(5):
        tick = sim.step()
        engine.process(Message(Topic.GPU, tick.gpu))
    first = tick.gpu.slice(0, 2).to_pylist()  # a node's GPUs 0 and 1; the events at the samples' time
    node, now = first[0]["node"], first[0]["ts"]
    assert [(r["node"], r["gpu"]) for r in first] == [(node, 0), (node, 1)]
    events = pa.RecordBatch.from_pylist([
        {"ts": now, "site": "site-a", "rack": "r01", "node": node, "gpu": 0, "gpu_uuid": first[0]["gpu_uuid"],
         "kind": "xid", "code": 64,
         "text": "row remap failure"},
        {"ts": now, "site": "site-a", "rack": "r01", "node": node, "gpu": 1, "gpu_uuid": first[1]["gpu_uuid"],
         "kind": "xid", "code": 13,
         "text": "graphics engine exception"}], schema=EVENT)
    out = engine.process(Message(Topic.EVENTS, events))
    by_name = {a.alertname: a for _, a in out.alerts}
    assert by_name["GpuUncorrectableEcc"].annotations["remediation"] == "replace"
    assert by_name["GpuXid"].annotations["remediation"] == "none"
    rows = alerts_to_batch(out.alerts)
    assert sorted(rows.column("remediation").to_pylist()) == ["none", "replace"]
    assert {a["annotations"]["remediation"] for a in alert_rows(rows)} == {"none", "replace"}  # webhooks, jsonl
    [health] = out.health
    assert health["node"] == node and health["state"] == "failing"
    assert health["remediation"] == "replace"  # the costliest of its alerts' own: XID 64's, not its alert's default
    pa.RecordBatch.from_pylist(out.health, schema=NODE_HEALTH)  # the schema takes it


def test_what_older_versions_wrote_gets_the_catalog_s_remediation():
    a = alerts_to_batch([(T0, _alert("GpuXid", {"xid": 62})), (T0, _alert("GpuStraggler", {})),
                         (T0, _alert("SomeoneElsesAlert", {}))])
    v1 = pa.RecordBatch.from_arrays(a.columns[:len(ALERT_V1)], schema=ALERT_V1)
    assert upgraded(v1).column("remediation").to_pylist() == ["reset_gpu", "drain_inspect", None]
    h1 = pa.RecordBatch.from_pylist([
        {"ts": T0, "site": "s", "rack": "r", "node": "n1", "state": "failing", "previous": "healthy",
         "reasons": "GpuFellOffBus,GpuStraggler"},
        {"ts": T0 + timedelta(seconds=1), "site": "s", "rack": "r", "node": "n1", "state": "healthy",
         "previous": "failing", "reasons": ""}], schema=NODE_HEALTH_V1)
    assert upgraded(h1).column("remediation").to_pylist() == ["drain_inspect", "none"]


def _alert(name: str, evidence: dict):
    from pipeline.model import Alert
    return Alert({"alertname": name, "severity": "warning", "site": "s", "node": "n1", "gpu": "0"},
                 {"summary": name}, T0, "test", 1.0, evidence=json.loads(json.dumps(evidence)))


def test_an_archive_hour_of_both_versions_reads_whole_and_compaction_derives_the_old_rows(tmp_path):
    """Files of alert v1 (an older Fleetwatch's) beside v2: read by column name (the old rows'
    remediation null, as written), and compaction rewrites the hour through the upgrade."""
    from pipeline.analytics.archive import scan
    from pipeline.sinks.compaction import compact
    from pipeline.sinks.parquet import ArchiveWriter
    from tests.archives import write_file
    archive = tmp_path / "archive"
    old = alerts_to_batch([(T0, _alert("GpuXid", {"xid": 62}))])
    write_file(archive / "alerts", pa.Table.from_batches([
        pa.RecordBatch.from_arrays(old.columns[:len(ALERT_V1)], schema=ALERT_V1)]), "part-1-older-000001.parquet")
    w = ArchiveWriter(archive, writer_id="new")
    new = _alert("GpuStraggler", {})
    new.annotations["remediation"] = "drain_inspect"
    w.add("alerts", alerts_to_batch([(T0 + timedelta(seconds=1), new)]))
    w.flush()
    read = scan(archive / "alerts").sort("ts").collect()
    assert read["alertname"].to_list() == ["GpuXid", "GpuStraggler"]
    assert read["remediation"].to_list() == [None, "drain_inspect"]
    compact(archive, after_s=0.0, now=T0 + timedelta(days=1))
    assert scan(archive / "alerts").sort("ts").collect()["remediation"].to_list() == ["reset_gpu", "drain_inspect"]
