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

STUCK_BUSY_UTIL = 0.25  # utilisation from which a GPU's power moves every reading
IDLE_MAX_SHARE = 0.25   # no idle GPU draws this share of its limit (an H100 idles at 71 of 700 W): a repeat
                        # above it is a load's reading frozen (its job paused or ended), judged as under load
STUCK_P = 1e-6          # how unlikely an idle run must be, by the GPU's own finished idle runs
IDLE_RUN_RATE = 0.05    # EW weight of each finished idle run in their mean
IDLE_RUNS = 5           # finished idle runs before an idle GPU is judged
IDLE_LONGEST = 3.0      # ... and how much longer than its longest one a run must be, and never shorter than
IDLE_MIN_SAMPLES = 300  # ... this: an idle GPU's level drifts with its temperature, across a whole watt or
                        # onto one, and the runs it finished at one level say little of the next (24 h of the
                        # realistic normal: 20 false alerts with runs of 30 after runs of 1)
LOADED_RATE = 0.002     # EW weight of a loaded reading in the GPU's share of loaded readings that repeat the last
                        # (the plain mean of the first 500)
LOADED_READINGS = 60    # loaded readings seen before that share is trusted (a share under 1/60 is taken as 1/60)
LOADED_STUCK_P = 1e-9   # how unlikely a loaded run must be by that share: a load's steady phases bunch its repeats
LOADED_MIN_S = 120.0    # ... and a run this long at the least (the simulated fleet's steady phases repeat a loaded
                        # GPU's reading for up to 70 s at 10-s scrapes)


class Counters(Family):
    topic = Topic.GPU
    name = "counters"
    raises = ("GpuUncorrectableEcc", "GpuPcieReplayStorm", "GpuNvlinkErrorStorm", "GpuPowerSensorStuck")
    dbe = State("gpu", lambda _: CounterDelta())         # uncorrectable ECC errors
    remapped = State("gpu", lambda _: CounterDelta())    # rows remapped for uncorrectable errors (the one
                                                         # uncorrectable-memory counter of dcgm-exporter's defaults)
    pcie = State("gpu", lambda _: CounterDelta())        # PCIe replays
    nvlink = State("gpu", lambda _: CounterDelta())      # NVLink CRC errors
    power_flat = State("gpu", lambda _: Flatline())      # identical power readings in a row
    # Per GPU: its power reading's current run of repeats and last value; the mean and longest of
    # the idle runs it finished with a flicker, and how many; the highest limit it reported.
    repeats = State("gpu", fields={"run": (np.float64, 0.0), "last_w": (np.float64, np.nan),
                                   "idle_run": (np.float64, np.nan), "idle_longest": (np.float64, 0.0),
                                   "idle_runs": (np.float64, 0.0), "top_limit_w": (np.float64, np.nan),
                                   "loaded_repeat": (np.float64, np.nan), "loaded_seen": (np.float64, 0.0),
                                   "run_from": (np.float64, np.nan)})

    def observe(self, b: GpuBatch) -> None:
        b.power_runs = self.power_flat.update(b.metrics["power_w"], b.slots)  # the siblings distrust a stuck one

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        d, slots, t, m = self.config, b.slots, b.now, b.metrics
        xid = self.engine.family(Xid)
        dbe_delta, _ = self.dbe.update(m["ecc_dbe_volatile_total"], slots, b.ts)
        remapped, _ = self.remapped.update(m["remapped_rows_uncorrectable"], slots, b.ts)
        pending, failure = m["remapped_rows_pending"] == 1, m["remapped_rows_failure"] == 1
        ecc_latched = t < xid.until("GpuUncorrectableEcc")[slots]
        self.judge(out, "GpuUncorrectableEcc", slots, (dbe_delta > 0) | (remapped > 0) | pending | failure | ecc_latched,
                   t, np.nan_to_num(dbe_delta),
                   lambda i: {"what": ", ".join(w for w, on in ((f"DBE counter +{dbe_delta[i]:.0f}", dbe_delta[i] > 0),
                                                                (f"rows remapped +{remapped[i]:.0f}", remapped[i] > 0),
                                                                ("row remap pending", pending[i]),
                                                                ("row remap failure", failure[i]),
                                                                ("XID", ecc_latched[i])) if on),
                              "ecc_dbe_volatile_total": float(m["ecc_dbe_volatile_total"][i]),
                              "remap_failure": bool(failure[i])})  # the catalog's remediation: replace
        for name in ("GpuNvlinkError", "GpuHighSbeRate", "GpuGspError", "GpuXid"):
            latched = t < xid.until(name)[slots]
            self.judge(out, name, slots, latched, t, latched.astype(float), evidence())
        _, pcie_rate = self.pcie.update(m["pcie_replay_total"], slots, b.ts)
        self.judge(out, "GpuPcieReplayStorm", slots, pcie_rate > d.pcie_replay_rate_per_s, t, pcie_rate,
                   evidence(rate_per_s=pcie_rate, threshold_per_s=d.pcie_replay_rate_per_s))
        _, nvlink_rate = self.nvlink.update(m["nvlink_crc_errors_total"], slots, b.ts)
        self.judge(out, "GpuNvlinkErrorStorm", slots, nvlink_rate > d.nvlink_crc_rate_per_s, t, nvlink_rate,
                   evidence(rate_per_s=nvlink_rate, threshold_per_s=d.nvlink_crc_rate_per_s))
        # A reading frozen to the last digit is a stuck sensor where readings move: under load.
        # At idle they may not (an H100 idles at 71.0 +- 0.2 W: read to 1 W, it repeats for
        # minutes, some GPUs far longer than others): an idle GPU is judged by the idle runs
        # it has finished with a flicker (a change under 1% of the reading; a load starting or
        # ending is no idle run): a run must be as unlikely as STUCK_P by their mean
        # (geometric) and IDLE_LONGEST x the longest, and last IDLE_MIN_SAMPLES; until IDLE_RUNS
        # of them, not judged idle.
        rep = self.repeats
        rep.ensure(self.inventory.gpu_count)
        power = m["power_w"]
        runs = b.power_runs.astype(float)
        prev, last = rep.run[slots], rep.last_w[slots]
        with np.errstate(invalid="ignore"):
            top = np.fmax(rep.top_limit_w[slots], m["power_limit_w"])  # its default: a cap holds idle GPUs too
            rep.top_limit_w[slots] = top
            idle = (m["util_gpu"] < STUCK_BUSY_UTIL) & ~(power > IDLE_MAX_SHARE * top)
            ended = idle & (runs == 0) & (prev > 0) & (np.abs(power - last) <= 0.01 * np.abs(last))
        mean = rep.idle_run[slots]
        mean = np.where(ended, np.where(np.isnan(mean), prev, mean + IDLE_RUN_RATE * (prev - mean)), mean)
        longest = np.where(ended, np.fmax(rep.idle_longest[slots], prev), rep.idle_longest[slots])
        count = rep.idle_runs[slots] + ended
        rep.idle_run[slots], rep.idle_longest[slots], rep.idle_runs[slots] = mean, longest, count
        rep.run[slots], rep.last_w[slots] = runs, np.where(np.isfinite(power), power, last)
        with np.errstate(divide="ignore", invalid="ignore"):
            unlikely = np.log(STUCK_P) / np.log(mean / (mean + 1.0))
        idle_need = np.where(count >= IDLE_RUNS, np.fmax(np.fmax(np.ceil(unlikely), IDLE_LONGEST * longest),
                                                         IDLE_MIN_SAMPLES), np.inf)
        need = np.where(idle, np.maximum(d.stuck_samples, idle_need), self._loaded_need(b, runs, idle, top))
        self.judge(out, "GpuPowerSensorStuck", slots, runs >= need, t, runs,
                   evidence(power_w=m["power_w"], samples=runs))
        # A GPU that fell off the bus stays alerted until it reports again (here it did).
        self.judge(out, "GpuFellOffBus", slots, np.zeros(slots.shape[0], bool), t, np.zeros(slots.shape[0]),
                   evidence())

    def _loaded_need(self, b: GpuBatch, runs: np.ndarray, idle: np.ndarray, top: np.ndarray) -> np.ndarray:
        """Repeats in a row that make a loaded GPU's power sensor stuck: `stuck_samples`, tuned at
        1-s scrapes (30 s). Read further apart (dcgm-exporter's 30 s: 15 minutes, longer than the
        stuck sensors of a simulated day lasted), fewer: a run that has lasted LOADED_MIN_S and is
        as unlikely as LOADED_STUCK_P by the share of the GPU's own loaded readings that repeat the
        last (p^n; 6 readings at least), once it has shown LOADED_READINGS. Not while a limit holds
        the GPU (a cap, or its own limit at full load: a real H200 held there repeats its reading to
        the watt 10-50% of the time), nor where the source sends no clocks event reasons or no
        enforced limit to tell (dcgm-exporter's default counters). A run's own readings past
        LOADED_MIN_S do not teach the share (a stuck sensor would teach it that it repeats)."""
        d, rep, slots = self.config, self.repeats, b.slots
        power, limit = b.metrics["power_w"], b.metrics["power_limit_w"]
        held = b.held_at_limit() | (limit < top - 1.0)
        told = np.isfinite(b.metrics["clock_event_reasons"]) & np.isfinite(limit)
        run_from = np.where(runs == 0, b.ts, rep.run_from[slots])  # (when the run's first reading came)
        rep.run_from[slots] = run_from
        lasted_s = b.ts - run_from
        learn = ~idle & np.isfinite(power) & ~held & told & (lasted_s < LOADED_MIN_S)
        repeat = (runs > 0).astype(float)
        share, seen = rep.loaded_repeat[slots], rep.loaded_seen[slots]
        weight = np.maximum(LOADED_RATE, 1.0 / (seen + 1.0))
        share = np.where(learn, np.nan_to_num(share) + weight * (repeat - np.nan_to_num(share)), share)
        seen = seen + learn
        rep.loaded_repeat[slots], rep.loaded_seen[slots] = share, seen
        with np.errstate(divide="ignore", invalid="ignore"):
            unlikely = np.ceil(np.log(LOADED_STUCK_P) / np.log(np.fmax(share, 1.0 / LOADED_READINGS)))
        judged = (seen >= LOADED_READINGS) & (share < 1.0) & ~held & told & (lasted_s >= LOADED_MIN_S)
        return np.where(judged, np.minimum(d.stuck_samples, unlikely), d.stuck_samples)
