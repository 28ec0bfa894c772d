"""What the engine hands the detector families: one bus message as row-aligned arrays,
and what they hand back."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa

from pipeline.model import SW_POWER_CAP, Alert

if TYPE_CHECKING:
    from pipeline.detect.families.siblings import SiblingView

log = logging.getLogger("pipeline.detect.engine")


@dataclass
class Output:
    alerts: list[tuple[datetime, Alert]] = field(default_factory=list)
    health: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # rows of the `event` schema (gpu_replaced)
    racks: pa.RecordBatch | None = None  # rack summaries for the site tier (`rack_summary`), where it runs apart


@dataclass
class Stats:
    gpu_samples: int = 0
    facility_samples: int = 0
    events: int = 0
    late_samples: int = 0  # GPU and facility rows behind their series' newest (detect/watermark.py)
    bad_quality: int = 0   # facility readings their BMS marked bad or uncertain (quality not 1)
    invalid_values: dict[str, int] = field(default_factory=dict)
    alerts_fired: int = 0
    alerts_resolved: int = 0


PINNED_SHARE = 0.02  # a GPU within this share under its limit, with reason 0x4, is held there


@dataclass
class GpuBatch:
    """One GPU telemetry batch as arrays, row-aligned. The fields after `reasons` are
    filled by families for the ones after them (see each)."""
    slots: np.ndarray          # series slot of each row
    ts: np.ndarray             # seconds
    now: float                 # the batch's time: its latest sample
    metrics: dict[str, np.ndarray]  # metric -> float64, NaN where null or invalid
    node: np.ndarray           # node index of each row
    rack: np.ndarray           # rack index of each row
    nodes: np.ndarray          # node indices present in the batch
    group: np.ndarray          # each row's position in `nodes` (its peer group: the GPUs of its node)
    reasons: np.ndarray        # clocks event reasons (model.ClockEventReason), int64
    gap: np.ndarray | None = None         # seconds since the GPU's previous sample, NaN for its first (reporting)
    power_runs: np.ndarray | None = None  # identical power readings in a row (counters: flat-line)
    siblings: SiblingView | None = None   # the GPU against its node's siblings (siblings)
    node_hot: np.ndarray | None = None    # per row: NodeThermalAnomaly pending or firing on its node (peers)
    hot: np.ndarray | None = None         # GpuThermalRunaway or GpuOverTemperature pending or firing (over_temperature)
    thermal_alerted: np.ndarray | None = None  # a thermal or coolant alert explains the GPU's heat (over_temperature)

    @property
    def n_groups(self) -> int:
        return self.nodes.shape[0]

    def held_at_limit(self) -> np.ndarray:
        """Per row: its limit holds it (reason 0x4 and within PINNED_SHARE under the limit): it
        draws the limit, steady to the watt, whatever the load (a deep cap's repeats are no stuck
        sensor)."""
        with np.errstate(invalid="ignore"):
            return ((self.reasons & SW_POWER_CAP) != 0) & (
                self.metrics["power_w"] >= (1.0 - PINNED_SHARE) * self.metrics["power_limit_w"])


@dataclass
class FacilityBatch:
    """One facility batch: a row per (device, metric) reading."""
    slots: np.ndarray   # facility point slot of each row
    ts: np.ndarray      # seconds
    now: float          # the batch's time: its latest sample
    value: np.ndarray   # float64, NaN where null or invalid
    kind: np.ndarray    # model.PointKind of each row
    rack: np.ndarray    # rack index of each row (a site's own entry for site-level devices)
    devices: list[str]  # device name of each point slot
    # The readings left out of the batch as their BMS marked them bad (engine._bad_quality): their points'
    # slots and times. Heard, not read: a PDU feed so marked reports, and is no failed-over feed.
    heard_slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    heard_ts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def per_rack(self, judge: Callable, out: Output, name: str, rows: np.ndarray, hit: np.ndarray,
                 score: np.ndarray, evidence: Callable[[int], dict]) -> None:
        """Judge a rack alert on the racks of `rows`: hit where any of its rows hits;
        score and evidence from its first row."""
        if rows.size == 0:
            return
        racks, first = np.unique(self.rack[rows], return_index=True)
        keep = racks >= 0
        any_hit = np.zeros(racks.shape[0], bool)
        np.logical_or.at(any_hit, np.searchsorted(racks, self.rack[rows]), hit)
        judge(out, name, racks[keep], any_hit[keep], self.now, score[first][keep],
              lambda i: evidence(int(rows[first[keep][i]])))


@dataclass
class RackBatch:
    """Rack summaries (model.RACK_SUMMARY) for the site tier: a row per rack."""
    slots: np.ndarray       # rack slot of each row
    ts: np.ndarray          # seconds
    now: float              # the batch's time: its latest summary
    gpu_ref: np.ndarray     # the rack's GPUs at zero power, C (NaN: unknown)
    coolant: np.ndarray     # the rack's mean coolant temperature, C (NaN: unknown)
    explained: np.ndarray   # bool: a rack alert explains a thermal anomaly


@dataclass
class EventBatch:
    """GPU events (the node-level ones raise nothing yet)."""
    rows: pa.RecordBatch  # kind, code, text
    slots: np.ndarray     # GPU slot of each row
    ts: np.ndarray        # seconds


def numeric(batch: pa.RecordBatch, name: str, stats: Stats) -> np.ndarray:
    """A metric column as float64 with NaN for null; NaN, Inf and negative values
    are counted (logged once per column) and turned into NaN so no detector sees them."""
    col = batch.column(name)
    # Not Arrow's cast (a third of the time, on a node's batch): a null comes out as NaN, or
    # None in a bool column, which numpy's float is NaN too.
    x = col.to_numpy(zero_copy_only=False)
    if x.dtype != np.float64:
        x = x.astype(np.float64)  # (an int64 past 2**53: inexact, and judged below like any other value)
    bad = ~((x >= 0) & (x < np.inf))  # NaN, Inf, negative (no comparison of NaN warns)
    if col.null_count:
        bad &= col.is_valid().to_numpy(zero_copy_only=False)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        if name not in stats.invalid_values:
            log.warning("invalid values in %r (NaN, Inf or negative): skipped; counted in stats, logged once", name)
        stats.invalid_values[name] = stats.invalid_values.get(name, 0) + n_bad
        x = np.where(bad, np.nan, x)
    return x


def seconds(batch: pa.RecordBatch) -> np.ndarray:
    """The batch's `ts` column as Unix seconds."""
    return batch.column("ts").cast(pa.int64()).to_numpy() / 1e9
