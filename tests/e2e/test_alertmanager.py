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

from pipeline.model import fingerprint, parse_iso_utc
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
        # Its end is the lease of 4 resend intervals from the push (Prometheus's), not Alertmanager's
        # resolve_timeout (5 min): a Fleetwatch that stops pushing has its alerts resolved seconds later.
        lease = parse_iso_utc(a["endsAt"]) - parse_iso_utc(a["updatedAt"])
        assert 0 < lease <= 4.5, lease
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


def test_an_alertmanager_that_takes_only_clients_with_a_certificate_gets_the_alerts(tmp_path):
    """Mutual TLS, as an Alertmanager's web config asks it (client_auth_type
    RequireAndVerifyClientCert): without a client certificate nothing goes in; with one the CA
    did not sign, neither; a renewed certificate on disk is taken at the next connection,
    without a restart; a renewal half written (the certificate, not yet its key) keeps the one
    that works (it had been dropped, and the receiver with it)."""
    from pipeline.sinks.webhook import Client, load_receivers
    from tests.services import client_certificate, self_signed_tls
    ca = self_signed_tls(tmp_path / "tls")
    cert, key = client_certificate(ca, tmp_path / "client", "fleetwatch")
    am = Alertmanager("http://127.0.0.1:1/unused", tmp_path / "am", client_tls=(ca, (cert, key))).start()
    try:
        def receiver(**kw):
            return load_receivers(make_config(alerts={"receivers": [
                {"name": "am", "url": am.url, "kind": "alertmanager", "ca_file": str(ca["ca.pem"]), **kw}]}).alerts)[0]
        body = json.dumps([{"labels": {"alertname": "GpuXid", "node": "r01-n1"}}]).encode()
        refused = Client(receiver(), 5).post(body, "k1", 0)
        assert not refused.ok and not refused.permanent and "no client certificate is sent" in refused.reason

        other = self_signed_tls(tmp_path / "other-ca")  # a certificate no CA of Alertmanager's signed
        mine = tmp_path / "mine"
        mine.mkdir()
        old_cert, old_key = client_certificate(other, tmp_path / "old", "fleetwatch")
        (mine / "cert.pem").write_bytes(old_cert.read_bytes())
        (mine / "key.pem").write_bytes(old_key.read_bytes())
        client = Client(receiver(cert_file=str(mine / "cert.pem"), key_file=str(mine / "key.pem")), 5)
        assert not client.post(body, "k2", 0).ok
        client.close()
        (mine / "key.pem").write_bytes(key.read_bytes())  # renewed: the key, then the certificate
        (mine / "cert.pem").write_bytes(cert.read_bytes())
        assert client.post(body, "k3", 0).ok
        client.close()
        cert2, key2 = client_certificate(ca, tmp_path / "next", "fleetwatch")
        (mine / "cert.pem").write_bytes(cert2.read_bytes())  # renewed again, the certificate first
        assert client.post(body, "k4", 0).ok  # (still the one before: the new one has not its key yet)
        client.close()
        (mine / "key.pem").write_bytes(key2.read_bytes())
        assert client.post(body, "k5", 0).ok

        cfg = make_config(data_dir=str(tmp_path / "data"), alerts={"receivers": [
            {"name": "am", "url": am.url, "kind": "alertmanager", "ca_file": str(ca["ca.pem"]),
             "cert_file": str(cert), "key_file": str(key)}]})

        async def go():
            notifier = Notifier(cfg)
            await notifier.start()
            try:
                await notifier.handle([alert("GpuOverTemperature", "r01", "r01-n1")])
                await until(lambda: notifier.stats.delivered >= 1, timeout=30)
                return notifier.stats
            finally:
                await notifier.close()
        stats = asyncio.run(go())
        assert stats.pending == 0 and stats.dead_lettered == 0
        with urllib.request.urlopen(f"{am.url}/api/v2/alerts", timeout=5, context=am.client_context) as r:
            names = sorted(a["labels"]["alertname"] for a in json.loads(r.read()))
        assert names == ["GpuOverTemperature", "GpuXid"]
    finally:
        am.close()
