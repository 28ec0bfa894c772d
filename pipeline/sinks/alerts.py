"""The local alert log: alerts.jsonl, every alert state change, whatever the receivers do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.sinks.files import append_durably


class AlertLog:
    """Append-only JSON lines, one per alert state change, fsynced per batch."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.open("a").close()  # there from the start, before the first alert: tail -F and tools find it

    def append(self, alerts: list[dict[str, Any]]) -> None:
        if not alerts:
            return
        append_durably(self.path, "".join(json.dumps(a, sort_keys=True) + "\n" for a in alerts))
