"""Waiting on asyncio Events for at most some seconds, in one place.

Python 3.11's `asyncio.wait_for(event.wait(), s)` drops a cancel that arrives as the event
is set: it returns, and the task runs on (a role loop that goes round once more and waits
again; at a stop, `daemon.cancel_all` must cancel it a second time). `asyncio.timeout`
keeps the cancel (fixed in 3.12's wait_for, which is built on it).
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, seconds: float | None) -> bool:
    """Until `event` is set (True) or `seconds` passed (False; None: no limit)."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
        return True
    except TimeoutError:
        return False


async def wait_any(events: list[asyncio.Event], seconds: float | None) -> None:
    """Until one of `events` is set or `seconds` passed (asyncio.wait: no cancel is lost); the
    waiters go with it, cancelled or not."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def unless_set(work, event: asyncio.Event) -> bool:
    """Await the coroutine `work` unless `event` is set first: then it is cancelled (False). A stop that
    comes while the process waits on a service (Kafka at start) is not held up by it."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()  # (its error, if it failed)
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False
