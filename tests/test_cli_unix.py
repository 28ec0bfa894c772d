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


def test_a_task_that_swallows_its_cancel_is_cancelled_again_so_a_failed_role_ends_the_process():
    import asyncio
    from pipeline.daemon import cancel_all
    swallowed = []

    async def stubborn():  # what 3.11's wait_for does when the awaited completes as the cancel arrives
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.append(True)
        await asyncio.sleep(3600)

    async def main():
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await cancel_all([task], round_s=0.01)
        return task
    task = asyncio.run(main())
    assert swallowed == [True] and task.cancelled()
