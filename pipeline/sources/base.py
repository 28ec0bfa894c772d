"""What every source is: a small protocol the daemon runs without knowing the kind.

A source produces Arrow batches of the record types in pipeline/model.py and hands
each to `emit(topic, batch)`; the process keys and publishes them (bus/keys.py
decides every key, so a source never thinks about partitions). It runs until `stop`
is set, then hands over what it still holds and returns.

To add a collector (Redfish, IPMI, a DCGM exporter):
  1. a module under pipeline/sources/ with a class that implements `Source` and a
     `build(ctx) -> Source` that makes it from the configuration (ctx: roles/context.py);
  2. its config section in pipeline/config.py;
  3. its row in the role table (pipeline/roles/__init__.py): name, help, when
     `fleetwatch run` includes it, the topics it produces.
The daemon's wiring does not change.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Protocol

import pyarrow as pa

from pipeline.bus.base import Topic

Emit = Callable[[Topic, pa.RecordBatch], Awaitable[None]]


class Source(Protocol):
    async def run(self, emit: Emit, stop: asyncio.Event) -> None:
        """Produce until `stop` is set; hand over what is held; return."""

    def stats(self) -> dict[str, int]:
        """Counters so far; `gpu_samples` (GPU samples produced) where the source has GPUs."""

    def describe(self) -> str:
        """One phrase for the start-up log line, e.g. 'NVML agent on node-1'."""
