"""The remediation role's state on disk: <data_dir>/state/remediation.json, written after
every round that changed it (atomically), read at start and by `fleetwatch remediation status`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.sinks.files import RewrittenFile

log = logging.getLogger("pipeline.remediate")

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


def saver(cfg: Config, remediator):
    """save() -> bool: write the state now. A failure (a full disk) is said once and the role goes
    on deciding; the file it cannot replace stays as it was until a save works again."""
    file = RewrittenFile(log, state_path(cfg), "remediation", "remediation goes on, but a restart now would "
                         "resume from the cases saved before")
    return lambda: file.write(json.dumps(remediator.snapshot()))


def save(cfg: Config, remediator) -> bool:
    return saver(cfg, remediator)()
