"""What a person at the terminal sees: alert lines and a live status line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

log = logging.getLogger(__name__)

_COLOR = {"critical": "\033[31m", "warning": "\033[33m"}
_RESET = "\033[0m"


class Console:
    """The one owner of the terminal's last line: alerts, the status line, and (through
    `above_status`, which the log handler of pipeline/logs.py uses) log lines all pass here."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._lock = threading.RLock()  # log records may come from other threads (Kafka's clients)
        self._status_shown = False
        self._status_text = ""
        self._gone = False  # the reader went away (`fleetwatch run | head`): the daemon goes on without it

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
        with self.above_status():  # the status line stays the last line, below the alert
            self._write(line + "\n")

    def status(self, text: str) -> None:
        """On a terminal: one line rewritten in place."""
        with self._lock:
            self._write("\r\033[K" + text)
            self._status_shown, self._status_text = True, text

    @contextlib.contextmanager
    def above_status(self) -> Iterator[None]:
        """Write something else to the terminal (a log line, ending with a newline) inside this:
        the status line is cleared first, so nothing glues onto it, and redrawn after."""
        with self._lock:
            shown = self._status_shown
            if shown:
                self._write("\r\033[K")
                self._status_shown = False
            try:
                yield
            finally:
                if shown and not self._status_shown:
                    self.status(self._status_text)

    def close(self) -> None:
        with self._lock:
            if self._status_shown:
                self._write("\n")
                self._status_shown = False

    def _write(self, text: str) -> None:
        if self._gone:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self._gone = True
            log.warning("console: its reader went away (broken pipe); alerts still go to alerts.jsonl and the "
                        "receivers")
            with contextlib.suppress(OSError, ValueError):  # nor may the interpreter's exit flush complain
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
