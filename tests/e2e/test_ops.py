"""Watch the watcher (issue 13), end to end: a real `fleetwatch` process with --http serves
/metrics, /healthz and /readyz, tells systemd over a real AF_UNIX datagram socket, raises
its Watchdog, goes unready while its brokers are away; a real Prometheus scrapes it, and
every panel of every dashboard in deploy/grafana/dashboards returns data from it."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pipeline.detect.catalog import RULE_ALERTS
from tests.conftest import REPO
from tests.helpers import FAST, http_get, start, wait_for
from tests.services import KafkaBroker, Mosquitto, Prometheus, free_port

DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))


def stop(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    return err


class Systemd:
    """The listening end of $NOTIFY_SOCKET, as systemd holds it: a real AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[str] = []

    def receive(self) -> list[str]:
        try:
            while True:
                self.got.append(self.sock.recv(4096).decode())
        except TimeoutError:
            return self.got


def test_a_daemon_with_http_serves_its_endpoints_notifies_systemd_and_raises_its_watchdog(tmp_path, receiver):
    systemd = Systemd(tmp_path / "notify.sock")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = start(tmp_path, "--http", f"127.0.0.1:{port}",
              env={"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "2000000",
                   "FLEETWATCH_ALERTS__WEBHOOKS": receiver.url, "FLEETWATCH_ALERTS__GROUP_WAIT_S": "0",
                   "FLEETWATCH_ALERTS__GROUP_INTERVAL_S": "0"})
    try:
        wait_for(lambda: "READY=1" in systemd.receive() or p.poll() is not None, timeout=120)
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert http_get(f"{url}/readyz") == (200, "ready\n") and http_get(f"{url}/healthz") == (200, "alive\n")
        status, text = http_get(f"{url}/metrics")
        metrics = {f.name: f for f in text_string_to_metric_families(text)}
        assert status == 200 and {s.labels["role"]: s.value for s in metrics["fleetwatch_up"].samples} == {
            "simulate": 1, "detect": 1, "power": 1, "remediate": 1, "archive": 1, "notify": 1}
        # WatchdogSec=2s: WATCHDOG=1 every second while the loops turn
        wait_for(lambda: systemd.receive().count("WATCHDOG=1") >= 3)

        def watchdog(status: str) -> list[dict]:
            return [a for pl in list(receiver.payloads) for a in pl["alerts"]
                    if a["labels"]["alertname"] == "FleetwatchWatchdog" and a["status"] == status]
        wait_for(lambda: watchdog("firing"))  # delivered by notify, like any alert
        (fired,) = {a["fingerprint"]: a for a in watchdog("firing")}.values()
        assert fired["labels"]["severity"] == "none" and fired["labels"]["instance"].endswith(f":{port}")
        err = stop(p)
    finally:
        p.kill()
    assert "STOPPING=1" in systemd.receive()
    assert "ready: warmed up" in err
    lines = [json.loads(x) for x in (tmp_path / "data" / "alerts.jsonl").read_text().splitlines()]
    mine = [a["status"] for a in lines if a["fingerprint"] == fired["fingerprint"]]
    assert mine == ["firing", "resolved"]  # resolved when the process stops
    assert systemd.got.index("READY=1") < systemd.got.index("STOPPING=1")


def test_not_ready_while_the_mqtt_broker_is_away_and_ready_again_when_it_is_back(tmp_path):
    broker = Mosquitto().start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = start(tmp_path, "--http", f"127.0.0.1:{port}", "--mqtt", f"127.0.0.1:{broker.port}")
    try:
        wait_for(lambda: http_get(f"{url}/readyz")[0] == 200 or p.poll() is not None, timeout=120)
        assert p.poll() is None, p.communicate()[1][-3000:]
        broker.stop()
        wait_for(lambda: http_get(f"{url}/readyz") == (503, "the MQTT broker is unreachable\n"))
        assert http_get(f"{url}/healthz") == (200, "alive\n")  # an outage of a broker is no reason to restart
        broker.start()
        wait_for(lambda: http_get(f"{url}/readyz")[0] == 200)
        err = stop(p)
    finally:
        p.kill()
        broker.close()
    assert "not ready: the MQTT broker is unreachable" in err and "ready again" in err


# ---- a real Prometheus ----------------------------------------------------------------------

def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out += [p, *p.get("panels", [])]  # a collapsed row holds its panels
    return out


def variables(prom: Prometheus, dashboard: dict) -> dict[str, str]:
    """Each query variable's first value, as Grafana would offer it (label_values(SELECTOR, LABEL))."""
    out: dict[str, str] = {}
    for v in dashboard.get("templating", {}).get("list", []):
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        selector, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query).groups()
        series = prom.api("series", **{"match[]": grafana(selector, out)})
        values = sorted({s[label] for s in series if label in s})
        if values:
            out[v["name"]] = values[0]
    return out


def grafana(expr: str, values: dict[str, str]) -> str:
    """A panel's query with Grafana's variables filled in: the rate interval for 1 s scrapes
    (4 scrape intervals, as Grafana's $__rate_interval), the dashboard's variables."""
    expr = expr.replace("$__rate_interval", "5s").replace("$__interval", "1s").replace("$__range", "5m")
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


def test_prometheus_scrapes_a_daemon_over_kafka_and_every_dashboard_panel_returns_data(tmp_path, receiver):
    broker = KafkaBroker().start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prom = Prometheus([f"127.0.0.1:{port}"], rule_files=(REPO / "deploy" / "prometheus" / "rules.yml",)).start()
    env = FAST | {"FLEETWATCH_FLEET__SPEED": "1", "FLEETWATCH_FLEET__FAULT_INTERVAL_S": "3",
                  "FLEETWATCH_KAFKA__TOPIC_PREFIX": f"o{uuid.uuid4().hex[:6]}.", "FLEETWATCH_KAFKA__PARTITIONS": "3",
                  "FLEETWATCH_DETECT__SITE_POWER_CAP_W": "500000", "FLEETWATCH_ALERTS__WEBHOOKS": receiver.url}
    gpus = 2 * 8 * 8  # FAST: 2 racks of 8 nodes of 8 GPUs, one scrape a second at speed 1
    p = start(tmp_path, "--kafka", broker.bootstrap, "--http", f"127.0.0.1:{port}", env=env)
    empty: list[str] = []
    try:
        wait_for(lambda: http_get(f"{url}/readyz")[0] == 200 or p.poll() is not None, timeout=180)
        assert p.poll() is None, p.communicate()[1][-3000:]

        def up() -> bool:
            return any(t["health"] == "up" for t in prom.api("targets")["activeTargets"])
        wait_for(up, timeout=60)
        # The ingest rate: what the simulator makes, read by detect (PromQL as the dashboard asks it).
        rate = 'sum(rate(fleetwatch_samples_ingested_total{role="detect",dataset="gpu_samples"}[10s]))'

        def ingesting() -> bool:
            return bool(prom.query(f"{rate} > 0")) and bool(prom.query("fleetwatch_up offset 10s"))
        wait_for(ingesting, timeout=120)
        # (the first 10 s after start may hold the backlog the roles caught up on under load: 167/s for 128 once)
        seen: list[float] = []

        def steady() -> bool:
            seen.append(float(prom.query(rate)[0]["value"][1]))
            return 0.7 * gpus < seen[-1] < 1.3 * gpus
        wait_for(steady, timeout=60)
        # The firing alerts: the injected faults' alerts and the Watchdog, as detect counts them.
        wait_for(lambda: prom.query('sum(fleetwatch_alerts_firing{alertname!~"Fleetwatch.*"}) > 0'), timeout=120)
        assert [r["value"][1] for r in prom.query('fleetwatch_alerts_firing{alertname="FleetwatchWatchdog"}')] \
            == ["1"]
        firing = {r["metric"]["alertname"] for r in prom.query("fleetwatch_alerts_firing > 0")}
        told = {json.loads(x)["labels"]["alertname"] for x in (tmp_path / "data" / "alerts.jsonl").read_text()
                .splitlines() if json.loads(x)["status"] == "firing"}
        assert firing <= told | {"FleetwatchWatchdog"} and "FleetwatchWatchdog" in told
        assert prom.query("sum(fleetwatch_consumer_lag_messages) >= 0")  # Kafka's lag, per group and partition

        # Every panel of every dashboard returns data (Grafana's variables filled in).
        checked: list[str] = []

        def panels_empty() -> list[str]:
            out = []
            checked.clear()
            for path in DASHBOARDS:
                d = json.loads(path.read_text())
                values = variables(prom, d)
                for panel in panels(d):
                    for t in panel.get("targets", []):
                        expr = grafana(t["expr"], values)
                        checked.append(expr)
                        if not prom.query(expr):
                            out.append(f"{path.name}: {panel['title']}: {expr}")
            return out
        deadline = time.monotonic() + 90
        while (empty := panels_empty()) and time.monotonic() < deadline:
            time.sleep(2)
        # The shipped rules about Fleetwatch evaluate on its real /metrics, and none fires on a healthy daemon
        rules = [r for g in prom.api("rules", type="alert")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {a.name for a in RULE_ALERTS}
        assert [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
        assert [r["name"] for r in rules if r["state"] == "firing"] == []
        # Kafka away: not ready (and saying why), still alive; back: ready again.
        broker.stop()
        wait_for(lambda: "Kafka is unreachable" in http_get(f"{url}/readyz")[1], timeout=60)
        assert http_get(f"{url}/healthz") == (200, "alive\n")
        broker.start()
        wait_for(lambda: http_get(f"{url}/readyz")[0] == 200, timeout=120)
        stop(p)
    finally:
        p.kill()
        prom.close()
        broker.close()
    print(f"Prometheus: detect ingests {seen[-1]:.0f} GPU samples/s ({gpus} expected), alerts firing {sorted(firing)}; "
          f"{len(checked)} panel queries of {len(DASHBOARDS)} dashboards, {len(empty)} without data")
    assert len(DASHBOARDS) == 3 and len(checked) >= 20
    assert not empty, "dashboard panels without data:\n" + "\n".join(empty)

