"""The local alert log: alerts.jsonl, every alert state change, whatever the receivers do."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class AlertLog:
    """Append-only JSON lines, one per alert state change, fsynced per batch."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, alerts: list[dict[str, Any]]) -> None:
        if not alerts:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(a, sort_keys=True) + "\n" for a in alerts))
            f.flush()
            os.fsync(f.fileno())
