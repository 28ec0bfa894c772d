"""Slow thermal drift: a CUSUM of the GPU's temperature excess over its siblings under
load, against its own learnt baseline (a degrading cold plate or thermal interface)."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.family import Family, State, evidence
from pipeline.detect.state import Cusum
from pipeline.model import HW_SLOWDOWN_ANY

ANY_SLOWDOWN = int(HW_SLOWDOWN_ANY)  # a plain int: numpy is slow with enum operands
DRIFT_MIN_UTIL = 0.25  # utilisation from which a GPU is under load for the drift detector


class Drift(Family):
    topic = Topic.GPU
    name = "thermal"
    raises = ("GpuThermalDrift",)
    drift = State("gpu", lambda d: Cusum(d.drift_baseline_halflife_s, d.cusum_slack_c, d.cusum_limit,
                                         d.warmup_samples))

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        # The drift detector reads only samples under load: a degrading cold plate shows
        # there, while at idle integer temperatures and gain spread move the excess by ~2 C.
        # Light jobs count (a memory-bound job at 40% utilisation runs for hours). It neither
        # learns nor accumulates while the rack's coolant or the GPU's clocks are forced, or
        # while a faster thermal fault is alerted.
        slots, view, temp = b.slots, b.siblings, b.metrics["gpu_temp_c"]
        forced = (~(b.metrics["util_gpu"] >= DRIFT_MIN_UTIL) | view.cooling_alerted | b.hot
                  | ((b.reasons & ANY_SLOWDOWN) != 0))
        score = self.drift.update(np.where(forced, np.nan, view.excess), slots)
        excess = view.excess - self.drift.arrays.mean[slots]
        seen = np.flatnonzero(np.isfinite(score))  # unobserved samples neither raise nor clear it
        hit = (score[seen] >= 1.0) & (excess[seen] > self.config.cusum_slack_c)
        self.judge(out, "GpuThermalDrift", slots[seen], hit, b.now, score[seen],
                   evidence(temp_c=temp[seen], excess_c=excess[seen], cusum_score=score[seen],
                            peer_median_c=view.peer_c[seen]))
