"""End-to-end: the log lines of a real `fleetwatch run`, as JSON, as text, and on a terminal
next to the live status line (the unit tests are in tests/test_logs.py)."""

from __future__ import annotations


import pytest

from tests.helpers import run_on_terminal, start
from tests.test_logs import TEXT_LINE, check_json_line, screen_lines


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_every_stderr_line_of_a_run_is_a_log_line_in_the_chosen_format(tmp_path, log_format):
    p = start(tmp_path, "--duration", "3", "--log-format", log_format)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err
    lines = err.splitlines()
    assert lines, "no log lines"
    if log_format == "json":
        messages = [check_json_line(line)["message"] for line in lines]
    else:
        assert all(TEXT_LINE.match(line) for line in lines), err
        messages = [line.split(": ", 1)[1] for line in lines]
    assert any(m.startswith("fleetwatch running all roles") for m in messages)
    assert any(m.startswith("stopped after") for m in messages)


def test_log_lines_on_a_terminal_never_glue_onto_the_status_line(tmp_path):
    """stdout and stderr on one pseudo-terminal, as in an operator's shell: the log lines logged
    while the status line shows (the stop, the drain) each start a line of their own."""
    returncode, raw = run_on_terminal(tmp_path, "--duration", "6", stderr_too=True, quiet_s=60)
    assert returncode == 0, raw[-2000:]
    lines = screen_lines(raw)
    logged = [line for line in lines if " INFO " in line or " WARNING " in line]
    assert logged and all(TEXT_LINE.match(line) for line in logged), lines  # nothing before a log line's time
    stopping = next(i for i, line in enumerate(lines) if "stopping: draining the pipeline" in line)
    assert "fleetwatch  sim " in raw[:raw.index("stopping: draining")]  # the status line showed before it
    assert any(line.startswith("fleetwatch  sim ") for line in lines[stopping + 1:])  # and is drawn again below
