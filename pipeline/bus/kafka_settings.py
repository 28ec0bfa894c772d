"""How every Kafka client of a process connects: one function turns the `kafka.*` settings
into the keyword arguments that every aiokafka client takes (bootstrap servers, TLS and
SASL), and KafkaBus passes them, as `bus.client_settings`, to its producer, consumers,
admin client, restore reader and end probe.

The SASL password comes from the environment (FLEETWATCH_KAFKA_SASL_PASSWORD) or a file
(kafka.sasl_password_file), never from the TOML file or the command line, so that it is
not in `fleetwatch config`'s output or a process listing; once read it is given to
pipeline/redact.py, which masks it in every log line and error.

Nothing here imports aiokafka: `fleetwatch config` checks these settings too (preflight).
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import ConfigError, KafkaConfig
from pipeline.redact import hide_secret
from pipeline.tls import load_client_cert

log = logging.getLogger(__name__)

PASSWORD_ENV = "FLEETWATCH_KAFKA_SASL_PASSWORD"
GROUP_PREFIX = "fleetwatch."  # consumer groups and transactional ids, after kafka.topic_prefix
DEAD_LETTER = "fleetwatch.deadletter"  # the topic a consumer writes what it cannot decode to


def security_settings(k: KafkaConfig, env: Mapping[str, str] | None = None, warn: bool = False) -> dict[str, Any]:
    """aiokafka's security keyword arguments (security_protocol, ssl_context, sasl_*) for
    `k`, or ConfigError naming the key that is wrong or inconsistent."""
    env = os.environ if env is None else env
    protocol = k.security_protocol
    tls, sasl = protocol in ("SSL", "SASL_SSL"), protocol.startswith("SASL_")
    if not tls:
        given = [f"kafka.{name}" for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(k, name)]
        if given:
            raise ConfigError(f"config error: {', '.join(given)} set, but kafka.security_protocol = {protocol!r} does "
                              f"not use TLS: set kafka.security_protocol = \"SSL\" or \"SASL_SSL\", or remove them")
    if not sasl:
        given = [f"kafka.{name}" for name in ("sasl_username", "sasl_password_file") if getattr(k, name)]
        if given:
            raise ConfigError(f"config error: {', '.join(given)} set, but kafka.security_protocol = {protocol!r} does "
                              f"not use SASL: set kafka.security_protocol = \"SASL_SSL\" (or \"SASL_PLAINTEXT\"), or "
                              f"remove them")
    out: dict[str, Any] = {"security_protocol": protocol}
    if tls:
        out["ssl_context"] = _ssl_context(k)
    if sasl:
        if not k.sasl_username:
            raise ConfigError(f"config error: kafka.security_protocol = {protocol!r} needs kafka.sasl_username (and "
                              f"the password in {PASSWORD_ENV} or kafka.sasl_password_file)")
        out.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                   sasl_plain_password=_password(k, env))
        if warn and not tls and k.sasl_mechanism == "PLAIN":
            log.warning("kafka.security_protocol = SASL_PLAINTEXT with SASL PLAIN: the password crosses the network "
                        "in clear text; use SASL_SSL, or a SCRAM mechanism")
    return out


def client_settings(k: KafkaConfig, env: Mapping[str, str] | None = None, warn: bool = False) -> dict[str, Any]:
    """What every Kafka client of the process takes: bootstrap_servers plus security_settings."""
    return {"bootstrap_servers": k.bootstrap, **security_settings(k, env, warn)}


def _readable(key: str, path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        problem = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(f"config error: {key} = {path!r}: {problem}; give the {what}")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"config error: {key} = {path!r}: cannot read it (permission denied); give the {what}")
    return p


def _ssl_context(k: KafkaConfig) -> ssl.SSLContext:
    """A client TLS context that verifies the brokers' certificates and host names."""
    if k.ssl_keyfile and not k.ssl_certfile:
        raise ConfigError(f"config error: kafka.ssl_keyfile = {k.ssl_keyfile!r} without kafka.ssl_certfile: give the "
                          f"client certificate too (mutual TLS), or remove ssl_keyfile")
    cafile = str(_readable("kafka.ssl_cafile", k.ssl_cafile, "PEM file of the CA that signed the brokers' "
                           "certificates")) if k.ssl_cafile else None
    try:
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as e:
        raise ConfigError(f"config error: kafka.ssl_cafile = {k.ssl_cafile!r}: not a PEM CA certificate "
                          f"({e.reason or e})") from None
    if k.ssl_certfile:
        cert = _readable("kafka.ssl_certfile", k.ssl_certfile, "client certificate (PEM)")
        key = _readable("kafka.ssl_keyfile", k.ssl_keyfile, "client certificate's private key (PEM)") \
            if k.ssl_keyfile else None
        try:
            load_client_cert(context, str(cert), str(key) if key else "")  # (an encrypted key: refused, not asked)
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(f"config error: kafka.ssl_certfile = {k.ssl_certfile!r}"
                              f"{f' / kafka.ssl_keyfile = {k.ssl_keyfile!r}' if key else ''}: not a PEM certificate "
                              f"and its unencrypted private key ({getattr(e, 'reason', None) or e})") from None
    return context


def _password(k: KafkaConfig, env: Mapping[str, str]) -> str:
    value = env.get(PASSWORD_ENV, "")
    if not value and k.sasl_password_file:
        p = _readable("kafka.sasl_password_file", k.sasl_password_file, "file holding the SASL password")
        try:
            value = p.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config error: kafka.sasl_password_file = {k.sasl_password_file!r}: cannot read it "
                              f"({getattr(e, 'strerror', None) or 'not text'})") from None
        if not value:
            raise ConfigError(f"config error: kafka.sasl_password_file = {k.sasl_password_file!r}: the file is empty; "
                              f"put the SASL password in it")
    if not value:
        raise ConfigError(f"config error: kafka.sasl_username = {k.sasl_username!r} has no password: set the "
                          f"environment variable {PASSWORD_ENV} or kafka.sasl_password_file")
    hide_secret(value)
    return value


def replication(k: KafkaConfig, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of new topics on a cluster of `brokers`
    brokers: the settings, or for 0 the defaults (3 and 2 from 3 brokers, else 1 and 1)."""
    factor = k.replication_factor or (3 if brokers >= 3 else 1)
    insync = k.min_insync_replicas or (2 if factor >= 3 else 1)
    if factor > brokers:
        raise ConfigError(f"config error: kafka.replication_factor = {factor}: the cluster at {k.bootstrap} has "
                          f"{brokers} broker{'s' if brokers != 1 else ''} up; start the others, or set "
                          f"kafka.replication_factor to at most {brokers}")
    if insync > factor:
        raise ConfigError(f"config error: kafka.min_insync_replicas = {insync}: more than the replication factor "
                          f"({factor}); no write could ever succeed. Set it to at most {factor}")
    return factor, insync


def check(k: KafkaConfig, env: Mapping[str, str] | None = None, warn: bool = False) -> None:
    """Preflight: the Kafka settings are consistent (files exist, SASL has a user and a password)."""
    if k.replication_factor and k.min_insync_replicas > k.replication_factor:
        raise ConfigError(f"config error: kafka.min_insync_replicas = {k.min_insync_replicas}: more than "
                          f"kafka.replication_factor = {k.replication_factor}; no write could ever succeed")
    security_settings(k, env, warn)
