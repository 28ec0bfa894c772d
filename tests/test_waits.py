"""waits.wait_set: an Event waited on for at most some seconds."""

from __future__ import annotations

import asyncio

from pipeline.waits import wait_set


def test_it_says_whether_the_event_was_set_or_the_time_ran_out():
    async def go():
        ev = asyncio.Event()
        timed_out = await wait_set(ev, 0.01)
        ev.set()
        return timed_out, await wait_set(ev, 10.0), await wait_set(ev, None)
    assert asyncio.run(go()) == (False, True, True)


def test_a_cancel_that_comes_as_the_event_is_set_ends_the_waiting_task():
    """Python 3.11's wait_for(event.wait(), s) returns there and drops the cancel: a role loop
    that waited so went round once more at a stop (daemon.cancel_all had to cancel it again)."""
    async def go():
        ev, after = asyncio.Event(), []

        async def loop() -> None:
            while True:
                await wait_set(ev, 10.0)
                after.append("went on")
        task = asyncio.create_task(loop())
        await asyncio.sleep(0)  # (it waits)
        ev.set()
        task.cancel()
        try:
            await asyncio.wait_for(task, 5.0)
        except asyncio.CancelledError:
            return after, task.cancelled()
        return after, task.cancelled()
    assert asyncio.run(go()) == ([], True)
