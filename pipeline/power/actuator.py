"""Where planned caps go: something that sets GPUs' power limits by UUID.

`Actuator` is the one call the controller (power/controller.py) makes. The simulator's
(`SimulatorActuator`: `fleetwatch eval`) sets them on the simulated GPUs, as an agent
sets them on its GPUs through NVML (sources/nvml_power.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pipeline.sources.simulate import FleetSimulator


class Actuator(Protocol):
    def apply(self, caps: dict[str, float | None]) -> None:
        """Set each GPU's (by UUID) power limit to W; None: back to its default."""


class SimulatorActuator:
    """Caps onto a FleetSimulator's GPUs; `calls` keeps every change, in order."""

    def __init__(self, sim: FleetSimulator) -> None:
        self.sim = sim
        self.index = {u: i for i, u in enumerate(sim.gpu_uuids)}
        self.calls: list[dict[str, float | None]] = []

    def apply(self, caps: dict[str, float | None]) -> None:
        self.calls.append(dict(caps))
        self.sim.set_caps(np.array([self.index[u] for u in caps], np.int64),
                          np.array([np.nan if w is None else w for w in caps.values()]))
