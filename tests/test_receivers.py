"""Receiver kinds behind one protocol (pipeline/sinks/receivers): the registry is the one
list of kinds the configuration accepts, each kind loads and says where it POSTs; and
the sinks stand on their own (no analytics import)."""

from __future__ import annotations

import ast
import dataclasses

import pytest

from pipeline.config import ConfigError, ReceiverConfig
from pipeline.sinks.receivers import RECEIVER_KINDS, receiver_kind
from pipeline.sinks.receivers.base import ReceiverKind
from tests.conftest import REPO, make_config


def test_config_takes_the_receiver_kinds_from_the_registry():
    meta = {f.name: f.metadata for f in dataclasses.fields(ReceiverConfig)}["kind"]
    assert meta["choices"] == tuple(RECEIVER_KINDS) == ("webhook", "alertmanager")
    assert meta["doc"] == "webhook: grouped Alertmanager v4 webhook payloads; alertmanager: POST /api/v2/alerts"
    with pytest.raises(ConfigError, match="allowed: webhook, alertmanager"):
        make_config(alerts={"receivers": [{"name": "x", "url": "http://h/", "kind": "slack"}]})


@pytest.mark.parametrize("kind", sorted(RECEIVER_KINDS))
def test_every_registered_kind_implements_the_protocol(kind):
    cls = receiver_kind(kind)
    assert issubclass(cls, ReceiverKind) and cls.kind == kind
    assert cls.state_file.endswith(".json") and cls.counts in ("notifications", "pushes")
    for name in ("enqueue", "snapshot", "restore"):  # what every kind must have of its own
        assert getattr(cls, name) is not getattr(ReceiverKind, name), f"{kind} does not implement {name}"
    files = {receiver_kind(k).state_file for k in RECEIVER_KINDS}
    assert len(files) == len(RECEIVER_KINDS), "each kind needs its own state file"


def test_each_kind_says_where_its_receivers_post():
    assert receiver_kind("webhook").post_url("https://h/hook?x=1") == "https://h/hook?x=1"
    assert receiver_kind("alertmanager").post_url("http://am:9093/") == "http://am:9093/api/v2/alerts"
    assert receiver_kind("alertmanager").post_url("http://u:p@am:9093/prefix") == \
        "http://u:p@am:9093/prefix/api/v2/alerts"


def test_sinks_do_not_import_analytics():
    for path in sorted((REPO / "pipeline" / "sinks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.startswith("pipeline.analytics")]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}: move what it needs to a neutral module"


def _alert(status: str = "firing") -> dict:
    return {"status": status, "labels": {"alertname": "GpuXid", "severity": "warning", "site": "s", "rack": "r01"},
            "annotations": {"summary": "x", "description": "y", "runbook_url": "z"},
            "startsAt": "2027-01-15T08:00:00.000Z",
            "endsAt": "2027-01-15T08:05:00.000Z" if status == "resolved" else "0001-01-01T00:00:00Z",
            "generatorURL": "", "fingerprint": "0123456789abcdef", "detector": "xid", "score": 31.0,
            "evidence": {"xid": 31}}


def _receivers(kind: str) -> list:
    from pipeline.sinks.webhook import load_receivers
    cfg = make_config(alerts={"receivers": [{"name": "oncall", "url": "http://h:1/x", "kind": kind}],
                              "external_url": "https://fw.example"})
    return cfg.alerts, load_receivers(cfg.alerts)


def test_the_webhook_kinds_payload_keeps_its_exact_shape():
    import json
    cfg, receivers = _receivers("webhook")
    kind = receiver_kind("webhook")(cfg, receivers, None)
    kind.add([_alert()], 100.0)
    assert kind.enqueue([_alert()], 100.0, lambda _: 0).payloads == {"oncall": []}  # group_wait
    due = kind.enqueue([], 100.0 + cfg.group_wait_s, lambda _: 0)
    assert due.changed
    [body] = due.payloads["oncall"]
    assert json.dumps(body, separators=(",", ":")) == (
        '{"version":"4","groupKey":"{}:{alertname=\\"GpuXid\\",rack=\\"r01\\",site=\\"s\\"}","truncatedAlerts":0,'
        '"status":"firing","receiver":"oncall","groupLabels":{"alertname":"GpuXid","rack":"r01","site":"s"},'
        '"commonLabels":{"alertname":"GpuXid","severity":"warning","site":"s","rack":"r01"},'
        '"commonAnnotations":{"summary":"x","description":"y","runbook_url":"z"},'
        '"externalURL":"https://fw.example","alerts":[{"status":"firing","labels":{"alertname":"GpuXid",'
        '"severity":"warning","site":"s","rack":"r01"},"annotations":{"summary":"x","description":"y",'
        '"runbook_url":"z"},"startsAt":"2027-01-15T08:00:00.000Z","endsAt":"0001-01-01T00:00:00Z",'
        '"generatorURL":"https://fw.example/alerts/0123456789abcdef","fingerprint":"0123456789abcdef",'
        '"detector":"xid","score":31.0,"evidence":{"xid":31}}]}')


def test_the_alertmanager_kind_pushes_postable_alerts_and_resends_once_per_outbox():
    cfg, receivers = _receivers("alertmanager")
    kind = receiver_kind("alertmanager")(cfg, receivers, None)
    due = kind.enqueue([_alert()], 100.0, lambda _: 0)
    assert due.changed and due.payloads == {"oncall": [[{
        "labels": _alert()["labels"], "annotations": _alert()["annotations"], "startsAt": "2027-01-15T08:00:00.000Z",
        "generatorURL": "https://fw.example/alerts/0123456789abcdef"}]]}
    kind.written({"oncall": 1})
    later = 100.0 + cfg.resend_interval_s
    again = kind.enqueue([], later, lambda _: 1)
    assert again.payloads["oncall"] and again.changed
    kind.written({"oncall": 2})
    stuck = kind.enqueue([], later + cfg.resend_interval_s, lambda _: 1)  # the re-push waits undelivered
    assert stuck.payloads == {"oncall": []} and stuck.changed
    resolved = kind.enqueue([_alert("resolved")], later + 1, lambda _: 2)
    assert resolved.payloads["oncall"][0][0]["endsAt"] == "2027-01-15T08:05:00.000Z"
    assert kind.next_wakeup() is None and len(kind.firing) == 0
    # Restored from alerts.jsonl's latest changes; where it cannot be read, from its own state.
    again = receiver_kind("alertmanager")(cfg, receivers, None)
    again.restore({"last_resend": 5.0, "firing": {"x": {"labels": {"alertname": "Kept"}}}}, {"0123456789abcdef": _alert()})
    assert len(again.firing) == 1 and again.firing.resend(5.0 + cfg.resend_interval_s)[0][0]["labels"] == _alert()["labels"]
    again.restore({"last_resend": 5.0, "firing": {"x": {"labels": {"alertname": "Kept"}}}}, None)
    assert again.firing.resend(1e9) == [[{"labels": {"alertname": "Kept"}}]]


def test_a_firing_alert_s_end_is_a_lease_stamped_when_its_push_goes_out():
    """endsAt of a firing alert: 4 resend intervals after the try that sends it (Prometheus's
    lease), never in the outbox record, so a push that waited out an outage arrives alive."""
    cfg, receivers = _receivers("alertmanager")
    kind = receiver_kind("alertmanager")(cfg, receivers, None)
    [record] = kind.enqueue([_alert(), _alert("resolved") | {"fingerprint": "ffff"}], 100.0, lambda _: 0).payloads["oncall"]
    kept = [dict(a) for a in record]
    t = 1_800_000_000.0  # a try hours after the push was queued
    sent = kind.at_send(record, t)
    assert cfg.resend_interval_s == 60 and sent[0]["endsAt"] == "2027-01-15T08:04:00.000Z"  # t + 4 x 60 s
    assert sent[1]["endsAt"] == "2027-01-15T08:05:00.000Z"  # a resolution keeps its own
    assert record == kept  # the outbox's record as it was: the next try stamps its own time
    assert receiver_kind("webhook")(cfg, receivers, None).at_send(record, t) is record
