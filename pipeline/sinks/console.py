"""What a person at the terminal sees: alert lines and a live status line."""

from __future__ import annotations

import sys
from typing import Any, TextIO

_COLOR = {"critical": "\033[31m", "warning": "\033[33m"}
_RESET = "\033[0m"


class Console:
    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._status_shown = False

    def alert(self, a: dict[str, Any]) -> None:
        sev = a["labels"].get("severity", "")
        state = "FIRING  " if a["status"] == "firing" else "RESOLVED"
        when = a["startsAt"] if a["status"] == "firing" else a["endsAt"]
        line = f"{when} {state} {sev:8s} {a['labels']['alertname']}: {a['annotations'].get('summary', '')}"
        runbook = a["annotations"].get("runbook_url")
        if a["status"] == "firing" and runbook:
            line += f"  [runbook: {runbook}]"
        if self.tty:
            line = f"{_COLOR.get(sev, '') if a['status'] == 'firing' else ''}{line}{_RESET}"
        self._clear_status()
        print(line, file=self.stream, flush=True)

    def status(self, text: str) -> None:
        """On a terminal: one line rewritten in place."""
        self.stream.write("\r\033[K" + text)
        self.stream.flush()
        self._status_shown = True

    def _clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r\033[K")
            self._status_shown = False

    def close(self) -> None:
        if self._status_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._status_shown = False
