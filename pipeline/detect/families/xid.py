"""XID events and a GPU lost: GpuFellOffBus at once, and the XIDs DCGM calls critical
(catalog.XID_ALERTS; any other is GpuXid) latched for detect.xid_hold_s, so that the
alert holds while telemetry keeps arriving (the counters family re-judges the latches on
every GPU batch)."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import EventBatch, Output
from pipeline.detect.catalog import XID_ALERTS
from pipeline.detect.families.staleness import Staleness
from pipeline.detect.family import Family, State
from pipeline.detect.state import SlotArrays

LATCHED = tuple(sorted(set(XID_ALERTS.values()) - {"GpuFellOffBus"} | {"GpuXid"}))


class Xid(Family):
    topic = Topic.EVENTS
    name = "xid"
    raises = ("GpuFellOffBus", "GpuNvlinkError", "GpuHighSbeRate", "GpuGspError", "GpuXid")
    # Per latched alertname: the alert stays firing until this time (per GPU slot).
    latches = State("gpu", lambda _: {name: SlotArrays({"until": (np.float64, -np.inf)}) for name in LATCHED},
                    checkpoint="xid")

    def until(self, name: str) -> np.ndarray:
        arrays = self.latches[name]
        arrays.ensure(self.inventory.gpu_count)
        return arrays.until

    def evaluate(self, b: EventBatch, out: Output) -> None:
        reporting = self.engine.family(Staleness)
        reporting.ensure()
        for i, row in enumerate(b.rows.select(["kind", "code", "text"]).to_pylist()):
            slot, t = int(b.slots[i]), float(b.ts[i])
            code = row["code"]
            if row["kind"] == "gpu_lost" or (row["kind"] == "xid" and code == 79):
                name = "GpuFellOffBus"
                reporting.gpu.offbus[slot] = True
            elif row["kind"] == "xid" and code is not None:
                name = XID_ALERTS.get(code, "GpuXid")
                self.until(name)[slot] = max(self.until(name)[slot], t + self.config.xid_hold_s)
            else:
                continue
            what = f"XID {code}: {row['text']}" if code is not None else row["text"]
            self.judge(out, name, np.array([slot]), np.array([True]), t, np.array([float(code or 0)]),
                       lambda _: {"xid": code, "what": what})
