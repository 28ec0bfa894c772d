"""Publishing off the caller's loop, each message after the one before.

A role that reads a topic it publishes on (notify's self-alerts, the archive's outage alert, the
remediation role's own alerts) must not wait for room in its own queue (in-process, a full one
never empties while it waits), nor hold its loop up for the bus; and its alert changes must
still go out in the order they were made. `InOrder.then` chains each publish onto the last.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class InOrder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.last: asyncio.Task | None = None

    def then(self, publish: Callable[[], Awaitable[None]]) -> None:
        """Run `publish()` once every publish handed over before it has run."""
        before = self.last

        async def run() -> None:
            if before is not None:
                with contextlib.suppress(Exception):  # (its own failure is its own: this one goes out)
                    await before
            await publish()
        self.last = asyncio.create_task(run(), name=self.name)

    async def drained(self, timeout_s: float | None = None) -> None:
        """Until what was handed over has gone out (or `timeout_s` passed, or it failed)."""
        if self.last is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.last), timeout_s)
