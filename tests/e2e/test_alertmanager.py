"""Alertmanager push against a real Prometheus Alertmanager (Debian's prometheus-alertmanager):
Fleetwatch's alerts go through the delivery path (Notifier, outbox, HTTP) to
POST /api/v2/alerts, and come out of Alertmanager's own webhook grouped as it is
configured, then resolved."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import pytest

from pipeline.model import fingerprint
from pipeline.sinks.notify import Notifier
from tests.conftest import make_config
from tests.services import Alertmanager, HttpReceiver
from tests.test_delivery import alert, until

pytestmark = pytest.mark.slow


@pytest.fixture
def hook():
    r = HttpReceiver(keep_bodies=True).start()
    yield r
    r.stop()


@pytest.fixture
def am(hook):
    a = Alertmanager(hook.url).start()
    yield a
    a.close()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def groups(hook: HttpReceiver, status: str) -> dict[tuple[str, str], dict]:
    """Alertmanager's latest webhook payload per group (alertname, rack) with this status."""
    return {(p["groupLabels"]["alertname"], p["groupLabels"]["rack"]): p for p in hook.bodies if p["status"] == status}


def test_alerts_reach_alertmanager_grouped_then_resolve(tmp_path, am, hook):
    cfg = make_config(data_dir=str(tmp_path / "data"), alerts={
        "resend_interval_s": 1, "external_url": "http://fleetwatch.example",
        "receivers": [{"name": "am", "url": am.url, "kind": "alertmanager"}]})
    firing = [alert("GpuOverTemperature", "r01", "r01-n1"), alert("GpuOverTemperature", "r01", "r01-n2"),
              alert("GpuOverTemperature", "r02", "r02-n1"), alert("GpuXid", "r01", "r01-n1")]
    resolved = [alert(a["labels"]["alertname"], a["labels"]["rack"], a["labels"]["node"], resolved=True)
                for a in firing]
    expected = {("GpuOverTemperature", "r01"): 2, ("GpuOverTemperature", "r02"): 1, ("GpuXid", "r01"): 1}

    async def go():
        notifier = Notifier(cfg)
        await notifier.start()
        try:
            await notifier.handle(firing)
            await until(lambda: set(groups(hook, "firing")) == set(expected), timeout=30)
            reported = json.loads(await asyncio.to_thread(get, f"{am.url}/api/v2/alerts"))
            await asyncio.sleep(2.5)  # a re-push or two (resend_interval_s = 1)
            pushes = notifier.stats.pushes
            await notifier.handle(resolved)
            await until(lambda: set(groups(hook, "resolved")) == set(expected), timeout=30)
            return reported, pushes, notifier.stats
        finally:
            await notifier.close()
    reported, pushes, stats = asyncio.run(go())

    ours = {a["fingerprint"]: a for a in firing}
    # Alertmanager's fingerprints are ours: pipeline.model.fingerprint is its label-set hash.
    assert sorted(a["fingerprint"] for a in reported) == sorted(ours)
    for a in reported:
        assert a["fingerprint"] == fingerprint(a["labels"])
        assert a["labels"] == ours[a["fingerprint"]]["labels"]
        assert a["annotations"] == ours[a["fingerprint"]]["annotations"]
        assert a["generatorURL"] == f"http://fleetwatch.example/alerts/{a['fingerprint']}"
        assert a["status"]["state"] == "active"
    for key, payload in groups(hook, "firing").items():
        assert len(payload["alerts"]) == expected[key]
        assert payload["groupLabels"] == {"alertname": key[0], "rack": key[1]}
        for a in payload["alerts"]:
            assert a["status"] == "firing"
            assert a["labels"] == ours[a["fingerprint"]]["labels"]
            assert a["annotations"] == ours[a["fingerprint"]]["annotations"]
            assert a["startsAt"].startswith("2026-03-01T00:00:00")
    for key, payload in groups(hook, "resolved").items():
        assert len(payload["alerts"]) == expected[key]
        assert all(a["status"] == "resolved" and a["endsAt"].startswith("2026-03-01T00:05:00")
                   for a in payload["alerts"])
    received = sum(float(v) for v in re.findall(r'^alertmanager_alerts_received_total\{status="firing"[^}]*\} (\S+)',
                                                get(f"{am.url}/metrics").decode(), re.M))
    print(f"Alertmanager: {len(hook.bodies)} webhook notifications out of it, {received:.0f} firing alerts received "
          f"({pushes} pushes while firing: the changes, then re-pushes every second); notify: {stats.delivered} "
          f"delivered, {stats.pending} pending")
    assert pushes >= 2 and received >= 2 * len(firing)  # re-pushed while firing
    assert stats.pending == 0 and stats.dead_lettered == 0


def test_the_shipped_alertmanager_config_inhibits_as_fleetwatch_s_default_rules_do(tmp_path):
    """Alerts pushed to Alertmanager are inhibited there, not by Fleetwatch: the shipped
    deploy/alertmanager/alertmanager.yml carries the catalog's rules (generated), so a rack's
    coolant leak mutes its GPUs' over-temperature alerts and not another rack's."""
    from pathlib import Path
    shipped = Path(__file__).resolve().parents[2] / "deploy" / "alertmanager" / "alertmanager.yml"
    am = Alertmanager(config=shipped, workdir=tmp_path).start()
    cfg = make_config(data_dir=str(tmp_path / "data"), alerts={
        "receivers": [{"name": "am", "url": am.url, "kind": "alertmanager"}]})
    pushed = [alert("CoolantLeak", "r01", "r01-cdu"), alert("GpuOverTemperature", "r01", "r01-n1"),
              alert("GpuOverTemperature", "r02", "r02-n1")]

    def states() -> dict[str, dict]:
        return {a["labels"]["rack"] + "/" + a["labels"]["alertname"]: a["status"]
                for a in json.loads(get(f"{am.url}/api/v2/alerts"))}

    async def go():
        notifier = Notifier(cfg)
        await notifier.start()
        try:
            await notifier.handle(pushed)
            await until(lambda: states().get("r01/GpuOverTemperature", {}).get("state") == "suppressed"
                        and len(states()) == 3, timeout=30)
        finally:
            await notifier.close()
    try:
        asyncio.run(go())
        now = states()
    finally:
        am.close()
    assert now["r01/GpuOverTemperature"]["inhibitedBy"] == [fingerprint(pushed[0]["labels"])]
    assert now["r02/GpuOverTemperature"]["state"] == "active" and now["r01/CoolantLeak"]["state"] == "active"
