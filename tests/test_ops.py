"""Watch the watcher (issue 13): the process's /metrics, /healthz and /readyz, its health on an
injected clock, its alerts about itself and systemd's notifications over a real socket.
End-to-end runs with a real Prometheus are in tests/e2e/test_ops.py."""

from __future__ import annotations

import asyncio
import re
import socket

import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.bus import MemoryBus, Message, Topic
from pipeline.bus.intake import split
from pipeline.config import ConfigError
from pipeline.detect.catalog import ALERTS_BY_NAME
from pipeline.model import alert_rows
from pipeline.ops.health import ARCHIVE_FLUSH, CONSUMER_LAG, SAMPLES, Health, RoleInfo
from pipeline.ops.progress import Progress
from pipeline.ops.sdnotify import SdNotify
from pipeline.ops.selfalerts import STALLED, WATCHDOG, SelfAlerts, message
from tests import conftest
from tests.conftest import REPO
from tests.helpers import http_get
from tests.services import free_port


class Clock:
    """An injected monotonic clock: time moves only when the test says."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def gpu_batch(ts_ns: int, n: int = 4) -> pa.RecordBatch:
    from pipeline.sources.simulate import FleetSimulator
    sim = FleetSimulator(conftest.make_config(fleet={"racks": 1, "nodes_per_rack": 1, "gpus_per_node": n}).fleet)
    batch = sim.step().gpu
    return batch.set_column(0, "ts", pa.array([ts_ns] * batch.num_rows, batch.schema.field("ts").type))


def families(text: str) -> dict[str, list]:
    """Parsed back with prometheus_client's parser: metric name (a counter's with `_total`, as
    exposed) -> its samples; a histogram's `_created` timestamps stay with the histogram."""
    out: dict[str, list] = {}
    for f in text_string_to_metric_families(text):
        name = f.name + "_total" if f.type == "counter" else f.name.removesuffix("_created")
        out.setdefault(name, []).extend(f.samples)
    return out


# ---- systemd's notifications, over a real AF_UNIX datagram socket ----------------------------

@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    yield path, s
    s.close()


def test_sd_notify_sends_ready_watchdog_and_stopping_as_datagrams(notify_socket):
    path, server = notify_socket
    sd = SdNotify({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000"})
    assert sd.enabled and sd.watchdog_interval_s == 15.0  # half of WatchdogSec=30s
    assert sd.ready("warmed up")
    assert server.recv(4096) == b"READY=1\nSTATUS=warmed up"
    assert sd.watchdog() and server.recv(4096) == b"WATCHDOG=1"
    assert sd.stopping() and server.recv(4096) == b"STOPPING=1"


def test_sd_notify_abstract_socket_and_watchdog_interval():
    name = f"fleetwatch-test-{free_port()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(5)
    try:
        sd = SdNotify({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000"})
        assert sd.watchdog_interval_s == 2.0
        assert sd.watchdog() and server.recv(100) == b"WATCHDOG=1"
    finally:
        server.close()
    # another process's watchdog (WATCHDOG_PID) is not ours: the default interval
    assert SdNotify({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval_s == 15


def test_sd_notify_without_the_socket_sends_nothing_and_a_gone_socket_is_no_error(tmp_path):
    assert not SdNotify({}).enabled and not SdNotify({}).ready()
    assert not SdNotify({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).watchdog()


# ---- health on an injected clock -----------------------------------------------------------

def health_of(*roles: RoleInfo, stall_intervals: int = 5, in_process: bool = True) -> tuple[Health, Progress, Clock]:
    clock = Clock()
    progress = Progress(clock)
    h = Health(progress, stall_intervals, clock, in_process=in_process)
    for r in roles:
        progress.role(r.name, r.consumer)
    h.attach(list(roles))
    return h, progress, clock


def test_a_source_is_ready_after_its_first_publish_and_stalls_without_samples():
    async def go():
        h, progress, clock = health_of(RoleInfo("simulate", False, 0.05))
        assert h.unready(clock()) == ["role simulate: no successful publish yet"] and not h.unlive(clock())
        published = []

        async def emit(topic, batch):
            published.append(batch)
        emit = progress.emitter("simulate", emit)
        await emit(Topic.GPU, gpu_batch(1_800_000_000_000_000_000))
        assert published and h.unready(clock()) == [] and h.unlive(clock()) == []
        p = progress.roles["simulate"]
        assert p.rows == {"gpu_samples": 4} and p.values == 4 * 20 and p.newest_ns["gpu_samples"] == 1.8e18
        clock.advance(5.0)  # the window: 5 intervals of at least 1 s
        assert h.stalls(clock()) == {} and not h.unlive(clock())
        clock.advance(0.5)
        assert h.stalls(clock()) == {("simulate", SAMPLES): "no samples published for 6 s"}
        assert h.unlive(clock()) == ["role simulate: no samples published for 6 s"]
        assert h.unready(clock()) == ["role simulate: no samples published for 6 s"]
        await emit(Topic.GPU, gpu_batch(1_800_000_001_000_000_000))
        assert h.stalls(clock()) == {} and h.unready(clock()) == []
    asyncio.run(go())


def test_a_source_held_up_by_the_bus_is_not_hung():
    async def go():
        h, progress, clock = health_of(RoleInfo("simulate", False, 1.0))
        full = asyncio.Event()

        async def emit(topic, batch):  # a bus whose queue is full until the test frees it
            await full.wait()
        emit = progress.emitter("simulate", emit)
        blocked = asyncio.create_task(emit(Topic.GPU, gpu_batch(1_800_000_000_000_000_000)))
        await asyncio.sleep(0)
        clock.advance(60)
        h.loop_beat = clock()
        assert h.unlive(clock()) == [] and h.stalls(clock()) == {}  # backpressure, not a stopped loop
        full.set()
        await blocked
        assert progress.roles["simulate"].first == clock() and h.unready(clock()) == []
    asyncio.run(go())


def test_a_source_waiting_for_an_unreachable_broker_is_not_ready_but_not_hung():
    h, progress, clock = health_of(RoleInfo("facility", False, 1.0, deps=("mqtt",)))
    progress.roles["facility"].first = clock()
    progress.deps["mqtt"] = False
    clock.advance(60)
    h.loop_beat = clock()  # the event loop turns (the monitor's tick)
    assert h.unlive(clock()) == [] and h.stalls(clock()) == {}
    assert h.unready(clock()) == ["the MQTT broker is unreachable"]
    progress.deps["mqtt"] = True
    assert h.unready(clock()) == h.unlive(clock()) == ["role facility: no samples published for 60 s"]


def test_a_quiet_source_paced_by_others_stalls_but_is_not_dead():
    """A BMS that reports on change, or every minute: the facility collector publishes nothing for
    its window, with its MQTT link up. It had failed /healthz (a restart loop on Kubernetes, a
    watchdog kill under systemd) where only a stall can be said: a restart makes no BMS send."""
    from pipeline.ops.health import PACED_WINDOW_S
    h, progress, clock = health_of(RoleInfo("facility", False, 1.0, deps=("mqtt",), paced=True))
    progress.roles["facility"].first = clock()
    progress.deps["mqtt"] = True
    clock.advance(60)
    h.loop_beat = clock()
    # A minute between readings is no stall either (10 s had flapped FleetwatchStalled at each reading)
    assert h.unlive(clock()) == [] and h.unready(clock()) == [] and h.stalls(clock()) == {}
    clock.advance(PACED_WINDOW_S)
    h.loop_beat = clock()
    assert h.unlive(clock()) == [] and h.stalls(clock()) == {("facility", SAMPLES): "no samples published for 660 s"}


def test_a_source_paced_by_others_is_ready_before_it_publishes_while_its_broker_is_reached():
    """The facility collector publishes when the BMS sends: ready only after its first publish, it held
    up a compose stack whose simulator (the BMS there) waited for it to be healthy, for good. Ready
    once its broker is reached; not while it is unreachable."""
    h, progress, clock = health_of(RoleInfo("facility", False, 1.0, deps=("mqtt",), paced=True))
    h.warmed = True
    assert h.unready(clock()) == ["the MQTT broker is unreachable"]
    progress.deps["mqtt"] = True
    assert h.unready(clock()) == [] and h.unlive(clock()) == []


def test_the_facility_and_dcgm_roles_are_attached_as_paced_by_others(tmp_path):
    from pipeline.daemon import Running
    from pipeline.ops.monitor import Operations
    from pipeline.roles import COLLECTOR, SOURCE
    from pipeline.roles.context import Context
    from pipeline.sinks.console import Console
    cfg = conftest.make_config(data_dir=str(tmp_path / "data"))
    roles = frozenset({"facility", "dcgm", "simulate"})
    ctx = Context(cfg, roles, MemoryBus(), asyncio.Event(), Console())
    ops = Operations(cfg, roles)
    ops.attach(ctx, [Running(name, stage, object()) for name, stage in
                     (("facility", COLLECTOR), ("dcgm", SOURCE), ("simulate", SOURCE))])
    assert {r.name: r.paced for r in ops.health.roles} == {"facility": True, "dcgm": True, "simulate": False}


def test_a_consumer_with_input_waiting_unread_stalls_one_without_input_is_idle():
    async def go():
        bus = MemoryBus()
        sub = bus.subscribe([Topic.GPU], "detect")
        h, progress, clock = health_of(RoleInfo("detect", True, 0.0))

        class Pass:
            async def screen(self, messages):
                return messages
        reader = progress.reader("detect", Pass(), sub)
        assert h.unready(clock()) == []  # in-process reads cannot fail: ready without a first read
        clock.advance(100)
        assert h.stalls(clock()) == {}  # nothing waits: idle, not stalled
        await bus.publish(conftest_message(gpu_batch(1_800_000_000_000_000_000)))
        assert h.stalls(clock()) == {("detect", CONSUMER_LAG): "1 messages wait unread, nothing read for 100 s"}
        h.loop_beat = clock()
        assert h.unlive(clock()) == []  # stalled, not dead: a full disk under notify is no reason to restart
        await reader.screen(await sub.get_batch())
        assert h.stalls(clock()) == {} and progress.roles["detect"].rows == {"gpu_samples": 4}
        assert "r01-n01" in progress.fleet.gpu  # detect keeps the latest GPU batch per node for /metrics
    asyncio.run(go())


def conftest_message(batch):
    from pipeline.bus import Message
    return Message(Topic.GPU, batch)


def test_kafka_consumer_lag_growing_at_every_check_is_a_stall():
    h, progress, clock = health_of(RoleInfo("archive", True, 0.0, deps=("kafka",)), stall_intervals=3,
                                   in_process=False)

    class KafkaSub:  # what Health reads of a Kafka subscription: its group
        group = "archive"
    progress.roles["archive"].sub = KafkaSub()
    progress.roles["archive"].first = clock()
    progress.deps["kafka"] = True
    for lag in (5, 9, 9, 12):  # not growing at every check
        progress.lag = {("archive", "fleetwatch.gpu", 0): lag, ("archive", "fleetwatch.gpu", 1): 0}
        h.sample_backlogs()
    assert h.stalls(clock()) == {}
    for lag in (20, 30):
        progress.lag = {("archive", "fleetwatch.gpu", 0): lag}
        h.sample_backlogs()
    assert h.stalls(clock()) == {("archive", CONSUMER_LAG): "consumer lag grew at each of the last 3 checks, to 30 "
                                                            "messages"}
    assert h.unlive(clock()) == []  # falling behind is no reason to restart
    progress.deps["kafka"] = False
    assert h.unready(clock()) == ["Kafka is unreachable"]


def test_an_archive_holding_rows_it_does_not_flush_stalls_unless_its_outage_alert_says_why(tmp_path):
    from pipeline.sinks.archive_outage import ArchiveOutage
    from pipeline.sinks.parquet import ArchiveWriter
    h, progress, clock = health_of(RoleInfo("archive", True, 0.0), stall_intervals=3)
    w = ArchiveWriter(tmp_path / "archive")
    w.outage = ArchiveOutage("site-a", "", 30.0)
    h.archive, h.flush_interval_s = w, 2.0
    w.last_durable = clock()
    clock.advance(100)
    assert h.stalls(clock()) == {}  # nothing held
    w.add("gpu_samples", gpu_batch(1_800_000_000_000_000_000))
    assert h.stalls(clock()) == {("archive", ARCHIVE_FLUSH): "4 rows held, nothing made durable for 100 s"}
    w.outage.failed(OSError(28, "No space left on device"), 4)
    assert h.stalls(clock()) == {}


def test_not_ready_while_warming_up_or_stopping_and_not_live_when_the_loop_stops():
    clock = Clock()
    h = Health(Progress(clock), 5, clock)
    assert h.unready(clock()) == ["starting: building the roles (detect compiles its kernels)"]
    assert h.unlive(clock()) == []
    clock.advance(11)
    assert h.unlive(clock()) == ["the event loop has not turned for 11 s"]
    h.loop_beat = clock()
    h.attach([])
    assert h.unready(clock()) == []
    h.stopping = True
    assert h.unready(clock()) == ["stopping"]


# ---- alerts about itself ---------------------------------------------------------------------

def test_watchdog_fires_while_healthy_and_resolves_after_resolve_after_unhealthy_checks():
    wall = Clock(1_800_000_000.0)
    a = SelfAlerts("site-a", "host:9410", "", watchdog=True, resolve_after=3, wall=wall)
    assert a.update(healthy=False, stalls={}) == []
    (fired,) = a.update(healthy=True, stalls={})
    spec = ALERTS_BY_NAME[WATCHDOG]
    assert fired.labels == {"alertname": WATCHDOG, "severity": "none", "site": "site-a", "instance": "host:9410"}
    assert fired.status == "firing" and fired.annotations["summary"] == spec.summary.format(instance="host:9410")
    assert fired.annotations["runbook_url"].endswith("/FleetwatchWatchdog.md")
    assert a.update(healthy=True, stalls={}) == []  # fires once, notify keeps it alive at the receivers
    assert a.update(healthy=False, stalls={}) == [] and a.update(healthy=False, stalls={}) == []
    (resolved,) = a.update(healthy=False, stalls={})
    assert resolved.status == "resolved" and resolved.fingerprint == fired.fingerprint
    assert a.update(healthy=True, stalls={})[0].status == "firing"  # healthy again: fires again


def test_stalled_fires_per_role_and_what_and_resolves_when_it_moves_and_at_the_stop():
    a = SelfAlerts("site-a", "host/42", "https://wiki/runbooks/", watchdog=True, resolve_after=1)
    a.update(healthy=True, stalls={})
    changes = a.update(healthy=True, stalls={("agent", SAMPLES): "no samples published for 12 s"})
    assert [(c.alertname, c.status) for c in changes] == [(STALLED, "firing"), (WATCHDOG, "resolved")]
    stalled = changes[0]
    assert stalled.labels == {"alertname": STALLED, "severity": "critical", "site": "site-a", "instance": "host/42",
                              "role": "agent", "stalled": "samples"}
    assert stalled.annotations["summary"] == "Fleetwatch agent on host/42 stalled: no samples published for 12 s"
    assert stalled.annotations["runbook_url"] == "https://wiki/runbooks/FleetwatchStalled.md"
    assert stalled.evidence == {"role": "agent", "detail": "no samples published for 12 s"}
    assert stalled.annotations["description"] == (ALERTS_BY_NAME[STALLED].action +
                                                  " Evidence (progress): role=agent, detail=no samples published for 12 s.")
    assert (stalled.detector, stalled.score) == ("progress", 1.0)
    assert a.update(healthy=True, stalls={("agent", SAMPLES): "no samples published for 13 s"}) == []
    changes = a.update(healthy=True, stalls={})
    assert [(c.alertname, c.status) for c in changes] == [(STALLED, "resolved"), (WATCHDOG, "firing")]
    assert [(c.alertname, c.status) for c in a.resolve_all()] == [(WATCHDOG, "resolved")]
    assert a.firing == {}


def test_self_alerts_travel_as_valid_alert_messages():
    a = SelfAlerts("site-a", "host:9410", "", watchdog=True, resolve_after=1)
    alerts = a.update(healthy=True, stalls={("archive", ARCHIVE_FLUSH): "10 rows held"})
    for alert in alerts:
        m = message(alert)
        assert m.topic == Topic.ALERTS and m.key == alert.fingerprint
        valid, rejected = split(Topic.ALERTS, m.value)
        assert rejected == [] and valid.num_rows == 1  # intake lets it through to notify and the archive
        (row,) = alert_rows(m.value)
        assert row["labels"] == alert.labels and row["status"] == "firing"


def test_a_process_without_detect_raises_no_watchdog():
    a = SelfAlerts("site-a", "node-7:9400", "", watchdog=False, resolve_after=1)
    assert a.update(healthy=True, stalls={}) == []


# ---- the whole process: /metrics, /healthz, /readyz of an in-process run ---------------------

def documented_metrics(roles: set[str]) -> dict[str, str]:
    """docs/operations.md's metric table: name -> type, of the metrics a process of `roles`
    serves (a row whose meaning ends in "(agent)" or "(dcgm)" is that role's only)."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    out = {}
    for m in re.finditer(r"^\| `(fleetwatch_\w+)` \| (\w+) \|.*\|([^|]*)\|$", section, re.M):
        only = re.search(r"\((agent|dcgm)\)\s*$", m.group(3))
        if only is None or only.group(1) in roles:
            out[m.group(1)] = m.group(2)
    return out


def test_an_in_process_run_serves_every_documented_metric_with_its_labels(tmp_path):
    from pipeline.daemon import run_daemon
    port = free_port()
    cfg = conftest.make_config(data_dir=str(tmp_path / "data"), fleet={"racks": 2, "speed": 20.0,
                                                                      "fault_interval_s": 2.0},
                               archive={"flush_interval_s": 0.5}, detect={"site_power_cap_w": 500_000.0},
                               alerts={"console": False, "webhooks": ["http://127.0.0.1:9/hook"]},
                               daemon={"http": f"127.0.0.1:{port}"})
    url = f"http://127.0.0.1:{port}"
    seen: dict[str, tuple[int, str]] = {}

    async def go():
        run = asyncio.create_task(run_daemon(cfg, duration_s=8))
        while "ready" not in seen:
            await asyncio.sleep(0.2)
            status, body = await asyncio.to_thread(http_get, f"{url}/readyz")
            if status == 200:
                seen["ready"] = (status, body)
                await asyncio.sleep(2.5)  # an archive flush, a few detect batches
                for path in ("metrics", "healthz", "index"):
                    seen[path] = await asyncio.to_thread(http_get, f"{url}/{'' if path == 'index' else path}")
            assert not run.done(), run.exception() if run.done() else ""
        return await run
    summary = asyncio.run(go())
    assert summary.gpu_samples > 0
    assert seen["healthz"] == (200, "alive\n") and seen["ready"] == (200, "ready\n")
    assert "/metrics" in seen["index"][1]
    got = families(seen["metrics"][1])
    doc = documented_metrics({"simulate", "detect", "archive", "notify"})
    ours = {name for name in got if name.startswith("fleetwatch_")}
    # Kafka's consumer lag has no in-process counterpart; everything else is there, and nothing undocumented.
    assert ours == set(doc) - {"fleetwatch_consumer_lag_messages"}, (ours ^ set(doc))
    for name, samples in got.items():
        if name in doc:
            suffixes = {"counter": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
                        "gauge": ("",)}[doc[name]]
            assert samples and all(s.name in {name + x for x in suffixes} for s in samples), name

    def value(name: str, **labels) -> float:
        return sum(s.value for s in got[name] if s.name in (name, name + "_total")
                   and all(s.labels.get(k) == v for k, v in labels.items()))
    roles = {s.labels["role"]: s.value for s in got["fleetwatch_up"]}
    assert roles == {"simulate": 1, "detect": 1, "power": 1, "remediate": 1, "archive": 1, "notify": 1}
    assert value("fleetwatch_samples_ingested_total", role="detect", dataset="gpu_samples") > 0
    assert value("fleetwatch_samples_ingested_total", role="simulate", dataset="gpu_samples") >= \
        value("fleetwatch_samples_ingested_total", role="detect", dataset="gpu_samples")
    assert value("fleetwatch_values_ingested_total", role="detect") >= 20 * value(
        "fleetwatch_samples_ingested_total", role="detect", dataset="gpu_samples")
    assert value("fleetwatch_archive_rows_written_total", dataset="gpu_samples") > 0
    assert value("fleetwatch_archive_files_written_total", dataset="gpu_samples") >= 1
    assert sum(s.value for s in got["fleetwatch_detect_batch_duration_seconds"]
               if s.name.endswith("_count") and s.labels["topic"] == "fleetwatch.gpu") > 0
    assert {s.labels["receiver"] for s in got["fleetwatch_outbox_pending"]} == {"webhook-1"}
    assert {s.labels["state"] for s in got["fleetwatch_nodes"]} == {"healthy", "suspect", "failing"}
    assert value("fleetwatch_nodes") == 16
    assert value("fleetwatch_alerts_firing", alertname="FleetwatchWatchdog", severity="none") == 1
    assert {s.labels["reason"] for s in got["fleetwatch_dead_letters_total"]} >= {"null_field", "too_old", "time_ahead"}
    temps = got["fleetwatch_gpu_temperature_celsius"]
    assert len({s.labels["UUID"] for s in temps}) == len(temps) >= 127  # each GPU once (one may be off the bus)
    assert set(temps[0].labels) == {"site", "rack", "node", "gpu", "UUID"}
    assert {s.labels["rack"] for s in got["fleetwatch_rack_power_watts"]} == {"r01", "r02"}
    assert value("fleetwatch_rack_power_rating_watts", rack="r01") == cfg.fleet.pdu_rating_w
    assert value("fleetwatch_site_power_cap_watts", site="site-a") == 500_000.0
    assert 0 < value("fleetwatch_site_power_watts", site="site-a")
    lag = value("fleetwatch_event_time_lag_seconds", role="detect", dataset="gpu_samples")
    assert -5 < lag < 30  # against the simulator's own clock


def test_over_kafka_each_node_of_a_rack_shows_in_the_per_gpu_metrics():
    """An agent's messages are keyed by rack: the fleet view had kept one batch per key, so each
    node's scrape replaced the one before and the per-GPU panels showed one node of each rack."""
    from pipeline.bus import keys
    from pipeline.ops.progress import FleetView
    from pipeline.sources.simulate import FleetSimulator
    gpu = FleetSimulator(conftest.make_config(fleet={"racks": 1, "nodes_per_rack": 3}).fleet).step().gpu
    view = FleetView(lambda: 0.0)
    for node in ("r01-n01", "r01-n02", "r01-n03"):
        scrape = gpu.filter(pa.compute.equal(gpu.column("node"), node))  # one agent's
        [message] = keys.messages(Topic.GPU, scrape, keyed=True, partitions=12)
        assert message.key == "r01"
        view.seen(message)
    assert sorted(b.column("node")[0].as_py() for b in view.gpu_batches()) == ["r01-n01", "r01-n02", "r01-n03"]
    # A DCGM batch holds the targets that answered, a different set each time: each node keeps its latest.
    view = FleetView(lambda: 0.0)
    for nodes in (["r01-n01", "r01-n02", "r01-n03"], ["r01-n01", "r01-n03"], ["r01-n03", "r01-n02"]):
        view.seen(Message(Topic.GPU, gpu.filter(pa.compute.is_in(gpu.column("node"), pa.array(nodes)))))
    assert sorted(b.column("node")[0].as_py() for b in view.gpu_batches()) == ["r01-n01", "r01-n02", "r01-n03"]
    assert sum(b.num_rows for b in view.gpu_batches()) == gpu.num_rows  # one scrape per node kept, no more


def test_the_http_address_is_checked_and_a_taken_port_is_a_config_error(tmp_path):
    from pipeline.ops.http import HttpServer
    from pipeline.ops.metrics import registry
    from pipeline.preflight import validate
    for wrong in ("http://0.0.0.0:9410", "0.0.0.0:99999", "0.0.0.0:"):
        cfg = conftest.make_config(data_dir=str(tmp_path), daemon={"http": wrong})
        with pytest.raises(ConfigError, match=f"daemon.http = '{re.escape(wrong)}': expected HOST:PORT"):
            validate(cfg, frozenset({"simulate", "detect", "power", "remediate", "archive", "notify"}))

    async def taken():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            server = HttpServer(f"127.0.0.1:{s.getsockname()[1]}", registry(list), list, list)
            with pytest.raises(ConfigError, match="daemon.http = .*cannot listen there"):
                await server.start()
    asyncio.run(taken())


def test_a_slow_client_holds_no_connection_or_route_for_long():
    """Slowloris: headers sent a byte at a time never end in a request, and a route's body that
    stops arriving holds its handler; both are cut off (`idle_s`, `body_deadline_s`), and the
    server goes on answering."""
    from pipeline.ops.http import HttpServer
    from pipeline.ops.metrics import registry
    port = free_port()

    async def go():
        server = HttpServer(f"127.0.0.1:{port}", registry(list), list, list, idle_s=0.5, body_deadline_s=0.5)
        await server.start()

        async def route(body: bytes):
            return 200, {"bytes": len(body)}
        server.routes = {("POST", "/x"): route}
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            headers_closed = False
            for _ in range(300):  # a header line every 0.1 s, for up to 30 s
                await asyncio.sleep(0.1)
                if reader.at_eof() or writer.is_closing():
                    headers_closed = True
                    break
                try:
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                except ConnectionError:
                    headers_closed = True
                    break
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            await writer.drain()
            stalled_body = await asyncio.wait_for(reader.read(4096), 30)
            writer.close()
            fine = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/healthz")
        finally:
            await server.close()
        return headers_closed, stalled_body.decode(), fine
    headers_closed, stalled_body, fine = asyncio.run(go())
    assert headers_closed
    assert stalled_body.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in stalled_body
    assert fine[0] == 200


def test_every_role_and_run_take_http_and_eval_and_replay_do_not():
    from pipeline.cli import _parser
    from pipeline.roles import ROLES
    for command in ("run", *ROLES):
        extra = ["--dcgm-targets", "h:9400"] if command == "dcgm" else []
        assert _parser().parse_args([command, "--http", "0.0.0.0:9410", *extra]).http == "0.0.0.0:9410"
    for command in (["eval", "--duration", "1"], ["replay", "x.csv", "--out", "y.csv"]):
        with pytest.raises(SystemExit):
            _parser().parse_args([*command, "--http", "0.0.0.0:9410"])


# ---- the monitor: one process's roles, a real in-process bus, an injected clock -------------

class Stepped:
    """A real Source that publishes one GPU batch each time the test says `step()`."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.ts = 1_800_000_000_000_000_000

    def step(self) -> None:
        self.go.set()

    async def run(self, emit, stop) -> None:
        while not stop.is_set():
            await self.go.wait()
            self.go.clear()
            self.ts += 1_000_000_000
            await emit(Topic.GPU, gpu_batch(self.ts))

    def stats(self) -> dict[str, int]:
        return {}

    def describe(self) -> str:
        return "stepped"


def test_the_monitor_raises_stalled_on_the_alerts_topic_and_tells_systemd(tmp_path, notify_socket):
    """A process whose roles write the alerts topic (here remediate's) publishes its stalls there;
    a source alone does not (its user needs no right to write alerts: bus/acls.py), and shows
    them on its /metrics."""
    from pipeline.daemon import Running
    from pipeline.model import alert_rows
    from prometheus_client import generate_latest

    from pipeline.ops.metrics import registry
    from pipeline.ops.monitor import Operations
    from pipeline.roles import SOURCE
    from pipeline.roles.context import Context
    from pipeline.sinks.console import Console
    path, systemd = notify_socket

    def datagrams() -> list[bytes]:
        out = []
        systemd.setblocking(False)
        try:
            while True:
                out.append(systemd.recv(4096))
        except BlockingIOError:
            return out
        finally:
            systemd.setblocking(True)

    async def go():
        clock = Clock()
        roles = frozenset({"simulate", "remediate"})
        cfg = conftest.make_config(data_dir=str(tmp_path / "data"), daemon={"stall_intervals": 3})
        bus, stop = MemoryBus(), asyncio.Event()
        alerts = bus.subscribe([Topic.ALERTS], "notify")
        ctx = Context(cfg, roles, bus, stop, Console())
        ctx.progress = Progress(clock)
        ops = Operations(cfg, roles, clock=clock, env={"NOTIFY_SOCKET": str(path)})
        source = Stepped()
        ctx.sources["simulate"] = source
        r = Running("simulate", SOURCE, source, stop)
        r.task = asyncio.create_task(source.run(ctx.emitter("simulate"), stop))
        ops.attach(ctx, [r])

        async def tick(advance: float = 0.0, step: bool = False) -> list[dict]:
            clock.advance(advance)
            if step:
                source.step()
                for _ in range(5):
                    await asyncio.sleep(0)
            await ops.tick()
            await asyncio.sleep(0.05)
            got = []
            while batch := await alerts.get_batch(timeout_s=0.05):
                got += [a for m in batch for a in alert_rows(m.value)]
            return got
        assert await tick() == [] and datagrams() == [b"WATCHDOG=1"]  # alive, not ready: no first publish
        assert await tick(1.0, step=True) == [] and datagrams() == [b"READY=1"]
        assert await tick(2.0, step=True) == []
        (stalled,) = await tick(3.5)  # 3 intervals of 1 s (fleet.sample_interval_s at speed 1) and more
        assert stalled["status"] == "firing" and stalled["labels"]["alertname"] == "FleetwatchStalled"
        assert stalled["labels"]["role"] == "simulate" and stalled["labels"]["stalled"] == "samples"
        assert stalled["labels"]["instance"] == ops.instance and "stalled: no samples" in \
            stalled["annotations"]["summary"]
        assert await tick(12.0) == [] and datagrams() == []  # not live: no WATCHDOG=1 (systemd restarts it)
        (resolved,) = await tick(1.0, step=True)
        assert resolved["status"] == "resolved" and resolved["fingerprint"] == stalled["fingerprint"]
        assert datagrams() == [b"WATCHDOG=1"]  # live again
        assert ops.health.unready(clock()) == []
        source_alone = Operations(cfg, frozenset({"simulate"}), clock=clock)
        source_alone.attach(ctx, [r])
        clock.advance(4.0)
        await source_alone.tick()
        await asyncio.sleep(0.05)
        assert not await alerts.get_batch(timeout_s=0.05)
        assert [a.alertname for a in source_alone.alerts.firing.values()] == ["FleetwatchStalled"]
        exposed = generate_latest(registry(lambda: source_alone._collectors)).decode()
        assert 'fleetwatch_alerts_firing{alertname="FleetwatchStalled",severity="critical"} 1.0' in exposed
        # The facility collector's stall goes out all the same: no other alert tells of facility data that stopped.
        assert [Operations(cfg, frozenset({r})).publishes for r in ("agent", "dcgm", "facility")] == [False, False, True]
        await ops.stopping()
        assert datagrams() == [b"STOPPING=1"] and ops.health.unready(clock()) == ["stopping"]
        stop.set()
        source.step()
        await r.task
        await ops.close()
    asyncio.run(go())


def test_a_slow_health_check_of_kafka_keeps_the_beat_and_the_watchdog(tmp_path, notify_socket):
    """Kafka's reachability and lag are asked one broker and partition after another, 1 s each: in
    a brownout the check took 12 s, the loop's beat was older than LOOP_LIVE_S, /healthz said the
    loop had stopped and systemd's watchdog killed the daemon (its archive buffer with it)."""
    from pipeline.ops.monitor import Operations
    from pipeline.roles.context import Context
    from pipeline.sinks.console import Console
    path, systemd = notify_socket

    class Brownout:  # Kafka as the monitor sees it: each of its answers slow, then in time again
        slow = {"reachable", "lag"}

        async def reachable(self) -> bool:
            if "reachable" in self.slow:
                await asyncio.sleep(3600)
            return True

        async def lag(self) -> dict:
            if "lag" in self.slow:
                await asyncio.sleep(3600)
            return {("detect", "fleetwatch.gpu", 0): 7}

    async def go():
        clock = Clock()
        cfg = conftest.make_config(data_dir=str(tmp_path / "data"))
        kafka = Brownout()
        ctx = Context(cfg, frozenset({"simulate"}), kafka, asyncio.Event(), Console())
        ctx.progress = Progress(clock)
        ops = Operations(cfg, frozenset({"simulate"}), clock=clock, env={"NOTIFY_SOCKET": str(path)})
        ops.attach(ctx, [])
        ops.sample_timeout_s = 0.2
        for _ in range(3):
            clock.advance(4.0)
            await asyncio.wait_for(ops.tick(), 5)
        assert ops.health.unlive(clock()) == [] and ctx.progress.deps["kafka"] is False
        kafka.slow = {"lag"}  # reachable in time, the lag not: reachable, the lag as it was
        await ops.tick()
        assert ctx.progress.deps["kafka"] is True and ctx.progress.lag == {}
        kafka.slow = set()
        await ops.tick()
        assert ctx.progress.lag == {("detect", "fleetwatch.gpu", 0): 7}
        systemd.setblocking(False)
        sent = []
        while True:
            try:
                sent.append(systemd.recv(4096))
            except BlockingIOError:
                break
        assert b"WATCHDOG=1" in sent
        await ops.close()
    asyncio.run(go())


def test_the_http_token_is_read_from_the_variable_or_file_named_and_a_missing_one_says_which(tmp_path):
    from pipeline.ops.monitor import Operations
    port = free_port()

    def ops(env=None, **daemon):
        cfg = conftest.make_config(data_dir=str(tmp_path / "data"), daemon={"http": f"127.0.0.1:{port}", **daemon})
        return Operations(cfg, frozenset({"power"}), env=env)
    assert ops().http._token is None  # none named: changes from this host only
    assert ops({"FW_TOKEN": "t0k"}, http_token_env="FW_TOKEN").http._token == b"t0k"
    (tmp_path / "token").write_text("from-a-file\n")
    assert ops(http_token_file=str(tmp_path / "token")).http._token == b"from-a-file"
    with pytest.raises(ConfigError, match=r"daemon\.http_token_env = 'FW_TOKEN': that environment variable is not set"):
        ops({}, http_token_env="FW_TOKEN")
    with pytest.raises(ConfigError, match=r"daemon\.http_token_file = .*: the file is empty"):
        (tmp_path / "empty").write_text("\n")
        ops(http_token_file=str(tmp_path / "empty"))
