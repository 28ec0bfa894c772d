"""A rack's coolant loop from its CDU: a leak sensor (CoolantLeak) and flow below its own
learnt EWMA baseline (CoolantFlowLoss)."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import FacilityBatch, Output
from pipeline.detect.family import Family, State
from pipeline.model import PointKind
from pipeline.detect.state import EwmaZ


class Coolant(Family):
    topic = Topic.FACILITY
    name = "facility"
    raises = ("CoolantLeak", "CoolantFlowLoss")
    flow = State("point", lambda d: EwmaZ(d.ewma_halflife_s, d.z_threshold, d.warmup_samples, d.relearn_samples))

    def evaluate(self, b: FacilityBatch, out: Output) -> None:
        d, value, slots, devices = self.config, b.value, b.slots, b.devices
        leak = np.flatnonzero(b.kind == PointKind.LEAK)
        b.per_rack(self.judge, out, "CoolantLeak", leak, value[leak] >= 0.5, value[leak],
                   lambda r: {"device": devices[slots[r]], "leak": float(value[r])})
        flow = np.flatnonzero(b.kind == PointKind.FLOW)
        if flow.size:
            _, base = self.flow.update(value[flow], slots[flow], b.ts[flow])
            warm = self.flow.arrays.count[slots[flow]] >= d.warmup_samples
            ratio = value[flow] / base
            base_of = dict(zip(flow.tolist(), base.tolist()))
            b.per_rack(self.judge, out, "CoolantFlowLoss", flow, warm & (ratio < d.flow_loss_ratio), ratio,
                       lambda r: {"device": devices[slots[r]], "flow_lpm": float(value[r]),
                                  "baseline_lpm": base_of[r], "ratio": float(value[r] / base_of[r]),
                                  "threshold_ratio": d.flow_loss_ratio})
