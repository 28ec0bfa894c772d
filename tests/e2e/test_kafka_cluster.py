"""Production Kafka settings against real brokers (Apache Kafka 4.x, KRaft, the same Maven jars
as tests/e2e/test_kafka.py): a 3-broker cluster where topics get 3 replicas and
min.insync.replicas 2 by themselves and a broker killed mid-stream loses nothing, and a broker
that takes only SASL_SSL (a self-signed CA; SASL PLAIN and SCRAM-SHA-256; an authorizer)
where every role connects, topics are created once by `fleetwatch topics create`, a user
without the Create right goes on with a warning, and no password ever shows."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from pipeline.bus.kafka import KafkaBus, topic_specs
from pipeline.bus.kafka_settings import PASSWORD_ENV
from pipeline.config import load_config
from tests.conftest import fleetwatch
from tests.helpers import FAST, archived, stop_in_order
from tests.services import KafkaCluster, SecureKafkaBroker

pytestmark = pytest.mark.kafka

SUMMARY = (r"stopped after [\d.]+ s: (\d+) GPU samples published, (\d+) GPU samples, (\d+) alerts raised, "
           r"(\d+) rows archived")
ADMIN_PASSWORD, AGENT_PASSWORD = f"adm-{uuid.uuid4().hex[:12]}", f"agt-{uuid.uuid4().hex[:12]}"


def clean_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")} | FAST | extra


def start_role(role: str, cwd: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    """A role process (`fleetwatch ROLE ARGS --data-dir data`); stdout and stderr go to a file
    (`proc.log_path`) that the test can read while it runs."""
    log_path = cwd / f"{role}-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", role, *args, "--data-dir", "data"], cwd=cwd,
                                env=env, text=True, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def wait_until(predicate, timeout_s: float, what: str, procs: dict[str, subprocess.Popen] = {}) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for name, p in procs.items():
            assert p.poll() is None, f"{name} exited: {p.log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def parquet_files(data: Path, dataset: str) -> int:
    return len(list((data / "archive" / dataset).rglob("*.parquet")))


async def topic_layout(bootstrap: str, topics: list[str]) -> dict[str, dict]:
    """Each topic's partitions' leaders and replica counts, and its min.insync.replicas."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        configs = {name: {e[0]: e[1] for e in entries} for _, _, _, name, entries in response.resources}
    finally:
        await admin.close()
    return {d["topic"]: {"leaders": [p["leader"] for p in d["partitions"]],
                         "replicas": {len(p["replicas"]) for p in d["partitions"]},
                         "min_insync": configs[d["topic"]]["min.insync.replicas"]} for d in described}


def leaders(bootstrap: str, topic: str) -> set[int]:
    """The brokers leading the topic's partitions now, as the live ones tell (a request that
    lands on a dead broker: ask again)."""
    async def ask() -> set[int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            [described] = await admin.describe_topics([topic])
            return {p["leader"] for p in described["partitions"]}
        except Exception:
            return {-2}
        finally:
            await admin.close()
    return asyncio.run(ask())


# ---------------------------------------------------------------- three brokers


def test_three_brokers_replicate_and_a_broker_killed_mid_stream_loses_nothing(tmp_path):
    """A 3-node KRaft cluster: the archive creates its topics with 3 replicas and min.insync 2
    (nothing configured). The broker leading the first GPU partition is killed with SIGKILL
    while the simulator produces and the archive consumes; both go on, and every sample
    published is in the Parquet archive exactly once."""
    cluster = KafkaCluster(3).start()
    prefix = f"c{uuid.uuid4().hex[:6]}."
    env = clean_env(FLEETWATCH_KAFKA__TOPIC_PREFIX=prefix, FLEETWATCH_KAFKA__PARTITIONS="3",
                    FLEETWATCH_FLEET__SPEED="10")
    data = tmp_path / "data"
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["archive"] = start_role("archive", tmp_path, env, "--kafka", cluster.bootstrap)
        procs["simulate"] = start_role("simulate", tmp_path, env, "--kafka", cluster.bootstrap)
        wait_until(lambda: parquet_files(data, "gpu_samples") >= 3, 90, "the archive's first files", procs)
        gpu_topic = f"{prefix}fleetwatch.gpu"
        layout = asyncio.run(topic_layout(cluster.bootstrap, [gpu_topic, f"{prefix}fleetwatch.alerts",
                                                              f"{prefix}fleetwatch.power.reports"]))
        for topic, about in layout.items():
            assert about["replicas"] == {3} and about["min_insync"] == "2", (topic, about)
        victim = layout[gpu_topic]["leaders"][0]
        before = archived(data, "gpu_samples").height
        node = cluster.node(victim)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()
        killed_at = time.monotonic()
        # The cluster moves the victim's leaderships to the other two brokers and shrinks the
        # ISRs; the producer retries meanwhile (idempotent: no duplicates).
        alive = ",".join(n.bootstrap for n in cluster.nodes if n.node_id != victim)
        wait_until(lambda: not leaders(alive, gpu_topic) & {victim, -1, -2}, 60, "new leaders", procs)
        after_kill = archived(data, "gpu_samples").height
        wait_until(lambda: archived(data, "gpu_samples").height > after_kill + 3000, 90,
                   "samples archived after the broker died", procs)
        print(f"cluster: killed broker {victim}; new leaders after {time.monotonic() - killed_at:.0f} s")
        logs = stop_in_order(procs, [["simulate"], ["archive"]])
    finally:
        for p in procs.values():
            p.kill()
        cluster.close()
    published = int(re.search(SUMMARY, logs["simulate"]).group(1))
    gpu = archived(data, "gpu_samples")
    unique = gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item()
    print(f"cluster: published {published}, archived {gpu.height} ({before} before the kill), unique {unique}")
    assert 0 < before < gpu.height
    assert gpu.height == published == unique  # nothing lost, nothing twice


# ---------------------------------------------------------------- SASL_SSL


# A user of its own for each role the pipeline test runs, with exactly `fleetwatch topics acls`'s rights.
ROLE_USERS = {f"fw-{role}": f"{role[:3]}-{uuid.uuid4().hex[:12]}"
              for role in ("simulate", "detect", "archive", "notify", "nobody")}  # (nobody: granted nothing)


@pytest.fixture(scope="module")
def secure():
    broker = SecureKafkaBroker(ADMIN_PASSWORD, AGENT_PASSWORD, users=ROLE_USERS).start()
    # The agent (a source: a node's collector) may write and describe Fleetwatch's topics, nothing else.
    broker.allow("--operation", "Write", "--operation", "Describe", "--topic", "*")
    yield broker
    broker.close()


def secure_toml(broker: SecureKafkaBroker, folder: Path, user: str, **extra: str) -> Path:
    """A config file for `user` over SASL_SSL: admin with PLAIN, the others with SCRAM-SHA-256
    and their password in a file (admin's comes from the environment)."""
    lines = ["[kafka]", 'security_protocol = "SASL_SSL"', f'ssl_cafile = "{broker.tls["ca.pem"]}"',
             f'sasl_username = "{user}"']
    if user != "admin":
        (folder / f"{user}.password").write_text(broker.users[user] + "\n")
        lines += ['sasl_mechanism = "SCRAM-SHA-256"', f'sasl_password_file = "{folder / f"{user}.password"}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = folder / f"{user}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def grant(broker: SecureKafkaBroker, user: str, acls: list[dict]) -> None:
    """`fleetwatch topics acls --json`'s rights for `user`: one AclCommand a kind of right."""
    kinds: dict[tuple[str, str, str], list[str]] = {}
    for a in acls:
        kinds.setdefault((a["operation"], a["resource"], a["pattern"]), []).append(a["name"])
    for (operation, resource, pattern), names in kinds.items():
        broker.allow("--operation", operation, "--resource-pattern-type", pattern,
                     *[arg for name in names for arg in (f"--{resource}", name)], user=user)


async def write_an_alert(broker: SecureKafkaBroker, folder: Path, user: str, prefix: str) -> BaseException | None:
    """What the broker answers `user` writing to the alerts topic (None: it took it)."""
    from aiokafka import AIOKafkaProducer

    from pipeline.bus.kafka_settings import client_settings
    cfg = load_config(secure_toml(broker, folder, user), env={}, overrides={"kafka": {"bootstrap": broker.bootstrap}})
    producer = AIOKafkaProducer(**client_settings(cfg.kafka), request_timeout_ms=10000)
    await producer.start()
    try:
        await producer.send_and_wait(f"{prefix}fleetwatch.alerts", b"not an alert")
    except Exception as e:
        return e
    finally:
        await producer.stop()
    return None


def test_every_role_connects_over_sasl_ssl_and_no_password_shows(secure, tmp_path):
    """`fleetwatch topics create` (admin, PLAIN) makes the topics once; the simulator, detect,
    archive and notify each run as a user of their own (SCRAM) with exactly the rights
    `fleetwatch topics acls` prints for it, each a process, every one connecting to the SASL_SSL
    listener only. Every sample is archived exactly once, alerts reach alerts.jsonl, no role was
    refused anything, the simulator's user may not write an alert, and no password is in any
    output."""
    prefix = f"s{uuid.uuid4().hex[:6]}."
    admin_cfg = secure_toml(secure, tmp_path, "admin")
    env = clean_env(FLEETWATCH_KAFKA__TOPIC_PREFIX=prefix, FLEETWATCH_KAFKA__PARTITIONS="3")
    admin_env = env | {PASSWORD_ENV: ADMIN_PASSWORD}
    outputs = []

    created = fleetwatch("topics", "create", "--config", str(admin_cfg), "--kafka", secure.bootstrap, env=admin_env,
                         timeout=120)
    outputs.append(created.stdout + created.stderr)
    assert created.returncode == 0, created.stderr[-3000:]
    assert f"created {prefix}fleetwatch.gpu: 3 partitions, replication factor 1, min.insync.replicas 1" \
        in created.stdout
    assert created.stdout.count("created ") == len(topic_specs(3, 24))
    roles = ("simulate", "detect", "archive", "notify")
    rights = fleetwatch("topics", "acls", "--json", "--principal", "User:fw-{role}", *roles, env=env)
    assert rights.returncode == 0, rights.stderr
    for role, granted in json.loads(rights.stdout).items():
        grant(secure, f"fw-{role}", granted["acls"])

    procs = {role: start_role(role, tmp_path, env, "--config", str(secure_toml(secure, tmp_path, f"fw-{role}")),
                              "--kafka", secure.bootstrap) for role in ("detect", "archive", "notify", "simulate")}
    alerts_log = tmp_path / "data" / "alerts.jsonl"

    def detected_alerts() -> int:
        lines = alerts_log.read_text().splitlines() if alerts_log.exists() else []
        return sum(1 for a in map(json.loads, lines) if a["labels"]["alertname"] != "FleetwatchWatchdog")
    try:
        wait_until(lambda: detected_alerts() >= 1 and parquet_files(tmp_path / "data", "gpu_samples") >= 3, 150,
                   "alerts and archived samples", procs)
    finally:
        logs = stop_in_order(procs, [["simulate"], ["detect"], ["archive", "notify"]])
    outputs += logs.values()
    published = int(re.search(SUMMARY, logs["simulate"]).group(1))
    _, detected, raised, _ = map(int, re.search(SUMMARY, logs["detect"]).groups())
    gpu = archived(tmp_path / "data", "gpu_samples")
    print(f"sasl_ssl: published {published}, detected {detected}, archived {gpu.height}, alerts {raised}")
    assert published > 0 and detected == published
    assert gpu.height == published == gpu.select(pl.struct("gpu_uuid", "ts").n_unique()).item()
    assert raised >= 1 and detected_alerts() >= 1  # alerts flowed detect -> notify (exact counts: test_kafka.py)
    assert archived(tmp_path / "data", "alerts").height == len(alerts_log.read_text().splitlines())
    assert "not allowed to create" not in logs["simulate"]  # the topics were there
    for role, log in logs.items():  # (Kafka's refusals: TOPIC_/GROUP_/TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
        assert "AUTHORIZATION_FAILED" not in log.upper() and "not authorized" not in log.lower(), (role, log[-3000:])
    refused = asyncio.run(write_an_alert(secure, tmp_path, "fw-simulate", prefix))
    assert type(refused).__name__ == "TopicAuthorizationFailedError", refused

    # Run again with a longer retention: the existing topics are updated, not created.
    again = fleetwatch("topics", "create", "--config", str(admin_cfg), "--kafka", secure.bootstrap,
                       env=admin_env | {"FLEETWATCH_KAFKA__RETENTION_HOURS": "48"}, timeout=120)
    outputs.append(again.stdout + again.stderr)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"exists {prefix}fleetwatch.gpu: updated retention.ms 86400000 -> 172800000" in again.stdout
    assert "created " not in again.stdout
    for text in outputs:
        assert ADMIN_PASSWORD not in text and AGENT_PASSWORD not in text


def test_a_user_without_the_create_right_warns_once_and_goes_on(secure, tmp_path, caplog):
    """The agent may not create topics: with kafka.create_topics (the default) it says so once
    and starts anyway; with create_topics = false it never asks, and says which are missing.
    `fleetwatch topics create` as the agent fails (status 1) and says why."""
    prefix = f"a{uuid.uuid4().hex[:6]}."
    (tmp_path / "agent.password").write_text(AGENT_PASSWORD)

    async def start(create_topics: bool) -> None:
        cfg = load_config(env={}, overrides={"kafka": {
            "bootstrap": secure.bootstrap, "topic_prefix": prefix, "security_protocol": "SASL_SSL",
            "ssl_cafile": str(secure.tls["ca.pem"]), "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "agent",
            "sasl_password_file": str(tmp_path / "agent.password"), "create_topics": create_topics}})
        bus = KafkaBus.from_config(cfg.kafka)
        await bus.start()
        await bus.close()
    with caplog.at_level(logging.WARNING, logger="pipeline.bus.kafka"):
        asyncio.run(start(create_topics=True))
    warnings = [r.getMessage() for r in caplog.records if "not allowed to create" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{prefix}fleetwatch.gpu" in warnings[0] and "TOPIC_AUTHORIZATION_FAILED" in warnings[0]
    assert "fleetwatch topics create" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.bus.kafka"):
        asyncio.run(start(create_topics=False))
    assert "not allowed to create" not in caplog.text
    assert f"{prefix}fleetwatch.gpu" in caplog.text and "kafka.create_topics = false" in caplog.text
    assert AGENT_PASSWORD not in caplog.text

    agent_cfg = secure_toml(secure, tmp_path, "agent", topic_prefix=prefix)
    r = fleetwatch("topics", "create", "--config", str(agent_cfg), "--kafka", secure.bootstrap, timeout=120)
    assert r.returncode == 1 and f"not created {prefix}fleetwatch.gpu: TOPIC_AUTHORIZATION_FAILED" in r.stdout
    assert "this user may not create topics" in r.stderr and AGENT_PASSWORD not in r.stdout + r.stderr


def test_a_role_refused_a_right_ends_saying_what_to_grant(secure, tmp_path):
    """Without its rights a role had gone on doing nothing: detect's transactional producers were
    refused inside aiokafka's rebalance listener, which logs and goes on (detect waited for ever),
    and a source's every write failed, counted only (or, on a topic its user may not even see,
    its publishing hung). Each now ends (status 75: a supervisor starts it again, and once the
    rights are given it runs) naming the user and where to find what to grant."""
    prefix = f"r{uuid.uuid4().hex[:6]}."
    env = clean_env(FLEETWATCH_KAFKA__TOPIC_PREFIX=prefix, FLEETWATCH_KAFKA__PARTITIONS="3",
                    FLEETWATCH_KAFKA__CREATE_TOPICS="false")
    created = fleetwatch("topics", "create", "--config", str(secure_toml(secure, tmp_path, "admin")), "--kafka",
                         secure.bootstrap, env=env | {PASSWORD_ENV: ADMIN_PASSWORD}, timeout=120)
    assert created.returncode == 0, created.stderr[-3000:]
    rights = json.loads(fleetwatch("topics", "acls", "--json", "detect", env=env).stdout)["detect"]["acls"]
    grant(secure, "fw-detect", [a for a in rights if a["resource"] != "transactional-id"])
    detect = fleetwatch("detect", "--config", str(secure_toml(secure, tmp_path, "fw-detect")), "--kafka",
                        secure.bootstrap, "--duration", "120", "--data-dir", str(tmp_path / "d"), env=env, timeout=180)
    assert detect.returncode == 75, detect.stderr[-3000:]
    assert re.search(rf"refused user 'fw-detect' its transactional ids {re.escape(prefix)}fleetwatch\.detect(-site)?"
                     rf"-p\* \(TransactionalIdAuthorizationFailed\): grant its roles' rights, which `fleetwatch "
                     rf"topics acls ROLE` prints", detect.stderr), detect.stderr[-3000:]
    source = fleetwatch("simulate", "--config", str(secure_toml(secure, tmp_path, "fw-detect")), "--kafka",
                        secure.bootstrap, "--duration", "120", "--data-dir", str(tmp_path / "s"), env=env, timeout=180)
    assert source.returncode == 75, source.stderr[-3000:]
    assert "refused user 'fw-detect' a write to" in source.stderr and "TopicAuthorizationFailedError" in source.stderr
    grant(secure, "fw-notify", json.loads(fleetwatch("topics", "acls", "--json", "notify", env=env).stdout)["notify"]["acls"])
    unseen = fleetwatch("simulate", "--config", str(secure_toml(secure, tmp_path, "fw-notify")), "--kafka",
                        secure.bootstrap, "--duration", "120", "--data-dir", str(tmp_path / "u"), env=env, timeout=180)
    assert unseen.returncode == 75 and f"refused user 'fw-notify' a write to {prefix}fleetwatch." in unseen.stderr, \
        unseen.stderr[-3000:]
    nobody = fleetwatch("simulate", "--config", str(secure_toml(secure, tmp_path, "fw-nobody")), "--kafka",
                        secure.bootstrap, "--duration", "120", "--data-dir", str(tmp_path / "n"), env=env, timeout=180)
    assert nobody.returncode == 75 and "refused user 'fw-nobody' a producer id" in nobody.stderr, nobody.stderr[-3000:]
    said = detect.stderr + source.stderr + unseen.stderr + nobody.stderr
    assert "Traceback" not in said and all(password not in said for password in ROLE_USERS.values())


def test_topics_create_says_when_the_broker_is_unreachable(tmp_path):
    r = fleetwatch("topics", "create", "--kafka", "127.0.0.1:9", env={"FLEETWATCH_KAFKA__CONNECT_TIMEOUT_S": "1"},
                   timeout=60)
    assert r.returncode == 75  # EX_TEMPFAIL: systemd restarts it (2, a configuration error, it does not)
    assert "fleetwatch: cannot reach Kafka at 127.0.0.1:9" in r.stderr and "is the broker running" in r.stderr
