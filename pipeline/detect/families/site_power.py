"""The whole site's power (its main meter) against its contracted or breaker cap
(detect.site_power_cap_w; 0 = off)."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import FacilityBatch, Output
from pipeline.detect.family import Family
from pipeline.model import PointKind


class SitePower(Family):
    topic = Topic.FACILITY
    name = "facility"
    raises = ("SitePowerOverCap",)

    def evaluate(self, b: FacilityBatch, out: Output) -> None:
        cap, value, slots, devices = self.config.site_power_cap_w, b.value, b.slots, b.devices
        if cap <= 0:
            return
        site = np.flatnonzero(b.kind == PointKind.SITE_POWER)
        b.per_rack(self.judge, out, "SitePowerOverCap", site, value[site] > cap, value[site] / cap,
                   lambda r: {"device": devices[slots[r]], "power_w": float(value[r]), "cap_w": cap,
                              "ratio": float(value[r] / cap)})
