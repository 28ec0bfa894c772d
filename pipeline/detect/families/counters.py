"""Error counters and flags on GPU telemetry: uncorrectable ECC (counter increments, row
remap pending or failed, or an XID latch), the XID latches, PCIe replay and NVLink CRC
rates (a counter reset is no negative rate), and the frozen power sensor (flat-line).
On every GPU batch it also re-judges the xid family's alerts: the XID latches, and
GpuFellOffBus resolving for a GPU that reports again."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.families.xid import Xid
from pipeline.detect.family import Family, State, evidence
from pipeline.detect.state import CounterDelta, Flatline


class Counters(Family):
    topic = Topic.GPU
    name = "counters"
    raises = ("GpuUncorrectableEcc", "GpuPcieReplayStorm", "GpuNvlinkErrorStorm", "GpuPowerSensorStuck")
    dbe = State("gpu", lambda _: CounterDelta())         # uncorrectable ECC errors
    pcie = State("gpu", lambda _: CounterDelta())        # PCIe replays
    nvlink = State("gpu", lambda _: CounterDelta())      # NVLink CRC errors
    power_flat = State("gpu", lambda _: Flatline())      # identical power readings in a row

    def observe(self, b: GpuBatch) -> None:
        b.power_runs = self.power_flat.update(b.metrics["power_w"], b.slots)  # the siblings distrust a stuck one

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        d, slots, t, m = self.config, b.slots, b.now, b.metrics
        xid = self.engine.family(Xid)
        dbe_delta, _ = self.dbe.update(m["ecc_dbe_volatile_total"], slots, b.ts)
        pending, failure = m["remapped_rows_pending"] == 1, m["remapped_rows_failure"] == 1
        ecc_latched = t < xid.until("GpuUncorrectableEcc")[slots]
        self.judge(out, "GpuUncorrectableEcc", slots, (dbe_delta > 0) | pending | failure | ecc_latched, t,
                   np.nan_to_num(dbe_delta),
                   lambda i: {"what": ", ".join(w for w, on in ((f"DBE counter +{dbe_delta[i]:.0f}", dbe_delta[i] > 0),
                                                                ("row remap pending", pending[i]),
                                                                ("row remap failure", failure[i]),
                                                                ("XID", ecc_latched[i])) if on),
                              "ecc_dbe_volatile_total": float(m["ecc_dbe_volatile_total"][i])})
        for name in ("GpuNvlinkError", "GpuHighSbeRate", "GpuGspError", "GpuXid"):
            latched = t < xid.until(name)[slots]
            self.judge(out, name, slots, latched, t, latched.astype(float), evidence())
        _, pcie_rate = self.pcie.update(m["pcie_replay_total"], slots, b.ts)
        self.judge(out, "GpuPcieReplayStorm", slots, pcie_rate > d.pcie_replay_rate_per_s, t, pcie_rate,
                   evidence(rate_per_s=pcie_rate, threshold_per_s=d.pcie_replay_rate_per_s))
        _, nvlink_rate = self.nvlink.update(m["nvlink_crc_errors_total"], slots, b.ts)
        self.judge(out, "GpuNvlinkErrorStorm", slots, nvlink_rate > d.nvlink_crc_rate_per_s, t, nvlink_rate,
                   evidence(rate_per_s=nvlink_rate, threshold_per_s=d.nvlink_crc_rate_per_s))
        runs = b.power_runs.astype(float)
        self.judge(out, "GpuPowerSensorStuck", slots, runs >= d.stuck_samples, t, runs,
                   evidence(power_w=m["power_w"], samples=runs))
        # A GPU that fell off the bus stays alerted until it reports again (here it did).
        self.judge(out, "GpuFellOffBus", slots, np.zeros(slots.shape[0], bool), t, np.zeros(slots.shape[0]),
                   evidence())
