"""Slow thermal drift: a CUSUM of the GPU's temperature excess over its siblings under
load, against its own learnt baseline (a degrading cold plate or thermal interface).

The baseline is the excess the GPU's own power explains, learnt per GPU: a GPU whose cold
plate conducts 5% worse than its siblings' runs ~1.4 C over them at 700 W and ~0.4 C at
200 W, so its excess follows its load, and an inference node's load follows the day
(the fleet's seasonality). A constant baseline learnt at night would call the afternoon
a drift; a drift, unlike the load's share, grows with time at any power."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.family import Family, State, evidence
from pipeline.detect.state import Cusum
from pipeline.model import HW_SLOWDOWN_ANY

ANY_SLOWDOWN = int(HW_SLOWDOWN_ANY)  # a plain int: numpy is slow with enum operands
DRIFT_MIN_UTIL = 0.25  # utilisation from which a GPU is under load for the drift detector
# Ridge prior on the excess's slope with power (W^2): a GPU whose power moved by less than
# ~50 W around its mean has not shown how its excess follows its load, and none is assumed.
POWER_PRIOR_VAR = 50.0 ** 2
# How far a GPU's rise per watt may be from its siblings' (relative): until its own slope
# is known, a load it has not run at is that uncertain (kernels.cusum's slope_sd).
SLOPE_SPREAD = 0.1
MAX_SAMPLE_S = 60.0  # the most time one sample stands for in the sums (after a silence, not its length)


class Drift(Family):
    topic = Topic.GPU
    name = "thermal"
    raises = ("GpuThermalDrift",)
    drift = State("gpu", lambda d: Cusum(d.drift_baseline_halflife_s, d.cusum_slack_c, d.cusum_limit,
                                         d.warmup_samples, prior_var=POWER_PRIOR_VAR,
                                         slope_sd=SLOPE_SPREAD * d.thermal_c_per_w))

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        # The drift detector reads only samples under load: a degrading cold plate shows
        # there, while at idle integer temperatures and gain spread move the excess by ~2 C.
        # Light jobs count (a memory-bound job at 40% utilisation runs for hours). It neither
        # learns nor accumulates while the rack's coolant or the GPU's clocks are forced, or
        # while a faster thermal fault is alerted.
        slots, view, temp = b.slots, b.siblings, b.metrics["gpu_temp_c"]
        forced = (~(b.metrics["util_gpu"] >= DRIFT_MIN_UTIL) | view.cooling_alerted | b.hot
                  | ((b.reasons & ANY_SLOWDOWN) != 0))
        seconds = np.clip(np.nan_to_num(b.gap, nan=1.0), 0.0, MAX_SAMPLE_S)
        score, baseline = self.drift.update(np.where(forced, np.nan, view.excess), slots, view.power_eff, seconds)
        excess = view.excess - baseline
        seen = np.flatnonzero(np.isfinite(score))  # unobserved samples neither raise nor clear it
        hit = (score[seen] >= 1.0) & (excess[seen] > self.config.cusum_slack_c)
        self.judge(out, "GpuThermalDrift", slots[seen], hit, b.now, score[seen],
                   evidence(temp_c=temp[seen], excess_c=excess[seen], cusum_score=score[seen],
                            peer_median_c=view.peer_c[seen]))
