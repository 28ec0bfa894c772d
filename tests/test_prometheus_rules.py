"""Prometheus's rules about Fleetwatch (deploy/prometheus/rules.yml, generated from the catalog's alerts of
family "prometheus"), run by promtool's own rule engine on series as Fleetwatch's /metrics serves them:
each fires on the failure it names, with labels its summary can read, and not on a healthy or a passing
condition."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from pipeline.detect.catalog import ALERTS_BY_NAME, RULE_ALERTS
from tests.conftest import REPO
from tests.test_deploy import tool

RULES = REPO / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS_ALERTS = [a.name for a in RULE_ALERTS]

AGENT = {"job": "fleetwatch-agent", "instance": "gpu-017:9400"}
NOTIFY = {"job": "fleetwatch-notify", "instance": "notify:9410"}
ONE_PROCESS = {"job": "fleetwatch", "instance": "fw-1:9410"}  # `fleetwatch run`: every role in one process


def series(name: str, labels: dict[str, str], values: str) -> dict:
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


# alert -> (series where it fires, when it is checked, the labels it must carry; series where it must not fire,
# checked at QUIET)
CASES: dict[str, tuple[list[dict], str, dict[str, str], list[dict]]] = {
    "FleetwatchTargetDown": (
        [series("up", AGENT, "0x15")], "11m", AGENT,
        [series("up", NOTIFY, "0x5 1x10"),                                  # back within 10 minutes
         series("up", {"job": "node-exporter", "instance": "gpu-017:9100"}, "0x15")]),  # not Fleetwatch's
    "FleetwatchNotificationsBacklog": (
        [series("fleetwatch_outbox_pending", {**NOTIFY, "receiver": "pager"}, "3x15")], "11m",
        {**NOTIFY, "receiver": "pager"},
        [series("fleetwatch_outbox_pending", {**NOTIFY, "receiver": "pager"}, "3 0 4 0 2 0 5 0 1 0 3 0 2 0 4 0")]),
    "FleetwatchNotificationsLost": (
        [series("fleetwatch_notifications_dead_lettered_total", {**NOTIFY, "receiver": "pager"}, "0 0 0 1x10")],
        "6m", {**NOTIFY, "receiver": "pager"},
        [series("fleetwatch_notifications_dead_lettered_total", {**NOTIFY, "receiver": "pager"}, "7x80"),
         # given up on at 1m: resolved after its hour (the quiet case is checked at 74m too)
         series("fleetwatch_notifications_dead_lettered_total", {**NOTIFY, "receiver": "chat"},
                "0 1x75")]),
    "FleetwatchIntakeRejecting": (
        [series("fleetwatch_dead_letters_total", {**ONE_PROCESS, "group": "intake", "reason": "schema"}, "0+2x30")],
        "20m", {**ONE_PROCESS, "group": "intake", "reason": "schema"},
        [series("fleetwatch_dead_letters_total", {**ONE_PROCESS, "group": "intake", "reason": "range"},
                "0 1x30")]),  # one bad record: nothing
    "FleetwatchCollectorStalled": (
        [series("fleetwatch_alerts_firing", {**AGENT, "alertname": "FleetwatchStalled", "severity": "critical"},
                "1x10"),
         series("fleetwatch_up", {**AGENT, "role": "agent"}, "1x10")], "6m", AGENT,
        # a process that runs detect beside its agent publishes its FleetwatchStalled itself
        [series("fleetwatch_alerts_firing", {**ONE_PROCESS, "alertname": "FleetwatchStalled", "severity": "critical"},
                "1x10"),
         series("fleetwatch_up", {**ONE_PROCESS, "role": "agent"}, "1x10"),
         series("fleetwatch_up", {**ONE_PROCESS, "role": "detect"}, "1x10"),
         series("fleetwatch_alerts_firing", {**NOTIFY, "alertname": "FleetwatchStalled", "severity": "critical"},
                "0x10"),
         series("fleetwatch_up", {**NOTIFY, "role": "agent"}, "1x10")]),   # an agent that is not stalled
}

QUIET = {name: ("6m", "11m", "20m") for name in CASES} | {"FleetwatchNotificationsLost": ("74m",)}


def annotations(name: str, labels: dict[str, str]) -> dict[str, str]:
    """What the alert must say, from the catalog: its summary over the labels Prometheus gives it."""
    spec = ALERTS_BY_NAME[name]
    return {"summary": spec.summary.format(**labels), "description": spec.action,
            "runbook_url": f"runbooks/{name}.md", "remediation": spec.remediation}


def promtool_test(tmp_path, tests: list[dict]) -> subprocess.CompletedProcess:
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    return subprocess.run([tool("promtool"), "test", "rules", str(tmp_path / "tests.yml")],
                          capture_output=True, text=True)


def test_every_prometheus_alert_of_the_catalog_has_its_case():
    assert PROMETHEUS_ALERTS and sorted(CASES) == sorted(PROMETHEUS_ALERTS)
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert [r["alert"] for g in groups for r in g["rules"]] == PROMETHEUS_ALERTS


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_rule_fires_on_its_failure_with_what_its_summary_reads_and_not_otherwise(tmp_path, name):
    failing, at, labels, healthy = CASES[name]
    spec = ALERTS_BY_NAME[name]
    fires = {"interval": "1m", "input_series": failing, "alert_rule_test": [{
        "eval_time": at, "alertname": name,
        "exp_alerts": [{"exp_labels": {**labels, "severity": spec.severity},
                        "exp_annotations": annotations(name, labels)}]}]}
    quiet = {"interval": "1m", "input_series": healthy,
             "alert_rule_test": [{"eval_time": t, "alertname": name, "exp_alerts": []} for t in QUIET[name]]}
    r = promtool_test(tmp_path, [fires, quiet])
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_check_is_not_vacuous(tmp_path):
    """A case that expects another label fails: promtool compares what fires."""
    failing, at, labels, _ = CASES["FleetwatchTargetDown"]
    wrong = {"interval": "1m", "input_series": failing, "alert_rule_test": [{
        "eval_time": at, "alertname": "FleetwatchTargetDown",
        "exp_alerts": [{"exp_labels": {**labels, "severity": "critical"},
                        "exp_annotations": annotations("FleetwatchTargetDown", labels)}]}]}
    assert promtool_test(tmp_path, [wrong]).returncode != 0


def test_notifications_given_up_on_before_the_first_scrape_are_seen(tmp_path):
    """A notify that dead-lettered as it started (old outbox records past max_age_s): its counter's first
    sample is already above 0, which increase() cannot see."""
    labels = {**NOTIFY, "receiver": "pager"}
    started = {"interval": "1m", "input_series": [series("fleetwatch_notifications_dead_lettered_total", labels,
                                                         "3x10")],
               "alert_rule_test": [{"eval_time": "5m", "alertname": "FleetwatchNotificationsLost", "exp_alerts": [
                   {"exp_labels": {**labels, "severity": "critical"},
                    "exp_annotations": annotations("FleetwatchNotificationsLost", labels)}]}]}
    r = promtool_test(tmp_path, [started])
    assert r.returncode == 0, r.stdout + r.stderr
