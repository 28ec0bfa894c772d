"""What the roles of one process share, built on first use and only if a role asks.

Every role's builder gets the context: the configuration, the roles of this process,
the bus, the stop request, and these, each made once when the first role needs it:

  detector()   the detector Engine, resumed from the data directory without Kafka
               (only detect builds it: its import compiles Numba kernels)
  simulator()  the simulated fleet (the simulator's clock is the intake window's)
  window()     the intake time window (intake.*), which every Gate and the MQTT collector check
  gate()       the content screening at a consumer's entry (bus/intake.py; in-process, once at the bus)
  emit()       what a source hands its batches to: keyed by bus/keys.py and published
               (emitter(role): the same, counted for the role in `progress`)

Builders also leave what the status line, the summary report and /metrics read: the sources
(`sources`), the archive's writer (`writer`), the notifier (`notifier`), the collectors roles
add to /metrics (`collectors`), the HTTP endpoints they add to --http (`routes`). `progress`
(ops/progress.py) counts what each role produced and read, at the emit and at the intake gate.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipeline.bus import Bus, MemoryBus, Topic
from pipeline.bus import keys
from pipeline.bus.intake import Gate, ScreenOnce, TimeWindow, dead_letters_for
from pipeline.config import Config
from pipeline.ops.progress import Progress
from pipeline.sinks.console import Console
from pipeline.sources.base import Source


def intake_window(cfg: Config, roles: frozenset[str], sim) -> TimeWindow:
    """The window readings must lie in (intake.*), around the receiver's clock: the
    simulator's where it runs in this process (it runs faster or slower than real time,
    from wherever it started), the wall clock otherwise. A process that only consumes a
    simulator at fleet.speed != 1 cannot know that clock: it sets no limit ahead."""
    i = cfg.intake
    if "simulate" in roles:
        return TimeWindow(i.max_ahead_s, i.max_age_s, lambda: sim.now.timestamp())
    return TimeWindow(i.max_ahead_s if cfg.fleet.speed == 1 else 0.0, i.max_age_s, time.time)


class Context:
    def __init__(self, cfg: Config, roles: frozenset[str], bus: Bus, stop: asyncio.Event, console: Console) -> None:
        self.cfg, self.roles, self.bus, self.stop, self.console = cfg, roles, bus, stop, console
        self.gates: list[Gate] = []
        self.sources: dict[str, Source] = {}
        self.engine: Any = None    # the detector Engine, once detect built it (over Kafka: its rack tier)
        self.site_engine: Any = None  # over Kafka: the site tier's Engine (roles/detect.py)
        self.writer: Any = None    # the archive's ArchiveWriter, once archive built it
        self.notifier: Any = None  # notify's Notifier, once notify built it
        self.collectors: list = []  # prometheus_client collectors roles add to the process's /metrics
        self.routes: dict = {}      # (method, path) -> handler: HTTP endpoints roles add to --http (ops/http.py)
        self.power: Any = None      # the power role's PowerRole, once built
        self.remediator: Any = None  # the remediation role's Remediator, once built
        self.progress = Progress()  # what each role produced and read (ops/progress.py)
        self._detector: tuple | None = None
        self._sim: Any = None
        self._window: TimeWindow | None = None
        self._screen_once: ScreenOnce | None = None

    def detector(self) -> tuple[Any, Any, list]:
        """(engine, local checkpoint or None, alerts to resolve at start): the Engine, over
        Kafka fresh (the state topic has its state), without Kafka resumed from <data_dir>/state/."""
        if self._detector is None:
            from pipeline.roles.detect import make_detector
            self._detector = make_detector(self.cfg)
            self.engine = self._detector[0]
        return self._detector

    def simulator(self):
        """The simulated fleet; it goes on from where a resumed detector left off."""
        if self._sim is None:
            from pipeline.sources.simulate import FleetSimulator
            resumed = self.detector()[0].latest_data_time() if "detect" in self.roles else None
            self._sim = FleetSimulator(self.cfg.fleet, start=datetime.fromtimestamp(max(time.time(), resumed),
                                                                                    timezone.utc)
                                       if resumed is not None else None)
        return self._sim

    def window(self) -> TimeWindow:
        if self._window is None:
            self._window = intake_window(self.cfg, self.roles, self.simulator() if "simulate" in self.roles else None)
        return self._window

    def gate(self, sub, group: str):
        """The screening at the entry of a consumer of `group`: bad rows are dead-lettered.
        In-process all groups read the same batches: each is screened once, for every group
        (dead letters of group "intake")."""
        if isinstance(self.bus, MemoryBus):
            if self._screen_once is None:
                self._screen_once = ScreenOnce(Gate("intake", dead_letters_for(sub, self.cfg), self.window()))
                self.gates.append(self._screen_once.gate)
            return self._counted(group, self._screen_once.view(sub.topics), sub)
        self.gates.append(Gate(group, dead_letters_for(sub, self.cfg), self.window()))
        return self._counted(group, self.gates[-1], sub)

    def _counted(self, group: str, gate, sub):
        """The gate, counting what passes it for the role that reads in `group`."""
        from pipeline.roles import ROLE_TABLE
        role = next((spec.name for spec in ROLE_TABLE if spec.group == group), group)
        return self.progress.reader(role, gate, sub)

    async def emit(self, topic: Topic, batch: pa.RecordBatch) -> None:
        """A source's batch onto the bus, as keys.messages cuts and keys it (over Kafka a
        message per partition: each holds the racks that land there, over the partitions
        the topic has on the cluster, where the producer places the message by its key)."""
        count = self.bus.partition_count(topic) if self.bus.keyed and topic in keys.BY_RACK else 0
        for message in keys.messages(topic, batch, self.bus.keyed, count):
            await self.bus.publish(message)

    def emitter(self, role: str):
        """`emit` for the source `role`, counted in `progress`."""
        return self.progress.emitter(role, self.emit)

    def gpu_samples_published(self) -> int:
        return sum(s.stats().get("gpu_samples", 0) for s in self.sources.values())

    def describe_sources(self) -> str:
        return ", ".join(filter(None, (s.describe() for s in self.sources.values()))) or "no source"
