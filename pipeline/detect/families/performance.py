"""Clocks and power against the node's peers: stragglers at full load, the HW power
brake per node, and clocks forced down (HW or thermal slowdown) that no alert explains."""

from __future__ import annotations

import functools

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.family import Family, State, evidence
from pipeline.detect.state import group_median
from pipeline.model import CLOCK_EVENT_TEXT, FORCED_SLOWDOWN, HW_SLOWDOWN_ANY, SW_POWER_CAP, ClockEventReason
from pipeline.power.curve import PowerCurve, from_recording

# As plain ints: numpy is slow with enum operands.
POWER_BRAKE = int(ClockEventReason.HW_POWER_BRAKE_SLOWDOWN)
FORCED = int(FORCED_SLOWDOWN)
ANY_SLOWDOWN = int(HW_SLOWDOWN_ANY)
CAP_SETTLE_S = 2.0


@functools.cache
def _curve() -> PowerCurve:
    """The recorded H100's power -> SM clock curve: the clock a cap allows at full load."""
    return from_recording()


class Performance(Family):
    topic = Topic.GPU
    name = "performance"
    raises = ("GpuStraggler", "NodePowerBrake", "GpuHwSlowdown")
    # Per GPU: the highest enforced limit seen (its default), the limit last seen and when it changed.
    limit = State("gpu", fields={"top_w": (np.float64, np.nan), "last_w": (np.float64, np.nan),
                                 "changed_at": (np.float64, -np.inf)})

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        group, n_groups, reasons = b.group, b.n_groups, b.reasons
        power, sm, util = b.metrics["power_w"], b.metrics["sm_clock_mhz"], b.metrics["util_gpu"]
        include = (util >= 0.9) & ((reasons & ANY_SLOWDOWN) == 0)
        # A GPU held to a power cap (demand response: power/) runs at the clock its cap allows:
        # capped, its power says nothing (the cap sets it) and it is no peer of the uncapped
        # ones. A cap is a limit below the highest the GPU or its node has shown (its default).
        limit = b.metrics["power_limit_w"]
        top = np.full(n_groups, -np.inf)
        np.fmax.at(top, group, limit)
        self.limit.ensure(self.inventory.gpu_count)
        seen = self.limit.top_w
        seen[b.slots] = np.fmax(seen[b.slots], limit)
        with np.errstate(invalid="ignore"):
            capped = limit < np.fmax(top[group], seen[b.slots]) - 1.0
            moved = np.abs(limit - self.limit.last_w[b.slots]) > 1.0
        self.limit.changed_at[b.slots] = np.where(moved, b.ts, self.limit.changed_at[b.slots])
        self.limit.last_w[b.slots] = np.where(np.isnan(limit), self.limit.last_w[b.slots], limit)
        # A new limit takes the recorded H100 0.2-0.4 s to settle, undershooting by up to 100 W and
        # 400 MHz on the way (h100_powercap_trace): a GPU settling is neither a straggler nor a peer.
        include &= b.ts - self.limit.changed_at[b.slots] >= CAP_SETTLE_S
        med_power, n_power = group_median(power, group, n_groups, include & ~capped)
        med_sm, _ = group_median(sm, group, n_groups, include & ~capped)
        ratio = self.config.straggler_ratio
        uncapped = (include & ~capped & (n_power[group] >= 4) & (med_power[group] > 200.0)
                    & (power < ratio * med_power[group]) & (sm < ratio * med_sm[group]))
        # Capped: its SM clock against the clock its cap allows. The capped peers of its node
        # that the cap holds (reason 0x4) show it: each one's clock over the H100 curve's at
        # its own cap (power/curve.py), so peers at other caps compare; their median times the
        # curve's clock at this GPU's cap is what it should run at. With fewer than 4 such
        # peers, the curve's clock itself. A straggler runs slower whether its cap holds it
        # (same power, lower clock) or not (under its cap, reason 0x4 gone). A GPU with fewer than
        # 4 uncapped peers (one left uncapped among capped siblings) is judged the same way at its
        # own limit: a busy GPU that no slowdown explains runs at least the clock its limit allows.
        allowed = _curve().clock_at(np.nan_to_num(limit))
        with np.errstate(invalid="ignore", divide="ignore"):
            pace = sm / allowed
        held = include & capped & ((reasons & SW_POWER_CAP) != 0) & (allowed > 0)
        med_pace, n_pace = group_median(pace, group, n_groups, held)
        ref = np.where(n_pace[group] >= 4, med_pace[group], 1.0)
        with np.errstate(invalid="ignore"):
            by_clock = capped | ((n_power[group] < 4) & (limit > 0))  # (a source without limits: not judged)
        expected_sm = np.where(by_clock, ref * allowed, med_sm[group])
        straggler = uncapped | (include & by_clock & (allowed > 0) & (sm < ratio * expected_sm))
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(by_clock, sm / expected_sm, power / med_power[group])
        self.judge(out, "GpuStraggler", b.slots, straggler, b.now, score,
                   evidence(power_w=power, sm_mhz=sm, util=util, peer_power_w=np.where(by_clock, limit, med_power[group]),
                            peer_sm_mhz=expected_sm, power_limit_w=limit, capped=capped.astype(float),
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
