"""A GPU held to a power cap that draws well under it: the cap saves nothing.

Demand response (power/) counts a capped GPU's savings from what it drew when it was
capped; a job whose load then falls under the cap (a lighter phase, a checkpoint, another
job) makes that saving fictitious, and the site's reduction rests on the other GPUs. A
GPU's default limit is the highest enforced limit seen for it (`power_limit_w`) in two readings
in a row (one garbled reading must not make every later limit a cap); a cap is a limit below
it. Binding is clock reason 0x4 (SW power cap): the GPU would draw more."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.family import Family, State, evidence
from pipeline.model import SW_POWER_CAP

BUSY_UTIL = 0.05  # an idle GPU under a cap is capped on purpose (power/planner.py: idle first)


class PowerCaps(Family):
    topic = Topic.GPU
    name = "power"
    raises = ("PowerCapNotBinding",)
    # the highest enforced limit seen twice in a row, and the last one seen
    gpu = State("gpu", fields={"default_w": (np.float64, np.nan), "limit_w": (np.float64, np.nan)})

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        state, slots = self.gpu, b.slots
        state.ensure(self.inventory.gpu_count)
        limit, power, util = b.metrics["power_limit_w"], b.metrics["power_w"], b.metrics["util_gpu"]
        held = np.minimum(limit, state.limit_w[slots])  # (NaN, no default yet, before two readings)
        default = np.fmax(state.default_w[slots], held)
        state.default_w[slots], state.limit_w[slots] = default, np.where(np.isnan(limit), state.limit_w[slots], limit)
        with np.errstate(invalid="ignore"):
            capped = limit < default - 1.0
            hit = (capped & (util >= BUSY_UTIL) & (power < self.config.cap_not_binding_ratio * limit)
                   & ((b.reasons & SW_POWER_CAP) == 0))
        self.judge(out, "PowerCapNotBinding", slots, hit, b.now, power / limit,
                   evidence(power_w=power, power_limit_w=limit, default_w=default, util=util,
                            ratio_threshold=self.config.cap_not_binding_ratio))
