"""Clocks and power against the node's peers: stragglers at full load, the HW power
brake per node, and clocks forced down (HW or thermal slowdown) that no alert explains."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.family import Family, evidence
from pipeline.detect.state import group_median
from pipeline.model import CLOCK_EVENT_TEXT, FORCED_SLOWDOWN, HW_SLOWDOWN_ANY, ClockEventReason

# As plain ints: numpy is slow with enum operands.
POWER_BRAKE = int(ClockEventReason.HW_POWER_BRAKE_SLOWDOWN)
FORCED = int(FORCED_SLOWDOWN)
ANY_SLOWDOWN = int(HW_SLOWDOWN_ANY)


class Performance(Family):
    topic = Topic.GPU
    name = "performance"
    raises = ("GpuStraggler", "NodePowerBrake", "GpuHwSlowdown")

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        group, n_groups, reasons = b.group, b.n_groups, b.reasons
        power, sm, util = b.metrics["power_w"], b.metrics["sm_clock_mhz"], b.metrics["util_gpu"]
        include = (util >= 0.9) & ((reasons & ANY_SLOWDOWN) == 0)
        # A GPU held to a power cap below its node's highest limit (demand response: power/)
        # runs at its cap, with the clock the cap allows: it is judged against its cap, not
        # its peers' power or clock, and it is no peer of the uncapped ones. One that draws
        # well under its cap still straggles. (A straggler whose draw still reaches its cap
        # is hidden by it until the cap goes.)
        limit = b.metrics["power_limit_w"]
        top = np.full(n_groups, -np.inf)
        np.fmax.at(top, group, limit)
        with np.errstate(invalid="ignore"):
            capped = limit < top[group]
        med_power, n_power = group_median(power, group, n_groups, include & ~capped)
        med_sm, _ = group_median(sm, group, n_groups, include & ~capped)
        ratio = self.config.straggler_ratio
        expected = np.where(capped, np.fmin(limit, med_power[group]), med_power[group])
        straggler = (include & (n_power[group] >= 4) & (med_power[group] > 200.0)
                     & (power < ratio * expected) & (capped | (sm < ratio * med_sm[group])))
        self.judge(out, "GpuStraggler", b.slots, straggler, b.now, power / med_power[group],
                   evidence(power_w=power, sm_mhz=sm, util=util, peer_power_w=med_power[group],
                            peer_sm_mhz=med_sm[group], power_limit_w=b.metrics["power_limit_w"],
                            ratio_threshold=ratio))
        brake_gpus = np.bincount(group, (reasons & POWER_BRAKE) != 0, n_groups)
        self.judge(out, "NodePowerBrake", b.nodes, brake_gpus > 0, b.now, brake_gpus,
                   evidence(gpus=brake_gpus, reason_bit=hex(POWER_BRAKE)))
        # DCGM's clocks-event semantics: clocks forced down by hardware or a thermal
        # limit that no alert already explains (a brake on the node, a hot GPU, its rack's coolant).
        forced = (reasons & FORCED) != 0
        unexplained = forced & (brake_gpus[group] == 0) & ~b.thermal_alerted
        temp, mem_temp = b.metrics["gpu_temp_c"], b.metrics["mem_temp_c"]
        self.judge(out, "GpuHwSlowdown", b.slots, unexplained, b.now, (reasons & FORCED).astype(float),
                   lambda i: {"reasons": hex(int(reasons[i])), "sm_mhz": float(sm[i]), "power_w": float(power[i]),
                              "temp_c": float(temp[i]), "mem_temp_c": float(mem_temp[i]),
                              "what": ", ".join(text for bit, text in CLOCK_EVENT_TEXT.items() if reasons[i] & bit)})
