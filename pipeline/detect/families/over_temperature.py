"""A GPU over its temperature limit that no other thermal alert explains: the limit is a
margin under the GPU's own HW slowdown temperature (NVML), where it is known."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.family import Family


class OverTemperature(Family):
    topic = Topic.GPU
    name = "thermal"
    raises = ("GpuOverTemperature",)

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        d, view, slots, n_gpus = self.config, b.siblings, b.slots, self.inventory.gpu_count
        temp = b.metrics["gpu_temp_c"]
        runaway = self.alerted("GpuThermalRunaway", n_gpus)[slots]
        slowdown = b.metrics["slowdown_temp_c"]
        known = np.isfinite(slowdown)
        limit = np.where(known, slowdown - d.thermal_margin_c, d.gpu_temp_limit_c)
        peer_c = view.peer_c
        hit = (temp >= limit) & ~view.cooling_alerted & ~runaway & ~b.node_hot
        self.judge(out, "GpuOverTemperature", slots, hit, b.now, temp,
                   lambda i: {"temp_c": float(temp[i]), "limit_c": float(limit[i]), "slowdown_c": float(slowdown[i]),
                              "peer_median_c": float(peer_c[i]),
                              "limit_why": f"{d.thermal_margin_c:g} C under its HW slowdown at {slowdown[i]:.0f} C"
                              if known[i] else "detect.gpu_temp_limit_c"})
        b.hot = runaway | self.alerted("GpuOverTemperature", n_gpus)[slots]
        b.thermal_alerted = b.hot | view.cooling_alerted | b.node_hot
