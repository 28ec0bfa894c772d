"""Where planned caps go: something that sets GPUs' power limits by UUID.

`Actuator` is the one call the controller (power/controller.py) makes:

  SimulatorActuator   onto a FleetSimulator's GPUs directly (`fleetwatch eval`)
  BusActuator         as `power_cap` commands on fleetwatch.power.caps (the power role): each
                      node's agent applies its GPUs' rows (sources/power_caps.py) through NVML
                      (sources/nvml_power.py), or the simulator source onto its GPUs

Over the bus a cap is a lease: the role sends every cap again each third of
`power.lease_s`, and an agent that hears nothing of a GPU's cap for a lease restores the
GPU's default limit. So a cap never outlives its controller, even one that was killed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, Sequence

import numpy as np
import pyarrow as pa

from pipeline.model import POWER_CAP
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
        apply_to_simulator(self.sim, self.index, list(caps), [np.nan if w is None else w for w in caps.values()])


def apply_to_simulator(sim: FleetSimulator, index: dict[str, int], uuids: Sequence[str], cap_w: Sequence[float]) -> None:
    """Caps (NaN: the default) onto the simulated GPUs of `uuids`; UUIDs it does not have are skipped."""
    known = [(index[u], w) for u, w in zip(uuids, cap_w) if u in index]
    if known:
        slots, watts = zip(*known)
        sim.set_caps(np.array(slots, np.int64), np.array(watts, np.float64))


class BusActuator:
    """Caps as `power_cap` rows for the power role to publish: what changed, and every cap
    held again each third of the lease. `rows()` after each controller step."""

    def __init__(self, site: str, lease_s: float) -> None:
        self.site, self.lease_s = site, lease_s
        self.held: dict[str, float] = {}             # UUID -> the cap it holds now, W
        self._changed: dict[str, float | None] = {}  # not sent yet
        self._renewed: datetime | None = None

    def apply(self, caps: dict[str, float | None]) -> None:
        self._changed.update(caps)
        for uuid, w in caps.items():
            if w is None:
                self.held.pop(uuid, None)
            else:
                self.held[uuid] = w

    def rows(self, now: datetime, gpus, request_id: str) -> pa.RecordBatch | None:
        """The rows to send now (None: nothing): `gpus` is the controller's GpuTable (its slot
        of each UUID, and each slot's node and rack)."""
        send = dict(self._changed)
        if self.held and (self._renewed is None or (now - self._renewed).total_seconds() >= self.lease_s / 3):
            send = {**self.held, **send}
            self._renewed = now
        self._changed = {}
        if not send:
            return None
        uuids = list(send)  # the controller's own GPUs: its table knows each
        slots = gpus.ids.slots(pa.array(uuids, pa.string()))
        n = len(uuids)
        return pa.RecordBatch.from_pydict({
            "ts": pa.array([now] * n, POWER_CAP.field("ts").type),
            "site": [self.site] * n,
            "rack": [gpus.racks[i] for i in slots],
            "node": [gpus.nodes[i] for i in slots],
            "gpu_uuid": uuids,
            "cap_w": pa.array([send[u] for u in uuids], pa.float64()),
            "request_id": [request_id] * n,
            "lease_s": pa.array([self.lease_s] * n, pa.float64()),
        }, schema=POWER_CAP)
