"""A rack PDU drawing near its rating (fleet.pdu_rating_w)."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import FacilityBatch, Output
from pipeline.detect.family import Family
from pipeline.model import PointKind


class PduLoad(Family):
    topic = Topic.FACILITY
    name = "facility"
    raises = ("PduOverload",)

    def evaluate(self, b: FacilityBatch, out: Output) -> None:
        d, value, slots, devices = self.config, b.value, b.slots, b.devices
        pdu = np.flatnonzero(b.kind == PointKind.PDU_POWER)
        rating = self.engine.cfg.fleet.pdu_rating_w
        b.per_rack(self.judge, out, "PduOverload", pdu, value[pdu] > d.pdu_load_ratio * rating, value[pdu] / rating,
                   lambda r: {"device": devices[slots[r]], "power_w": float(value[r]), "rating_w": rating,
                              "ratio": float(value[r] / rating), "threshold_ratio": d.pdu_load_ratio})
