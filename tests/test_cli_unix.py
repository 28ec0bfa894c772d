"""Commands behave like Unix tools: quiet when the reader of their output goes away,
signals as service managers and `timeout` send them, files checked before the work,
configuration checked the same way by `run` and `config`.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_cli_unix.py."""

from __future__ import annotations


from pipeline.daemon import StopRequests
from tests.conftest import REPO


def test_signals_close_together_are_one_stop_request_and_a_later_one_exits():
    now = [100.0]
    requests = StopRequests(repeat_s=3.0, clock=lambda: now[0])
    assert requests.on_signal() == "stop"
    now[0] += 0.001  # `timeout`: SIGTERM to the process, then to its group
    assert requests.on_signal() == "same"
    now[0] += 2.0
    assert requests.on_signal() == "same"
    now[0] += 1.0  # a deliberate second Ctrl-C
    assert requests.on_signal() == "exit"


def test_the_docs_document_the_signals():
    readme = (REPO / "README.md").read_text()
    ops = (REPO / "docs" / "operations.md").read_text()
    assert "SIGHUP" in readme and "docs/operations.md#signals" in readme
    assert "## Signals" in ops and "within 3 s" in ops and "status 130" in ops
