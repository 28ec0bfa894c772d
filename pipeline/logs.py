"""Log lines on stderr, as text or as JSON, with UTC times and every URL redacted.

`configure(daemon_cfg, console)` is the one place logging is set up (the CLI calls it once per
command). Text: `2026-12-01T15:40:08.123Z INFO fleetwatch: message`. JSON (`--log-format json`,
`daemon.log_format`): one object per line, `{"time", "level", "logger", "message", ...}` plus the
record's `extra=` fields and `exc_info` (the traceback) when there is one.

On a terminal the console's live status line (pipeline/sinks/console.py) sits on the last line
without a newline; the handler writes each record through `Console.above_status()`, which
clears that line first and redraws it after, so a log line never glues onto it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from pipeline.config import DaemonConfig
from pipeline.redact import redact_text

if TYPE_CHECKING:
    from pipeline.sinks.console import Console

# The formats the config spec (daemon.log_format) allows: the one list, which the CLI's choices use too.
FORMATS: tuple[str, ...] = next(f.metadata["choices"] for f in dataclasses.fields(DaemonConfig)
                                if f.name == "log_format")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def utc_time(created: float) -> str:
    """RFC 3339 in UTC with milliseconds and a Z: 2026-12-01T15:40:08.123Z."""
    ms = int(created * 1000)  # seconds and milliseconds from the same rounding
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE` (and any traceback), UTC times, every URL redacted."""

    def __init__(self, fmt: str = TEXT) -> None:
        super().__init__(fmt)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_time(record.created)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


# The standard library's Formatter is enough for one JSON object per line: no new dependency
# (python-json-logger, structlog) to install, audit and keep compatible.
class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the `extra=` fields, exc_info
    and stack_info when present. Every string in it has its URLs redacted."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": utc_time(record.created), "level": record.levelname,
                               "logger": record.name, "message": redact_text(record.getMessage())}
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key if key not in out else f"extra.{key}"] = _plain(value)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_info"] = redact_text(record.exc_text)
        if record.stack_info:
            out["stack_info"] = redact_text(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False)


def _plain(value: Any) -> Any:
    """A value as JSON can carry it, strings redacted; anything else as its redacted str()."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # NaN is not JSON
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_text(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return redact_text(str(value))


class LogHandler(logging.StreamHandler):
    """Writes records to `stream`; with a console, above its live status line."""

    def __init__(self, stream: TextIO, console: Console | None = None) -> None:
        super().__init__(stream)
        self.console = console

    def handle(self, record: logging.LogRecord) -> bool:
        if self.console is None:
            return super().handle(record)
        # The console's lock first, then the handler's: the same order as a console write that logs.
        with self.console.above_status():
            return super().handle(record)


def formatter(log_format: str) -> logging.Formatter:
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(daemon: DaemonConfig, console: Console | None = None, stream: TextIO | None = None) -> LogHandler:
    """Route every log record (and Python warnings) to one handler on stderr, in the configured
    format and level; replaces any handler set up before."""
    handler = LogHandler(stream if stream is not None else sys.stderr, console)
    handler.setFormatter(formatter(daemon.log_format))
    logging.basicConfig(level=daemon.log_level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # a library's warning is a log record too: JSON in JSON mode
    return handler
