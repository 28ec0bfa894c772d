"""Log lines (pipeline/logs.py): text with UTC times ending in Z, or one JSON object per line,
secrets redacted either way, and never glued onto the console's live status line.

The end-to-end runs of `fleetwatch run` are in tests/e2e/test_logs.py."""

from __future__ import annotations

import calendar
import io
import json
import logging
import os
import pty
import re
import select
import sys
import time
import warnings

import pytest

from pipeline.cli import _overrides, _parser
from pipeline.config import ConfigError, DaemonConfig, load_config
from pipeline.logs import JsonFormatter, LogHandler, TextFormatter, configure, utc_time
from pipeline.sinks.console import Console
from tests.test_secrets import PASSWORD, TOKEN

UTC_Z = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
TEXT_LINE = re.compile(rf"^{UTC_Z} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
SECRET_URL = f"https://hookuser:{PASSWORD}@hooks.example/x?token={TOKEN}"
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def screen_lines(raw: str) -> list[str]:
    """What a terminal shows for `raw`, line by line: `\\r` returns to the start of the line,
    `ESC[K` erases to its end, colours are dropped."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    i = 0
    raw = _SGR.sub("", raw)
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            del line[col:]
            i += 3
            continue
        ch = raw[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(line))
            line, col = [], 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    if line:
        lines.append("".join(line))
    return lines


def check_json_line(line: str) -> dict:
    """One stderr line of `--log-format json`: an object with the required keys and a UTC Z time."""
    obj = json.loads(line)
    assert isinstance(obj, dict), line
    assert {"time", "level", "logger", "message"} <= obj.keys(), line
    assert re.fullmatch(UTC_Z, obj["time"]), line
    assert obj["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
    return obj


def _record(msg: str = "hello %s", args: tuple = ("world",), level: int = logging.INFO, exc_info=None,
            **extra) -> logging.LogRecord:
    record = logging.LogRecord("fleetwatch.test", level, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


@pytest.fixture
def root_logging():
    """configure() replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_utc_time_is_rfc3339_utc_with_milliseconds_and_z():
    t = calendar.timegm((2026, 12, 1, 15, 40, 8)) + 0.123
    assert utc_time(t) == "2026-12-01T15:40:08.123Z"
    assert utc_time(calendar.timegm((2026, 12, 1, 15, 40, 8)) + 0.9996) == "2026-12-01T15:40:08.999Z"
    assert re.fullmatch(UTC_Z, utc_time(time.time()))


def test_text_lines_have_utc_times_ending_in_z_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        record = _record()
        line = TextFormatter().format(record)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert TEXT_LINE.match(line), line
    assert line == f"{utc_time(record.created)} INFO fleetwatch.test: hello world"
    assert line[:19] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))


def test_json_has_time_level_logger_message_and_the_extra_fields():
    record = _record(level=logging.WARNING, rack="r03", gpus=8, ratio=0.5, labels={"node": "r03-n06"},
                     ids=("a", "b"), nan=float("nan"), when=DaemonConfig())
    obj = check_json_line(JsonFormatter().format(record))
    assert obj["time"] == utc_time(record.created)
    assert (obj["level"], obj["logger"], obj["message"]) == ("WARNING", "fleetwatch.test", "hello world")
    assert obj["rack"] == "r03" and obj["gpus"] == 8 and obj["ratio"] == 0.5
    assert obj["labels"] == {"node": "r03-n06"} and obj["ids"] == ["a", "b"]
    assert obj["nan"] == "nan" and obj["when"].startswith("DaemonConfig(")  # not JSON: as text
    assert "exc_info" not in obj and "args" not in obj and "msg" not in obj  # only what the record says


def test_an_extra_field_does_not_replace_a_required_key():
    obj = check_json_line(JsonFormatter().format(_record(level=logging.ERROR, logger="mine", time="noon")))
    assert obj["level"] == "ERROR" and obj["logger"] == "fleetwatch.test"
    assert obj["extra.logger"] == "mine" and obj["extra.time"] == "noon"


def test_json_carries_the_exception_text():
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        record = _record("archive failed", (), logging.ERROR, sys.exc_info())
    obj = check_json_line(JsonFormatter().format(record))
    assert obj["message"] == "archive failed"
    assert obj["exc_info"].startswith("Traceback") and "RuntimeError: disk on fire" in obj["exc_info"]


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_secrets_never_reach_a_log_line(formatter):
    try:
        raise ConnectionError(f"cannot reach {SECRET_URL}")
    except ConnectionError:
        record = _record("delivery to %s failed", (SECRET_URL,), logging.WARNING, sys.exc_info(),
                         receiver={"url": SECRET_URL, "urls": [SECRET_URL]}, url=SECRET_URL)
    line = formatter.format(record)
    assert PASSWORD not in line and TOKEN not in line
    assert "https://***@hooks.example/x?token=***" in line
    if isinstance(formatter, JsonFormatter):
        obj = check_json_line(line)
        assert obj["url"] == obj["receiver"]["url"] == "https://***@hooks.example/x?token=***"


def test_configure_routes_every_logger_and_warnings_to_one_json_handler(root_logging):
    out = io.StringIO()
    configure(DaemonConfig(log_format="json", log_level="warning"), stream=out)
    logging.getLogger("pipeline.sinks.webhook").warning("receiver %s slow", "oncall", extra={"receiver": "oncall"})
    logging.getLogger("fleetwatch").info("not shown at level warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library complains", UserWarning)
    lines = out.getvalue().splitlines()
    objs = [check_json_line(line) for line in lines]
    assert len(objs) == 2
    assert objs[0]["logger"] == "pipeline.sinks.webhook" and objs[0]["receiver"] == "oncall"
    assert objs[1]["logger"] == "py.warnings" and "a library complains" in objs[1]["message"]


def test_configure_text_is_the_default(root_logging):
    out = io.StringIO()
    configure(DaemonConfig(), stream=out)
    logging.getLogger("fleetwatch").info("started")
    assert TEXT_LINE.match(out.getvalue()) and out.getvalue().endswith(" INFO fleetwatch: started\n")


def test_log_format_is_a_config_key_with_env_and_flag(tmp_path):
    assert load_config(env={}).daemon.log_format == "text"
    assert load_config(env={"FLEETWATCH_DAEMON__LOG_FORMAT": "json"}).daemon.log_format == "json"
    (tmp_path / "fw.toml").write_text('[daemon]\nlog_format = "json"\n')
    assert load_config(tmp_path / "fw.toml", env={}).daemon.log_format == "json"
    with pytest.raises(ConfigError, match=r"daemon.log_format = 'xml': allowed: text, json"):
        load_config(env={"FLEETWATCH_DAEMON__LOG_FORMAT": "xml"})
    args = _parser().parse_args(["run", "--log-format", "json"])
    assert load_config(overrides=_overrides(args), env={}).daemon.log_format == "json"


def test_every_command_with_log_level_takes_log_format():
    subparsers = next(a for a in _parser()._actions if a.dest == "command").choices
    with_level = {name: sp for name, sp in subparsers.items()
                  if any("--log-level" in a.option_strings for a in sp._actions)}
    assert {"run", "eval", "detect"} <= with_level.keys()
    for name, sp in with_level.items():
        fmt = next((a for a in sp._actions if "--log-format" in a.option_strings), None)
        assert fmt is not None and tuple(fmt.choices) == ("text", "json"), name


def _terminal_output(write) -> str:
    """Everything `write(console, handler)` puts on a pseudo-terminal, the console on one
    descriptor and the log handler on another (stdout and stderr), as `fleetwatch run` does."""
    master, slave = pty.openpty()
    stdout = os.fdopen(os.dup(slave), "w")
    stderr = os.fdopen(os.dup(slave), "w")
    os.close(slave)
    chunks = []
    try:
        console = Console(stdout)
        assert console.tty
        write(console, stderr)
        stdout.close()
        stderr.close()
        while select.select([master], [], [], 10)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every slave descriptor closed and all read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return b"".join(chunks).decode()


STATUS = "fleetwatch  sim 2026-12-01 15:40:08  256 GPU samples/s  alerts firing 0 (raised 0)"


def _status_then_a_log_record(handler_console):
    def write(console: Console, stderr) -> None:
        handler = LogHandler(stderr, console if handler_console else None)
        handler.setFormatter(TextFormatter())
        logger = logging.Logger("fleetwatch.pty")  # not in the logging tree: only this handler
        logger.addHandler(handler)
        console.status(STATUS)
        logger.warning("archive: write failed, retrying")
        console.status(STATUS.replace("256", "255"))
        console.close()
    return write


def test_a_log_record_while_the_status_line_shows_starts_on_a_clean_line():
    lines = screen_lines(_terminal_output(_status_then_a_log_record(handler_console=True)))
    logged = [line for line in lines if "archive: write failed" in line]
    assert len(logged) == 1 and TEXT_LINE.match(logged[0]), lines  # no status text before it
    assert logged[0].endswith(" WARNING fleetwatch.pty: archive: write failed, retrying")
    assert lines[lines.index(logged[0]) + 1] == STATUS.replace("256", "255")  # the status line, redrawn below
    assert all("fleetwatch  sim" not in line for line in lines if TEXT_LINE.match(line))


def test_the_pty_check_sees_a_glued_line():
    """The check above can fail: a handler that ignores the console glues its line onto the status."""
    lines = screen_lines(_terminal_output(_status_then_a_log_record(handler_console=False)))
    logged = next(line for line in lines if "archive: write failed" in line)
    assert logged.startswith(STATUS) and not TEXT_LINE.match(logged)


def test_the_status_line_is_redrawn_after_each_log_record():
    def write(console: Console, stderr) -> None:
        handler = LogHandler(stderr, console)
        handler.setFormatter(JsonFormatter())
        logger = logging.Logger("fleetwatch.pty")
        logger.addHandler(handler)
        logger.info("before any status")  # nothing to clear yet
        console.status(STATUS)
        for n in range(3):
            logger.info("record %d", n)
        console.close()
    raw = _terminal_output(write)
    lines = screen_lines(raw)
    assert [check_json_line(line)["message"] for line in lines[:-1]] == ["before any status", "record 0",
                                                                         "record 1", "record 2"]
    assert lines[-1] == STATUS
    assert raw.count(STATUS) == 4  # drawn once, redrawn after each of the three records


@pytest.mark.parametrize("error, status", [(RuntimeError, 1), (ConfigError, 2)])
def test_a_failure_of_a_json_run_is_a_json_record_too(tmp_path, monkeypatch, capsys, root_logging, error, status):
    import pipeline.daemon
    from pipeline.cli import main

    async def failing(*args, **kwargs):
        raise error(f"cannot reach {SECRET_URL}")
    monkeypatch.setattr(pipeline.daemon, "run_daemon", failing)
    for key in [k for k in os.environ if k.startswith("FLEETWATCH_")]:
        monkeypatch.delenv(key)
    assert main(["run", "--data-dir", str(tmp_path / "data"), "--log-format", "json"]) == status
    err = capsys.readouterr().err
    objs = [check_json_line(line) for line in err.splitlines()]
    assert objs[-1]["level"] == ("CRITICAL" if status == 1 else "ERROR")
    assert "cannot reach https://***@hooks.example/x?token=***" in objs[-1]["message"]
    assert ("exc_info" in objs[-1]) == (status == 1)
    assert PASSWORD not in err and TOKEN not in err


def test_the_futures_a_fenced_producer_leaves_unread_are_not_logged_as_errors_and_other_ones_are():
    """After a fence, aiokafka's own futures failed with ProducerFenced had each been logged as an ERROR
    with a traceback when collected (four or five per fence, after the warning that says what happened)."""
    import asyncio
    import gc
    import importlib

    from aiokafka.errors import ProducerFenced

    importlib.import_module("pipeline.bus.kafka")  # installs the filter, as every process on Kafka imports it
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)
    handler = Keep()
    logging.getLogger("asyncio").addHandler(handler)
    try:
        async def leave_unread(error: BaseException) -> None:
            asyncio.get_running_loop().create_future().set_exception(error)
            gc.collect()
        asyncio.run(leave_unread(ProducerFenced()))
        asyncio.run(leave_unread(RuntimeError("a bug of our own")))
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    assert [type(r.exc_info[1]).__name__ for r in seen] == ["RuntimeError"]
    assert "never retrieved" in seen[0].getMessage()
