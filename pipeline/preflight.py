"""Everything checked before a process starts its roles, in one function: `fleetwatch run`
(and each role) calls it before it starts, and `fleetwatch config` calls it on the
configuration it prints, so a mistake shows in both the same way (ConfigError, status 2).

It reads but never creates or changes anything: `fleetwatch config` may run anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from pipeline.config import Config, ConfigError, host_port


def validate(cfg: Config, roles: frozenset[str], env: Mapping[str, str] | None = None, warn: bool = True) -> None:
    """ConfigError naming the first key that is wrong for running `roles` with `cfg`.
    warn=False keeps the warnings (e.g. tls_verify = false) for the roles' own start."""
    from pipeline.daemon import check_roles
    check_roles(cfg, roles)
    _check_data_dir(cfg.data_dir)
    if cfg.mqtt.broker:
        host_port("mqtt.broker", cfg.mqtt.broker, 1883)
    if cfg.daemon.http:
        host_port("daemon.http", cfg.daemon.http, 9410)
        from pipeline.ops.monitor import http_token
        http_token(cfg, env)
    for address in filter(None, (a.strip() for a in cfg.kafka.bootstrap.split(","))):
        host_port("kafka.bootstrap", address, 9092)
    if cfg.kafka.bootstrap:  # TLS files, SASL user and password (pipeline/bus/kafka_settings.py)
        from pipeline.bus.kafka_settings import check as check_kafka
        check_kafka(cfg.kafka, env, warn)
    from pipeline.roles import ROLE_TABLE, preflight
    for spec in ROLE_TABLE:  # each role's own checks (its files, URLs), in the module that owns them
        if spec.name in roles and (check := preflight(spec)) is not None:
            check(cfg, env, warn)


def _check_data_dir(data_dir: str) -> None:
    """data_dir is a directory, or can be created: its nearest existing parent is a directory
    this user may write in."""
    path = Path(data_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    problem = ""
    if existing is None:
        problem = "no part of the path exists"
    elif not existing.is_dir():
        problem = f"{str(existing)!r} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{str(existing)!r} is not writable: permission denied"
    if problem:
        raise ConfigError(f"config error: data_dir = {data_dir!r}: cannot create or write there ({problem}); "
                          f"choose another with --data-dir or FLEETWATCH_DATA_DIR")
