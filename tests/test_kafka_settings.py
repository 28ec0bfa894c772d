"""Production Kafka settings without a broker: TLS and SASL options for every client, checked at
start with clear errors; the SASL password from the environment or a file, never shown;
replication defaults; consumer groups and transactional ids prefixed.

Against real brokers (a 3-node cluster, a SASL_SSL listener): tests/e2e/test_kafka_cluster.py."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl

import pytest

from pipeline.bus.kafka_settings import PASSWORD_ENV, client_settings, replication
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.redact import redact_text
from tests.conftest import make_config
from tests.services import self_signed_tls

PASSWORD = "kpw-Vx9-s3cr3t"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return self_signed_tls(tmp_path_factory.mktemp("tls"))


def kafka(**settings):
    return make_config(kafka={"bootstrap": "broker-1:9093", **settings}).kafka


def test_plaintext_is_the_default_and_every_client_gets_the_same_settings():
    assert client_settings(kafka()) == {"bootstrap_servers": "broker-1:9093", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_with_a_ca_file_and_the_password_from_the_environment(tls):
    k = kafka(security_protocol="SASL_SSL", ssl_cafile=str(tls["ca.pem"]), sasl_mechanism="SCRAM-SHA-512",
              sasl_username="fleet-a")
    s = client_settings(k, env={PASSWORD_ENV: PASSWORD})
    assert s["security_protocol"] == "SASL_SSL" and s["sasl_mechanism"] == "SCRAM-SHA-512"
    assert s["sasl_plain_username"] == "fleet-a" and s["sasl_plain_password"] == PASSWORD
    context = s["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED and context.get_ca_certs()[0]["subject"] == \
        ((("commonName", "Fleetwatch test CA"),),)
    # Once read, the password is masked wherever a log line or an error would show it.
    assert PASSWORD not in redact_text(f"login failed for fleet-a with {PASSWORD}")


def test_the_password_file_and_a_client_certificate(tls, tmp_path):
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    k = kafka(security_protocol="SASL_SSL", sasl_username="u", sasl_password_file=str(tmp_path / "pw"),
              ssl_cafile=str(tls["ca.pem"]), ssl_certfile=str(tls["server.pem"]), ssl_keyfile=str(tls["server.key"]))
    assert client_settings(k, env={})["sasl_plain_password"] == PASSWORD
    # The environment, when set, wins over the file.
    assert client_settings(k, env={PASSWORD_ENV: "from-env"})["sasl_plain_password"] == "from-env"
    # SSL alone: TLS without SASL, the certificate and key in one file.
    k = kafka(security_protocol="SSL", ssl_cafile=str(tls["ca.pem"]), ssl_certfile=str(tls["server-keystore.pem"]))
    assert set(client_settings(k, env={})) == {"bootstrap_servers", "security_protocol", "ssl_context"}


@pytest.mark.parametrize("settings, env, message", [
    (dict(security_protocol="SASL_SSL"), {PASSWORD_ENV: PASSWORD}, r"needs kafka.sasl_username"),
    (dict(security_protocol="SASL_PLAINTEXT", sasl_username="u"), {},
     rf"kafka.sasl_username = 'u' has no password: set the environment variable {PASSWORD_ENV} or "
     r"kafka.sasl_password_file"),
    (dict(security_protocol="SSL", ssl_cafile="/nonexistent/ca.pem"), {},
     r"kafka.ssl_cafile = '/nonexistent/ca.pem': does not exist"),
    (dict(ssl_cafile="/etc/ssl/ca.pem"), {}, r"kafka.ssl_cafile set, but kafka.security_protocol = 'PLAINTEXT' "
                                              r"does not use TLS"),
    (dict(security_protocol="SSL", sasl_username="u"), {}, r"kafka.sasl_username set, but "
                                                           r"kafka.security_protocol = 'SSL' does not use SASL"),
    (dict(security_protocol="SSL", ssl_keyfile="/k.pem"), {}, r"kafka.ssl_keyfile = '/k.pem' without "
                                                              r"kafka.ssl_certfile"),
], ids=["sasl-without-user", "sasl-without-password", "cafile-missing", "tls-file-without-tls",
        "sasl-user-without-sasl", "key-without-cert"])
def test_inconsistent_settings_are_config_errors_naming_the_key(settings, env, message):
    with pytest.raises(ConfigError, match=message):
        client_settings(kafka(**settings), env=env)


def test_bad_files_are_config_errors(tls, tmp_path):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"sasl_password_file = .*: the file is empty"):
        client_settings(kafka(security_protocol="SASL_SSL", sasl_username="u",
                              sasl_password_file=str(tmp_path / "empty")), env={})
    with pytest.raises(ConfigError, match=r"kafka.ssl_cafile = .*: not a PEM CA certificate"):
        client_settings(kafka(security_protocol="SSL", ssl_cafile=str(tmp_path / "junk.pem")), env={})
    with pytest.raises(ConfigError, match=r"kafka.ssl_certfile = .*: not a PEM certificate and its unencrypted "
                                          r"private key"):
        client_settings(kafka(security_protocol="SSL", ssl_certfile=str(tls["server.pem"])), env={})  # no key


def test_an_encrypted_client_key_is_refused_at_start_not_prompted_for(tmp_path):
    """OpenSSL asks an encrypted key's passphrase on the terminal: a start from a shell had
    stopped there (and under systemd failed with OpenSSL's own words)."""
    import subprocess
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=fleetwatch", "-passout", "pass:secret"], check=True, capture_output=True)
    with pytest.raises(ConfigError, match=r"kafka.ssl_certfile = .*: not a PEM certificate and its unencrypted "
                                          r"private key \(the key is encrypted"):
        client_settings(kafka(security_protocol="SSL", ssl_certfile=str(cert), ssl_keyfile=str(key)), env={})


def test_replication_defaults_follow_the_cluster_size():
    assert replication(kafka(), 1) == (1, 1)
    assert replication(kafka(), 2) == (1, 1)
    assert replication(kafka(), 3) == (3, 2)
    assert replication(kafka(), 7) == (3, 2)
    assert replication(kafka(replication_factor=2), 3) == (2, 1)
    assert replication(kafka(replication_factor=5, min_insync_replicas=3), 5) == (5, 3)
    with pytest.raises(ConfigError, match=r"kafka.replication_factor = 3: the cluster at broker-1:9093 has 1 "
                                          r"broker up"):
        replication(kafka(replication_factor=3), 1)
    with pytest.raises(ConfigError, match=r"kafka.min_insync_replicas = 2: more than the replication factor \(1\)"):
        replication(kafka(min_insync_replicas=2), 1)


def test_groups_and_transactional_ids_carry_the_prefixes():
    from pipeline.bus.kafka import KafkaBus

    async def go():
        bus = KafkaBus("127.0.0.1:1", prefix="siteb.")
        sub = bus.subscribe(["fleetwatch.gpu"], "detect", transactional=True)
        try:
            return bus.wire("fleetwatch.gpu"), sub.consumer._group_id, bus.wire_group("detect")
        finally:
            await bus.producer.stop()
    topic, group, transactional_ids = asyncio.run(go())  # detect's transactional ids start with its group's id
    assert topic == "siteb.fleetwatch.gpu" and group == transactional_ids == "siteb.fleetwatch.detect"


def test_the_bus_of_the_config_connects_every_client_the_same_way(tls):
    from pipeline.bus.kafka import KafkaBus
    k = kafka(security_protocol="SASL_SSL", ssl_cafile=str(tls["ca.pem"]), sasl_username="u")

    async def go():
        bus = KafkaBus.from_config(k, env={PASSWORD_ENV: PASSWORD})
        sub = bus.subscribe(["fleetwatch.gpu"], "archive")
        try:
            return bus, [bus.producer.client, sub.consumer._client]
        finally:
            await bus.producer.stop()
    bus, clients = asyncio.run(go())
    assert bus.client_settings["sasl_plain_password"] == PASSWORD
    for client in clients:
        assert client._security_protocol == "SASL_SSL" and client._sasl_plain_password == PASSWORD
        assert client._ssl_context is bus.client_settings["ssl_context"]


def test_config_checks_the_kafka_security_and_never_prints_the_password(tls, tmp_path, capsys, monkeypatch):
    (tmp_path / "fw.toml").write_text(f"""
[kafka]
bootstrap = "broker-1:9093"
security_protocol = "SASL_SSL"
ssl_cafile = "{tls['ca.pem']}"
sasl_mechanism = "SCRAM-SHA-256"
sasl_username = "fleet-a"
""")
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert main(["config", "--config", str(tmp_path / "fw.toml")]) == 2
    assert f"has no password: set the environment variable {PASSWORD_ENV}" in capsys.readouterr().err
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    assert main(["config", "--config", str(tmp_path / "fw.toml")]) == 0
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    printed = json.loads(out)["kafka"]
    assert printed["sasl_username"] == "fleet-a" and printed["security_protocol"] == "SASL_SSL"


def test_the_password_variable_is_not_a_config_key():
    # FLEETWATCH_KAFKA_SASL_PASSWORD has one underscore: not FLEETWATCH_KAFKA__*, so not configuration.
    assert load_config(env={PASSWORD_ENV: PASSWORD}) == load_config(env={})


def test_sasl_plain_without_tls_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.bus.kafka_settings"):
        client_settings(kafka(security_protocol="SASL_PLAINTEXT", sasl_username="u"), env={PASSWORD_ENV: PASSWORD},
                        warn=True)
    assert "crosses the network in clear text" in caplog.text and PASSWORD not in caplog.text


def test_topics_create_needs_a_broker_address(capsys):
    assert main(["topics", "create"]) == 2
    assert "no Kafka given: pass --kafka HOST:PORT" in capsys.readouterr().err


def test_a_partition_whose_set_up_fails_ends_the_role_rather_than_never_being_ready():
    """aiokafka logs a rebalance listener's error and goes on: a transactional producer that could not
    start (Kafka out of reach here: nothing listens on port 1) had left its partition never ready, the
    role waiting for it for ever. The role ends with status 75 instead, which a supervisor restarts."""
    from aiokafka import TopicPartition
    from pipeline.bus.kafka import KafkaBus, _Rebalance
    from pipeline.config import Unavailable

    async def go():
        bus = KafkaBus("127.0.0.1:1")
        sub = bus.subscribe(["fleetwatch.gpu"], "detect", transactional=True)
        try:
            await asyncio.wait_for(_Rebalance(sub).on_partitions_assigned({TopicPartition("fleetwatch.gpu", 0)}),
                                   60)
            return sub
        finally:
            await sub.consumer.stop()
            await bus.producer.stop()
    sub = asyncio.run(go())
    assert sub.ready == set() and isinstance(sub.failed, Unavailable)
    assert re.search(r"Kafka at 127\.0\.0\.1:1 failed its transactional ids fleetwatch\.detect-p\* for group "
                     r"detect \(KafkaConnectionError", str(sub.failed))
