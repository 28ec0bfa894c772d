"""The remediation role's state on disk: <data_dir>/state/remediation.json, written after
every round that changed it (atomically), read at start and by `fleetwatch remediation status`."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.sinks.files import write_atomically

STATE_FILE = "remediation.json"


def state_path(cfg: Config) -> Path:
    return cfg.state_dir / STATE_FILE


def load(cfg: Config, remediator) -> dict | None:
    """Restore the saved state into `remediator` and return it as saved; None when there is none."""
    path = state_path(cfg)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        remediator.restore(saved)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} cannot be read ({e}): move it aside to start remediation afresh (its open "
                          f"cases are then forgotten: check the scheduler for nodes fleetwatch drained)") from None
    return saved


def save(cfg: Config, remediator) -> None:
    path = state_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(remediator.snapshot()))
