"""The detection engine: telemetry and events in, alert state changes and node health out.

One `process(message)` call per bus message. Every detector runs over the whole
batch at once (numpy expressions and Numba kernels over flat state arrays); Python
runs per row only for the rare things: a series never seen before, an XID event,
an alert that changes state.

Detectors (README, "Detection", explains each in operator terms):
- hard rules: XID events, uncorrectable ECC counter increments and row-remap
  flags, leak sensors, a GPU or node that stops reporting;
- rates: PCIe replay and NVLink CRC counters (counter resets are not negative rates);
- thresholds: GPU temperature, PDU load against rating, site power against its cap;
- clocks event reasons: HW power brake per node; HW or thermal slowdown that no other
  alert explains;
- peers: a node's GPU temperatures against the rack's other nodes at the same power;
  GPU temperature against its node's median (runaway: a large excess, or a
  smaller one still rising against its own recent average), power and SM clock
  against the node's median at full utilisation (straggler), HW power brake;
- statistics (Numba): EWMA baseline of coolant flow (flow loss), CUSUM of the
  GPU's temperature excess over its peers (slow drift), flat-line of the power
  sensor (stuck).
Correlation: a rack with a coolant alert pending or firing suppresses the
over-temperature alerts of its GPUs; a GPU that fell off the bus does not also
raise GpuNotReporting.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.base import Message, Topic
from pipeline.config import Config
from pipeline.detect import kernels
from pipeline.detect.catalog import DETECTOR_ALERTS, XID_ALERTS
from pipeline.detect.health import NodeHealth, NodeIdentity, Tracker
from pipeline.detect.state import CounterDelta, Cusum, EwmaZ, Flatline, KeyIndex, SlotArrays, group_median
from pipeline.model import GPU_METRICS, Alert

log = logging.getLogger(__name__)

HW_SLOWDOWN_BITS = 0x8 | 0x20 | 0x40 | 0x80  # HW slowdown, SW/HW thermal, HW power brake
POWER_BRAKE = 0x80
FORCED_SLOWDOWN = 0x8 | 0x20 | 0x40  # HW slowdown, SW thermal, HW thermal: clocks forced down
THERMAL_TAU_S = 6.5  # slow thermal time constant of an H100 (the recorded trace, sources/recordings/h100)
RISE_TAU_S = 20.0    # memory of the average a rising temperature excess is compared with
DRIFT_MIN_UTIL = 0.25  # utilisation from which a GPU is under load for the drift detector
KIND_OTHER, KIND_LEAK, KIND_FLOW, KIND_PDU_POWER, KIND_SITE_POWER, KIND_SUPPLY, KIND_RETURN = range(7)
COOLANT_ALERTS = ("CoolantFlowLoss", "CoolantLeak")
CP_COOLANT = 4186.0  # J/(kg K) of water; a litre of coolant is ~1 kg

# Which tracker each alertname uses; fire_after None = the configured soft value.
_HARD = {"GpuFellOffBus", "GpuUncorrectableEcc", "GpuNvlinkError", "GpuHighSbeRate", "GpuGspError", "GpuXid",
         "CoolantLeak"}
_DETECTOR = {
    "GpuFellOffBus": "xid", "GpuUncorrectableEcc": "ecc", "GpuNvlinkError": "xid", "GpuHighSbeRate": "xid",
    "GpuGspError": "xid", "GpuXid": "xid", "GpuNotReporting": "staleness", "NodeNotReporting": "staleness",
    "GpuOverTemperature": "threshold", "GpuThermalRunaway": "peer_temperature", "GpuThermalDrift": "cusum",
    "GpuStraggler": "peer_performance", "NodeThermalAnomaly": "peer_node_temperature", "NodePowerBrake": "clock_reasons", "GpuHwSlowdown": "clock_reasons", "GpuPcieReplayStorm": "counter_rate",
    "GpuNvlinkErrorStorm": "counter_rate", "GpuPowerSensorStuck": "flatline", "CoolantFlowLoss": "ewma",
    "CoolantLeak": "leak_sensor", "PduOverload": "threshold", "SitePowerOverCap": "threshold",
    "RackThermalAnomaly": "peer_rack_temperature", "RackHeatImbalance": "heat_balance",
}


@dataclass
class Output:
    alerts: list[tuple[datetime, Alert]] = field(default_factory=list)
    health: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # rows of the `event` schema (gpu_replaced)


@dataclass
class Stats:
    gpu_samples: int = 0
    facility_samples: int = 0
    events: int = 0
    invalid_values: dict[str, int] = field(default_factory=dict)
    alerts_fired: int = 0
    alerts_resolved: int = 0


@dataclass
class GpuBatch:
    """One GPU telemetry batch as arrays, row-aligned, shared by the detector families."""
    slots: np.ndarray        # series slot of each row
    ts: np.ndarray           # seconds
    t: float                 # the batch's time: its latest sample
    gap: np.ndarray          # seconds since the GPU's previous sample; NaN for its first
    m: dict[str, np.ndarray]  # metric -> float64, NaN where null or invalid
    rack: np.ndarray         # rack index of each row
    local_nodes: np.ndarray  # node indices present in the batch
    local: np.ndarray        # each row's position in local_nodes (the peer group)
    reasons: np.ndarray      # clocks event reasons, int64
    power_runs: np.ndarray   # identical power readings in a row (flat-line)
    thermal_alerted: np.ndarray | None = None  # a thermal or coolant alert explains the GPU's heat (_thermal)


def _lag(prev: np.ndarray, x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """A first-order lag of x with weight a per sample: it starts at x and holds through NaN."""
    return np.where(np.isnan(prev), x, np.where(np.isnan(x), prev, prev + a * (x - prev)))


def _evidence(**values):
    """Evidence for row i: arrays are read at i, scalars taken as they are."""
    return lambda i: {k: (float(v[i]) if isinstance(v, np.ndarray) else v) for k, v in values.items()}


class Engine:
    def __init__(self, cfg: Config, node_staleness: bool = True) -> None:
        kernels.warm_up()  # compile or load from cache now, not on the first sample
        self.cfg = cfg
        self.node_staleness = node_staleness  # needs all nodes' data in one order (see _staleness)
        d = self.d = cfg.detect
        self.stats = Stats()
        self._current: pa.RecordBatch | None = None
        # Identities: GPU UUID -> slot, node name -> index, site/rack -> index, device/metric -> slot.
        self.gpus = KeyIndex(self._new_gpus)
        self.nodes = KeyIndex(self._new_nodes)
        self.racks = KeyIndex(self._new_racks)
        self.points = KeyIndex(self._new_points)
        self.g = SlotArrays({"node": (np.int64, -1), "index": (np.int64, 0), "last_seen": (np.float64, np.nan),
                             "interval": (np.float64, np.nan), "offbus": (np.bool_, False),
                             "p_slow": (np.float64, np.nan), "excess_slow": (np.float64, np.nan),
                             "retired": (np.bool_, False)})  # replaced by another UUID in its (node, index)
        self.n = SlotArrays({"rack": (np.int64, -1), "last_seen": (np.float64, np.nan),
                             "interval": (np.float64, np.nan), "ref_temp": (np.float64, np.nan)})
        self.p = SlotArrays({"rack": (np.int64, -1), "kind": (np.int8, KIND_OTHER)})
        # Per rack: the latest coolant readings, and the delta-T its PDU's power predicts,
        # through the coolant's lag.
        self.r = SlotArrays({"supply_c": (np.float64, np.nan), "return_c": (np.float64, np.nan),
                             "flow_lpm": (np.float64, np.nan), "expected_dt": (np.float64, np.nan),
                             "power_t": (np.float64, np.nan)})
        self.rack_site: list[int] = []  # site index of each rack slot (racks of one site are peers)
        self.site_index: dict[str, int] = {}
        self.node_names: list[str] = []
        self.rack_names: list[tuple[str, str]] = []   # (site, rack)
        self.point_devices: list[str] = []
        self.g_count = 0  # GPUs known
        # XID latches: the alert stays firing until this time (per GPU slot).
        self.xid_until = {name: SlotArrays({"until": (np.float64, -np.inf)})
                          for name in sorted(set(XID_ALERTS.values()) - {"GpuFellOffBus"} | {"GpuXid"})}
        # Stateful detectors.
        self.dbe = CounterDelta()
        self.pcie = CounterDelta()
        self.nvlink = CounterDelta()
        self.power_flat = Flatline()
        self.drift = Cusum(d.drift_baseline_halflife_s, d.cusum_slack_c, d.cusum_limit, d.warmup_samples)
        self.flow = EwmaZ(d.ewma_halflife_s, d.z_threshold, d.warmup_samples, d.relearn_samples)
        fire_after = {name: 1 for name in _HARD} | {"GpuThermalDrift": d.drift_confirm_samples}
        self.trackers = {spec.name: Tracker(spec, _DETECTOR[spec.name], fire_after.get(spec.name, d.fire_after),
                                            d.resolve_after, self._labels_getter(spec.scope),
                                            cfg.alerts.runbook_base_url)
                         for spec in DETECTOR_ALERTS}
        self.health = NodeHealth()
        self._gpu_at: dict[tuple[int, int], int] = {}  # (node, GPU index) -> the slot of the GPU there now
        self._replaced: list[tuple[int, int]] = []     # (old slot, new slot) seen, not yet handled
        self._resume_pending = False                   # see resume()

    # ---- identities ------------------------------------------------------------

    def _new_nodes(self, keys: pa.Array, rows: np.ndarray) -> None:
        b = self._current
        rack_keys = pc.binary_join_element_wise(b.column("site").take(rows), b.column("rack").take(rows), "/")
        racks = self.racks.slots(rack_keys)
        start = len(self.node_names)
        self.node_names.extend(keys.to_pylist())
        self.n.ensure(len(self.node_names))
        self.n.rack[start:start + len(rows)] = racks

    def _new_racks(self, keys: pa.Array, rows: np.ndarray) -> None:
        for key in keys.to_pylist():
            site, rack = key.split("/", 1)
            self.rack_names.append((site, rack))
            self.rack_site.append(self.site_index.setdefault(site, len(self.site_index)))

    def _new_gpus(self, keys: pa.Array, rows: np.ndarray) -> None:
        b = self._current
        # Look up the whole column so that new nodes' row positions refer to this batch.
        nodes = self.nodes.slots(b.column("node"))[rows]
        start = self.g_count
        self.g_count = start + len(rows)
        self.g.ensure(self.g_count)
        self.g.node[start:self.g_count] = nodes
        self.g.index[start:self.g_count] = b.column("gpu").take(rows).to_numpy(zero_copy_only=False)
        for s in range(start, self.g_count):  # a UUID new in a (node, index) that has one: a replacement?
            key = (int(self.g.node[s]), int(self.g.index[s]))
            old = self._gpu_at.get(key)
            if old is not None and not self.g.retired[old]:
                self._replaced.append((old, s))
            self._gpu_at[key] = s

    def _new_points(self, keys: pa.Array, rows: np.ndarray) -> None:
        b = self._current
        start = len(self.point_devices)
        n = len(rows)
        self.p.ensure(start + n)
        devices = b.column("device").take(rows).to_pylist()
        metrics = b.column("metric").take(rows).to_pylist()
        racks = b.column("rack").take(rows).to_pylist()
        sites = b.column("site").take(rows).to_pylist()
        for i, (dev, metric, rack, site) in enumerate(zip(devices, metrics, racks, sites)):
            kind = (KIND_LEAK if metric == "leak" else KIND_FLOW if metric == "flow_lpm"
                    else KIND_SUPPLY if metric == "supply_temp_c" else KIND_RETURN if metric == "return_temp_c"
                    else KIND_PDU_POWER if metric == "power_w" and dev.startswith("pdu")
                    else KIND_SITE_POWER if metric == "power_w" and not rack else KIND_OTHER)
            self.p.kind[start + i] = kind
            # Site-level devices (the main meter) belong to the site's entry, rack "".
            self.p.rack[start + i] = self.racks.slots(pa.array([f"{site}/{rack}"]))[0]
        self.point_devices.extend(devices)

    def _labels_getter(self, scope: str):
        def gpu(slot: int) -> dict[str, str]:
            return {**node(int(self.g.node[slot])), "gpu": str(int(self.g.index[slot]))}

        def node(n: int) -> dict[str, str]:
            return {**rack(int(self.n.rack[n])), "node": self.node_names[n]}

        def rack(r: int) -> dict[str, str]:
            site, name = self.rack_names[r]
            return {"site": site, "rack": name}
        return {"gpu": gpu, "node": node, "rack": rack}[scope]

    def state(self) -> dict[str, dict[str, SlotArrays]]:
        """Every per-series state array, by the scope its slots index (gpu, node, rack,
        point), named for checkpoints (detect/checkpoint.py). Identity arrays (which node
        a GPU is on, which rack a node is in) are not state: they come with the keys."""
        def every(arrays: SlotArrays) -> tuple[SlotArrays, tuple[str, ...]]:
            return arrays, arrays.fields
        gpu = {"gpu": (self.g, ("last_seen", "interval", "offbus", "p_slow", "excess_slow")),
               **{name: every(d.s) for name, d in (("dbe", self.dbe), ("pcie", self.pcie), ("nvlink", self.nvlink),
                                                    ("power_flat", self.power_flat), ("drift", self.drift))},
               **{f"xid.{name}": every(arr) for name, arr in self.xid_until.items()}}
        out = {"gpu": gpu, "node": {"node": (self.n, ("last_seen", "interval", "ref_temp"))},
               "rack": {"rack": every(self.r)},
               "point": {"flow": every(self.flow.s)}}
        for name, tr in self.trackers.items():
            out[tr.spec.scope][f"tracker.{name}"] = every(tr.s)
        return out

    def identities(self, scope: str) -> pa.RecordBatch:
        """Every known entity of a scope, in slot order, with the labels that identify it
        and `owner`: the bus key its data arrives under (node; rack, or site for site-level
        facility devices)."""
        nodes = np.asarray(self.node_names, dtype=object)
        sites = np.asarray([s for s, _ in self.rack_names], dtype=object)
        racks = np.asarray([r for _, r in self.rack_names], dtype=object)
        if scope == "gpu":
            node = self.g.node[:self.g_count]
            rack = self.n.rack[node]
            cols = {"gpu_uuid": self.gpus.keys, "node": nodes[node], "site": sites[rack], "rack": racks[rack],
                    "gpu": self.g.index[:self.g_count],
                    "owner": np.where(self.g.retired[:self.g_count], None, nodes[node])}  # retired: no partition
        elif scope == "node":
            rack = self.n.rack[:len(nodes)]
            cols = {"node": nodes, "site": sites[rack], "rack": racks[rack], "owner": nodes}
        elif scope == "rack":  # a site's own entry (rack "") arrives keyed by the site
            cols = {"site": sites, "rack": racks, "owner": np.where(racks == "", sites, racks)}
        else:
            rack = self.p.rack[:len(self.point_devices)]
            parts = pc.split_pattern(self.points.keys, "/", max_splits=1)
            cols = {"device": pc.list_element(parts, 0), "metric": pc.list_element(parts, 1),
                    "site": sites[rack], "rack": racks[rack],
                    "owner": np.where(racks[rack] == "", sites[rack], racks[rack])}
        return pa.RecordBatch.from_pydict({k: pa.array(v, pa.int16() if k == "gpu" else pa.string())
                                           if not isinstance(v, pa.Array) else v for k, v in cols.items()})

    def slots_for(self, scope: str, ids: pa.RecordBatch) -> np.ndarray:
        """Slots of the entities in `ids` (columns as `identities` gives them), registering
        the ones never seen."""
        self._current = ids
        if scope == "gpu":
            return self.gpus.slots(ids.column("gpu_uuid"))
        if scope == "node":
            return self.nodes.slots(ids.column("node"))
        if scope == "rack":
            return self.racks.slots(pc.binary_join_element_wise(ids.column("site"), ids.column("rack"), "/"))
        return self.points.slots(pc.binary_join_element_wise(ids.column("device"), ids.column("metric"), "/"))

    def node_identity(self, n: int) -> NodeIdentity:
        site, rack = self.rack_names[int(self.n.rack[n])]
        return NodeIdentity(site, rack, self.node_names[n])

    # ---- entry point -------------------------------------------------------------

    def process(self, message: Message) -> Output:
        batch = message.value
        if batch.num_rows == 0:
            return Output()
        self._current = batch
        out = Output()
        if message.topic == Topic.GPU:
            self._gpu(batch, out)
        elif message.topic == Topic.FACILITY:
            self._facility(batch, out)
        elif message.topic == Topic.EVENTS:
            self._events(batch, out)
        if out.alerts:
            self.stats.alerts_fired += sum(a.ends_at is None for _, a in out.alerts)
            self.stats.alerts_resolved += sum(a.ends_at is not None for _, a in out.alerts)
            out.health = self._node_health(max(ts for ts, _ in out.alerts).timestamp())
        return out

    def resume(self) -> None:
        """Continue after a restored checkpoint of a process that stopped (the embedded
        daemon's restart), not one handed over live (Kafka): the time it was down is no
        silence of the fleet's. The first GPU batch moves every GPU's and node's last-seen
        time by the jump from the checkpoint's latest sample to its own, so staleness and
        reporting intervals go on as if the data had not paused: no GpuNotReporting or
        NodeNotReporting for the downtime, no reporting interval stretched by it."""
        self._resume_pending = True

    def latest_data_time(self) -> float | None:
        """Unix seconds of the latest GPU sample seen (None before any)."""
        seen = self.n.last_seen[:len(self.node_names)]
        return float(np.nanmax(seen)) if np.isfinite(seen).any() else None

    def _resume_clock(self, t: float) -> None:
        self._resume_pending = False
        last = self.latest_data_time()
        if last is None:
            return
        jump = t - last
        self.g.last_seen[:self.g_count] += jump
        self.n.last_seen[:len(self.node_names)] += jump
        log.info("detect: resumed from the checkpoint; data continues %.0f s after its latest sample "
                 "(not counted as silence)", jump)

    def _replacements(self, out: Output, present: np.ndarray, t: float) -> None:
        """A (node, GPU index) reporting under another UUID: the GPU was replaced (or a
        retired one put back). Rare: plain Python."""
        g = self.g
        pairs, self._replaced = self._replaced, []
        for s in np.unique(present[g.retired[present]]).tolist():  # a retired GPU reports again
            cur = self._gpu_at.get((int(g.node[s]), int(g.index[s])))
            if cur is not None and cur != s and not g.retired[cur]:
                pairs.append((cur, s))
            else:
                g.retired[s] = False
        here = set(present.tolist())
        for old, new in pairs:
            key = (int(g.node[new]), int(g.index[new]))
            if old in here:  # both report: two GPUs claim one index, which is no replacement
                g.retired[new] = False
                self._gpu_at[key] = old
                log.warning("detect: %s and %s both report as GPU %d of %s; kept apart as two series",
                            self.gpus.keys[old].as_py(), self.gpus.keys[new].as_py(), key[1], self.node_names[key[0]])
                continue
            self._gpu_at[key] = new
            self._retire(out, old, new, t)

    def _retire(self, out: Output, old: int, new: int, t: float) -> None:
        """Retire the replaced GPU's series: its alerts resolve, its state is dropped, it is
        no longer expected to report (no GpuNotReporting) nor checkpointed. The new GPU's
        series starts fresh (warm-up); a `gpu_replaced` event says what happened."""
        now = datetime.fromtimestamp(t, timezone.utc)
        one = np.array([old])
        for tr in self.trackers.values():
            if tr.spec.scope == "gpu":
                if old in tr.active:
                    out.alerts.append((now, dataclasses.replace(tr.active[old], ends_at=now)))
                tr.forget(one)
        for arrays, fields in self.state()["gpu"].values():
            arrays.ensure(old + 1)
            arrays.reset(one, fields)
        self.g.retired[old], self.g.retired[new] = True, False
        labels = self._labels_getter("gpu")(new)
        old_uuid, new_uuid = self.gpus.keys[old].as_py(), self.gpus.keys[new].as_py()
        text = f"GPU {labels['gpu']} of {labels['node']} replaced: {old_uuid} -> {new_uuid}"
        out.events.append({"ts": now, "site": labels["site"], "rack": labels["rack"], "node": labels["node"],
                           "gpu": int(labels["gpu"]), "gpu_uuid": new_uuid, "kind": "gpu_replaced", "code": None,
                           "text": text})
        log.info("detect: %s; the old series is retired", text)

    def active_alerts(self) -> list[Alert]:
        return [a for t in self.trackers.values() for a in t.active.values()]

    def _eval(self, out: Output, name: str, entities: np.ndarray, hit: np.ndarray, t: float,
              score: np.ndarray, evidence) -> None:
        out.alerts.extend(self.trackers[name].update(entities, hit, t, score, evidence))

    # ---- sanitising --------------------------------------------------------------

    def _numeric(self, batch: pa.RecordBatch, name: str) -> np.ndarray:
        """A metric column as float64 with NaN for null; NaN, Inf and negative values
        are counted (logged once per column) and turned into NaN so no detector sees them."""
        col = batch.column(name)
        x = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(x) | (x < 0)
        if col.null_count:
            bad &= col.is_valid().to_numpy(zero_copy_only=False)
        n_bad = int(np.count_nonzero(bad))
        if n_bad:
            if name not in self.stats.invalid_values:
                log.warning("invalid values in %r (NaN, Inf or negative): skipped; counted in stats, logged once", name)
            self.stats.invalid_values[name] = self.stats.invalid_values.get(name, 0) + n_bad
            x = np.where(bad, np.nan, x)
        return x

    # ---- GPU telemetry ---------------------------------------------------------

    def _gpu(self, batch: pa.RecordBatch, out: Output) -> None:
        slots = self.gpus.slots(batch.column("gpu_uuid"))
        ts = batch.column("ts").cast(pa.int64()).to_numpy() / 1e9
        if self._replaced or self.g.retired[slots].any():
            self._replacements(out, slots, float(ts.max()))
        if self._resume_pending:
            self._resume_clock(float(ts.max()))
        self.stats.gpu_samples += batch.num_rows
        m = {name: self._numeric(batch, name) for name in GPU_METRICS}
        g, nd = self.g, self.n
        node = g.node[slots]

        # Reporting cadence, for staleness.
        gap = ts - g.last_seen[slots]
        seen_before = np.isfinite(gap) & (gap > 0)
        g.interval[slots] = np.where(seen_before, np.where(np.isnan(g.interval[slots]), gap,
                                                           0.9 * g.interval[slots] + 0.1 * gap), g.interval[slots])
        g.last_seen[slots] = ts
        nd.last_seen[node] = ts
        nd.interval[node] = g.interval[slots]
        g.offbus[slots] = False  # a GPU that reports is on the bus again

        local_nodes, local = np.unique(node, return_inverse=True)
        b = GpuBatch(slots=slots, ts=ts, t=float(ts.max()), gap=np.where(seen_before, gap, np.nan), m=m,
                     rack=nd.rack[node], local_nodes=local_nodes, local=local,
                     reasons=np.nan_to_num(m["clock_event_reasons"]).astype(np.int64),
                     power_runs=self.power_flat.update(m["power_w"], slots))
        self._thermal(b, out)
        self._performance(b, out)
        self._counters(b, out)
        self._staleness(out, local_nodes, b.t)

    def _thermal(self, b: GpuBatch, out: Output) -> None:
        """Runaway and drift against peers, over-temperature, with one alert per problem."""
        d, g, slots, local, n_local = self.d, self.g, b.slots, b.local, b.local_nodes.shape[0]
        temp, power, util = b.m["gpu_temp_c"], b.m["power_w"], b.m["util_gpu"]
        # Each GPU's temperature at its peers' power: what the GPU's own power explains is
        # taken out before comparing it with the median of its node. Temperature follows
        # power through two lags (H100 trace: ~60% at once, the rest with tau 6.5 s), so it
        # reflects 0.6 P + 0.4 P_slow. A power reading that repeats exactly is not trusted
        # (a stuck sensor): that GPU is taken to draw its peers' median, in P_slow as well,
        # so that the real reading coming back later is not a jump in the excess.
        stuck = b.power_runs >= 3
        med_power, _ = group_median(np.where(stuck, np.nan, power), local, n_local)
        power = np.where(stuck, med_power[local], power)
        a = 1.0 - np.exp(-np.nan_to_num(b.gap, nan=1.0) / THERMAL_TAU_S)
        p_prev = g.p_slow[slots]
        p_slow = _lag(p_prev, power, a)
        g.p_slow[slots] = p_slow
        p_eff = 0.6 * power + 0.4 * p_slow
        med_p_eff, _ = group_median(p_eff, local, n_local)
        p_eff = np.where(np.isnan(p_eff), med_p_eff[local], p_eff)
        adj_temp = temp - d.thermal_c_per_w * (p_eff - med_p_eff[local])
        med_temp, n_temp = group_median(adj_temp, local, n_local)
        peer_c = med_temp[local]
        residual = np.where(n_temp[local] >= 3, adj_temp - peer_c, np.nan)
        cooling_bad = self._rack_cooling_alerted()[b.rack]

        # One alert per problem: a coolant problem of the rack explains its GPUs'
        # temperatures; a runaway explains the GPU's high temperature and its drift; a
        # drift already alerted on the GPU is the same problem growing.
        drift_tracker = self.trackers["GpuThermalDrift"]
        drift_tracker.s.ensure(self.g_count)
        # Rate of change: a runaway is an excess that keeps rising. Against its own average
        # of the last ~RISE_TAU_S, a GPU ramping at 0.15 C/s is ~2.7 C up, a hot but steady
        # one is not; that catches it at the early excess instead of the full one.
        prev = g.excess_slow[slots]
        a_rise = 1.0 - np.exp(-np.nan_to_num(b.gap, nan=1.0) / RISE_TAU_S)
        g.excess_slow[slots] = _lag(prev, residual, a_rise)
        rise = residual - prev
        # Only at steady power, on the GPU and across its node: right after a load starts or
        # stops the temperatures lag their power (the H100 replay shows 8 C swings), and
        # that is not a runaway. A runaway heats up at constant power.
        swing = np.abs(power - p_slow)
        node_swing, _ = group_median(swing, local, n_local)
        steady = (swing < d.runaway_steady_w) & (node_swing[local] < d.runaway_steady_w)
        runaway = (residual > d.peer_temp_excess_c) | (steady & (residual > d.runaway_early_c)
                                                       & (rise > d.runaway_rise_c))
        self._eval(out, "GpuThermalRunaway", slots, runaway & ~drift_tracker.s.firing[slots],
                   b.t, residual, _evidence(temp_c=temp, excess_c=residual, rise_c=rise, peer_median_c=peer_c,
                                            power_w=b.m["power_w"], peer_power_w=med_p_eff[local],
                                            threshold_c=d.peer_temp_excess_c, early_threshold_c=d.runaway_early_c,
                                            rise_threshold_c=d.runaway_rise_c))
        node_hot = self._node_against_rack(b, out, med_temp, med_p_eff, n_temp, node_swing)[local]
        runaway = self.trackers["GpuThermalRunaway"].pending_or_firing(self.g_count)[slots]
        # The thermal margin is to the GPU's own slowdown threshold (NVML), where it is known.
        slowdown = b.m["slowdown_temp_c"]
        known = np.isfinite(slowdown)
        limit = np.where(known, slowdown - d.thermal_margin_c, d.gpu_temp_limit_c)
        self._eval(out, "GpuOverTemperature", slots, (temp >= limit) & ~cooling_bad & ~runaway & ~node_hot,
                   b.t, temp, lambda i: {"temp_c": float(temp[i]), "limit_c": float(limit[i]),
                                         "slowdown_c": float(slowdown[i]), "peer_median_c": float(peer_c[i]),
                                         "limit_why": f"{d.thermal_margin_c:g} C under its HW slowdown at "
                                                      f"{slowdown[i]:.0f} C" if known[i] else "detect.gpu_temp_limit_c"})
        hot = runaway | self.trackers["GpuOverTemperature"].pending_or_firing(self.g_count)[slots]
        b.thermal_alerted = hot | cooling_bad | node_hot
        # The drift detector reads only samples under load: a degrading cold plate shows
        # there, while at idle integer temperatures and gain spread move the excess by ~2 C.
        # Light jobs count (a memory-bound job at 40% utilisation runs for hours). It neither
        # learns nor accumulates while the rack's coolant or the GPU's clocks are forced, or
        # while a faster thermal fault is alerted.
        forced = ~(util >= DRIFT_MIN_UTIL) | cooling_bad | hot | ((b.reasons & HW_SLOWDOWN_BITS) != 0)
        drift = self.drift.update(np.where(forced, np.nan, residual), slots)
        excess = residual - self.drift.s.mean[slots]
        seen = np.flatnonzero(np.isfinite(drift))  # unobserved samples neither raise nor clear it
        self._eval(out, "GpuThermalDrift", slots[seen], (drift[seen] >= 1.0) & (excess[seen] > d.cusum_slack_c), b.t,
                   drift[seen], _evidence(temp_c=temp[seen], excess_c=excess[seen], cusum_score=drift[seen],
                                          peer_median_c=peer_c[seen]))

    def _node_against_rack(self, b: GpuBatch, out: Output, med_temp: np.ndarray, med_p_eff: np.ndarray,
                           n_temp: np.ndarray, node_swing: np.ndarray) -> np.ndarray:
        """Peers one level up: a node whose GPUs all run hotter than the rack's other nodes
        at the same power (a restricted coolant branch, a failing node manifold), which
        the GPU-against-siblings detector cannot see. Each node's median GPU temperature
        is taken to zero power (the linear rise per watt) so that busy and idle nodes
        compare; it is judged only at steady power (temperatures lag a load change).
        Returns, per local node, whether this alert is pending or firing."""
        d, nd = self.d, self.n
        n_nodes = len(self.node_names)
        nodes = b.local_nodes
        steady = (node_swing < d.runaway_steady_w) & (n_temp >= 3)
        nd.ref_temp[nodes] = np.where(steady, med_temp - d.thermal_c_per_w * med_p_eff, np.nan)
        fresh = np.isfinite(nd.ref_temp[:n_nodes]) & (b.t - nd.last_seen[:n_nodes] <= 5 * nd.interval[:n_nodes])
        rack_med, rack_n = group_median(nd.ref_temp[:n_nodes], nd.rack[:n_nodes], len(self.racks), fresh)
        rack = nd.rack[nodes]
        excess = nd.ref_temp[nodes] - rack_med[rack]
        judged = np.flatnonzero(steady & (rack_n[rack] >= 3))  # others neither raise nor clear it
        self._rack_against_site(b, out, np.unique(rack), rack_med, rack_n)
        self._eval(out, "NodeThermalAnomaly", nodes[judged], excess[judged] > d.node_temp_excess_c, b.t,
                   excess[judged], _evidence(excess_c=excess[judged], node_temp_c=med_temp[judged],
                                             rack_median_c=rack_med[rack[judged]] + d.thermal_c_per_w
                                             * med_p_eff[judged], node_power_w=med_p_eff[judged],
                                             threshold_c=d.node_temp_excess_c))
        return self.trackers["NodeThermalAnomaly"].pending_or_firing(n_nodes)[nodes]

    def _rack_against_site(self, b: GpuBatch, out: Output, racks: np.ndarray, rack_ref: np.ndarray,
                           rack_n: np.ndarray) -> None:
        """Physics and peers one level further up: each rack's GPUs at zero power (the
        median of its nodes' references) against the rack's own mean coolant temperature
        (CDU supply and return), and that approach against the site's other racks. It
        finds what warms every GPU of a rack alike while the coolant reads normal: air
        in the loop, fouled cold plates. It needs the rack's coolant readings in this
        process (over Kafka, the rack's facility partition and its nodes'), and three racks."""
        r, n_racks = self.r, len(self.racks)
        r.ensure(n_racks)
        approach = rack_ref - 0.5 * (r.supply_c[:n_racks] + r.return_c[:n_racks])
        sites = np.asarray(self.rack_site, np.int64)
        known = np.isfinite(approach) & (rack_n >= 3)
        site_med, site_n = group_median(approach, sites, len(self.site_index), known)
        excess = approach[racks] - site_med[sites[racks]]
        judged = np.flatnonzero(known[racks] & (site_n[sites[racks]] >= 3))
        racks, excess = racks[judged], excess[judged]
        cooling = self._racks_alerted(*COOLANT_ALERTS)[racks]
        self._eval(out, "RackThermalAnomaly", racks, (excess > self.d.rack_temp_excess_c) & ~cooling, b.t, excess,
                   _evidence(excess_c=excess, gpu_at_zero_power_c=rack_ref[racks],
                             coolant_mean_c=(rack_ref - approach)[racks], site_median_approach_c=site_med[sites[racks]],
                             threshold_c=self.d.rack_temp_excess_c))

    def _rack_cooling_alerted(self) -> np.ndarray:
        """Per rack: a rack-level cooling alert pending or firing, which explains (suppresses)
        its GPUs' thermal symptoms. Not RackHeatImbalance: a drifting sensor raises it too,
        and it must not hide a GPU that really overheats."""
        return self._racks_alerted(*COOLANT_ALERTS, "RackThermalAnomaly")

    def _racks_alerted(self, *names: str) -> np.ndarray:
        """Per rack: any of these rack alerts pending or firing."""
        n = len(self.racks)
        return np.logical_or.reduce([self.trackers[name].pending_or_firing(n) for name in names])

    def _performance(self, b: GpuBatch, out: Output) -> None:
        """Stragglers against their node's peers at full load, and the HW power brake."""
        d, local, n_local = self.d, b.local, b.local_nodes.shape[0]
        power, sm, util = b.m["power_w"], b.m["sm_clock_mhz"], b.m["util_gpu"]
        include = (util >= 0.9) & ((b.reasons & HW_SLOWDOWN_BITS) == 0)
        med_power, n_power = group_median(power, local, n_local, include)
        med_sm, _ = group_median(sm, local, n_local, include)
        r = d.straggler_ratio
        straggler = (include & (n_power[local] >= 4) & (med_power[local] > 200.0)
                     & (power < r * med_power[local]) & (sm < r * med_sm[local]))
        self._eval(out, "GpuStraggler", b.slots, straggler, b.t, power / med_power[local],
                   _evidence(power_w=power, sm_mhz=sm, util=util, peer_power_w=med_power[local],
                             peer_sm_mhz=med_sm[local], ratio_threshold=r))
        brake_gpus = np.bincount(local, (b.reasons & POWER_BRAKE) != 0, n_local)
        self._eval(out, "NodePowerBrake", b.local_nodes, brake_gpus > 0, b.t, brake_gpus,
                   _evidence(gpus=brake_gpus, reason_bit="0x80"))
        # DCGM's clocks-event semantics: clocks forced down by hardware or a thermal
        # limit that no alert already explains (a brake on the node, a hot GPU, its rack's coolant).
        forced = (b.reasons & FORCED_SLOWDOWN) != 0
        unexplained = forced & (brake_gpus[local] == 0) & ~b.thermal_alerted
        self._eval(out, "GpuHwSlowdown", b.slots, unexplained, b.t, (b.reasons & FORCED_SLOWDOWN).astype(float),
                   lambda i: {"reasons": hex(int(b.reasons[i])), "sm_mhz": float(sm[i]), "power_w": float(power[i]),
                              "temp_c": float(b.m["gpu_temp_c"][i]), "mem_temp_c": float(b.m["mem_temp_c"][i]),
                              "what": ", ".join(w for w, bit in (("HW slowdown", 0x8), ("SW thermal slowdown", 0x20),
                                                                 ("HW thermal slowdown", 0x40))
                                                if b.reasons[i] & bit)})

    def _counters(self, b: GpuBatch, out: Output) -> None:
        """Error counters and flags, XID latches, and the frozen power sensor."""
        d, slots, t, m = self.d, b.slots, b.t, b.m
        dbe_delta, _ = self.dbe.update(m["ecc_dbe_volatile_total"], slots, b.ts)
        pending, failure = m["remapped_rows_pending"] == 1, m["remapped_rows_failure"] == 1
        ecc_latched = t < self._xid_until("GpuUncorrectableEcc")[slots]
        self._eval(out, "GpuUncorrectableEcc", slots, (dbe_delta > 0) | pending | failure | ecc_latched, t,
                   np.nan_to_num(dbe_delta),
                   lambda i: {"what": ", ".join(w for w, on in (("DBE counter +%d" % dbe_delta[i], dbe_delta[i] > 0),
                                                                ("row remap pending", pending[i]),
                                                                ("row remap failure", failure[i]),
                                                                ("XID", ecc_latched[i])) if on),
                              "ecc_dbe_volatile_total": float(m["ecc_dbe_volatile_total"][i])})
        for name in ("GpuNvlinkError", "GpuHighSbeRate", "GpuGspError", "GpuXid"):
            latched = t < self._xid_until(name)[slots]
            self._eval(out, name, slots, latched, t, latched.astype(float), _evidence())
        _, pcie_rate = self.pcie.update(m["pcie_replay_total"], slots, b.ts)
        self._eval(out, "GpuPcieReplayStorm", slots, pcie_rate > d.pcie_replay_rate_per_s, t, pcie_rate,
                   _evidence(rate_per_s=pcie_rate, threshold_per_s=d.pcie_replay_rate_per_s))
        _, nvlink_rate = self.nvlink.update(m["nvlink_crc_errors_total"], slots, b.ts)
        self._eval(out, "GpuNvlinkErrorStorm", slots, nvlink_rate > d.nvlink_crc_rate_per_s, t, nvlink_rate,
                   _evidence(rate_per_s=nvlink_rate, threshold_per_s=d.nvlink_crc_rate_per_s))
        runs = b.power_runs.astype(float)
        self._eval(out, "GpuPowerSensorStuck", slots, runs >= d.stuck_samples, t, runs,
                   _evidence(power_w=m["power_w"], samples=runs))
        # A GPU that fell off the bus stays alerted until it reports again (here it did).
        self._eval(out, "GpuFellOffBus", slots, np.zeros(slots.shape[0], bool), t, np.zeros(slots.shape[0]),
                   _evidence())

    def _staleness(self, out: Output, present_nodes: np.ndarray, t: float) -> None:
        """GPUs of reporting nodes that went silent, and nodes that went silent.

        A GPU is judged against its own node's latest sample, so it does not matter
        how far apart different nodes' data arrive. A node is judged against the
        latest sample of the whole fleet, which holds only where all nodes' data
        arrive in one order (in-process); over Kafka's partitions that needs
        per-partition watermarks (roadmap), so it is off there."""
        g, nd, k = self.g, self.n, self.d.missing_after_intervals
        n_gpus, n_nodes = self.g_count, len(self.node_names)
        present = np.zeros(n_nodes, bool)
        present[present_nodes] = True
        cand = np.flatnonzero(present[g.node[:n_gpus]] & ~g.retired[:n_gpus])
        silent = nd.last_seen[g.node[cand]] - g.last_seen[cand]
        self._eval(out, "GpuNotReporting", cand, (silent > k * g.interval[cand]) & ~g.offbus[cand], t, silent,
                   lambda i: {"silent_s": float(silent[i])})
        if not self.node_staleness:
            return
        all_nodes = np.arange(n_nodes)
        node_silent = t - nd.last_seen[:n_nodes]
        self._eval(out, "NodeNotReporting", all_nodes, node_silent > 2 * k * nd.interval[:n_nodes], t, node_silent,
                   lambda i: {"silent_s": float(node_silent[i])})

    def _xid_until(self, name: str) -> np.ndarray:
        arr = self.xid_until[name]
        arr.ensure(self.g_count)
        return arr.until

    # ---- events ------------------------------------------------------------------

    def _events(self, batch: pa.RecordBatch, out: Output) -> None:
        batch = batch.filter(pc.is_valid(batch.column("gpu_uuid")))  # node-level events: none alert yet
        if batch.num_rows == 0:
            return
        self._current = batch
        slots = self.gpus.slots(batch.column("gpu_uuid"))
        ts = batch.column("ts").cast(pa.int64()).to_numpy() / 1e9
        if self._replaced:
            self._replacements(out, slots, float(ts.max()))
        self.stats.events += batch.num_rows
        for i, row in enumerate(batch.select(["kind", "code", "text"]).to_pylist()):
            slot, t = int(slots[i]), float(ts[i])
            code = row["code"]
            if row["kind"] == "gpu_lost" or (row["kind"] == "xid" and code == 79):
                name = "GpuFellOffBus"
                self.g.offbus[slot] = True
            elif row["kind"] == "xid" and code is not None:
                name = XID_ALERTS.get(code, "GpuXid")
                self._xid_until(name)[slot] = max(self._xid_until(name)[slot], t + self.d.xid_hold_s)
            else:
                continue
            what = f"XID {code}: {row['text']}" if code is not None else row["text"]
            self._eval(out, name, np.array([slot]), np.array([True]), t, np.array([float(code or 0)]),
                       lambda _: {"xid": code, "what": what})

    # ---- facility ------------------------------------------------------------------

    def _facility(self, batch: pa.RecordBatch, out: Output) -> None:
        d = self.d
        keys = pc.binary_join_element_wise(batch.column("device"), batch.column("metric"), "/")
        slots = self.points.slots(keys)
        ts = batch.column("ts").cast(pa.int64()).to_numpy() / 1e9
        t = float(ts.max())
        self.stats.facility_samples += batch.num_rows
        value = self._numeric(batch, "value")
        kind = self.p.kind[slots]
        rack = self.p.rack[slots]
        devices = self.point_devices

        def per_rack(name: str, rows: np.ndarray, hit: np.ndarray, score: np.ndarray, evidence) -> None:
            if rows.size == 0:
                return
            racks, first = np.unique(rack[rows], return_index=True)
            keep = racks >= 0
            any_hit = np.zeros(racks.shape[0], bool)
            np.logical_or.at(any_hit, np.searchsorted(racks, rack[rows]), hit)
            self._eval(out, name, racks[keep], any_hit[keep], t, score[first][keep],
                       lambda i: evidence(int(rows[first[keep][i]])))

        leak = np.flatnonzero(kind == KIND_LEAK)
        per_rack("CoolantLeak", leak, value[leak] >= 0.5, value[leak],
                 lambda r: {"device": devices[slots[r]], "leak": float(value[r])})
        flow = np.flatnonzero(kind == KIND_FLOW)
        if flow.size:
            _, base = self.flow.update(value[flow], slots[flow], ts[flow])
            warm = self.flow.s.count[slots[flow]] >= d.warmup_samples
            ratio = value[flow] / base
            base_of = dict(zip(flow.tolist(), base.tolist()))
            per_rack("CoolantFlowLoss", flow, warm & (ratio < d.flow_loss_ratio), ratio,
                     lambda r: {"device": devices[slots[r]], "flow_lpm": float(value[r]),
                                "baseline_lpm": base_of[r], "ratio": float(value[r] / base_of[r]),
                                "threshold_ratio": d.flow_loss_ratio})
        pdu = np.flatnonzero(kind == KIND_PDU_POWER)
        rating = self.cfg.fleet.pdu_rating_w
        per_rack("PduOverload", pdu, value[pdu] > d.pdu_load_ratio * rating, value[pdu] / rating,
                 lambda r: {"device": devices[slots[r]], "power_w": float(value[r]), "rating_w": rating,
                            "ratio": float(value[r] / rating), "threshold_ratio": d.pdu_load_ratio})
        self._heat_balance(t, ts, kind, rack, value, out)
        if d.site_power_cap_w > 0:  # physics: the whole site against its contracted or breaker cap
            site = np.flatnonzero(kind == KIND_SITE_POWER)
            cap = d.site_power_cap_w
            per_rack("SitePowerOverCap", site, value[site] > cap, value[site] / cap,
                     lambda r: {"device": devices[slots[r]], "power_w": float(value[r]), "cap_w": cap,
                                "ratio": float(value[r] / cap)})

    def _heat_balance(self, t: float, ts: np.ndarray, kind: np.ndarray, rack: np.ndarray, value: np.ndarray,
                      out: Output) -> None:
        """Physics of each rack's coolant loop: the heat it carries away (flow x heat
        capacity x delta-T) against the PDU's power. Liquid cooling takes a known share of
        IT power, so the PDU's power and the flow predict the delta-T; the return
        temperature follows a change with the coolant's lag, and so does the prediction.
        A loop that carries much less (air in it, cold plates losing contact, heat going
        to the room) or more (a drifting flow or temperature sensor) is wrong. Judged when
        the PDU reports, with the prediction settled, and only where the expected delta-T
        is well above sensor resolution."""
        d, r = self.d, self.r
        r.ensure(len(self.racks))
        for k, name in ((KIND_SUPPLY, "supply_c"), (KIND_RETURN, "return_c"), (KIND_FLOW, "flow_lpm")):
            rows = np.flatnonzero((kind == k) & np.isfinite(value))
            getattr(r, name)[rack[rows]] = value[rows]
        rows = np.flatnonzero((kind == KIND_PDU_POWER) & np.isfinite(value) & (rack >= 0))
        if rows.size == 0:
            return
        racks, power, t_row = rack[rows], value[rows], ts[rows]
        heat_capacity_w_per_c = r.flow_lpm[racks] / 60.0 * CP_COOLANT  # kg/s x J/(kg K)
        predicted = d.liquid_fraction * power / heat_capacity_w_per_c
        dt = t_row - r.power_t[racks]
        a = np.where(np.isfinite(dt), 1.0 - np.exp(-np.maximum(dt, 0.0) / max(d.coolant_lag_s, 1e-9)), 0.0)
        measured = r.return_c[racks] - r.supply_c[racks]
        # A rack seen for the first time starts from what it measures (its history is
        # unknown) and is judged once the prediction has caught up with its power.
        prev = np.where(np.isnan(r.expected_dt[racks]), measured, r.expected_dt[racks])
        expected = _lag(prev, predicted, a)
        r.expected_dt[racks], r.power_t[racks] = expected, t_row
        ratio = measured / expected
        settled = np.abs(predicted - expected) < 0.1 * expected
        explained = self._racks_alerted(*COOLANT_ALERTS, "RackThermalAnomaly", "PduOverload")[racks]
        judged = np.flatnonzero(settled & np.isfinite(ratio) & (expected >= d.heat_balance_min_delta_c) & ~explained)
        coolant_w = heat_capacity_w_per_c * measured
        self._eval(out, "RackHeatImbalance", racks[judged], np.abs(ratio[judged] - 1.0) > d.heat_balance_tolerance,
                   t, ratio[judged],
                   _evidence(coolant_w=coolant_w[judged], power_w=power[judged],
                             ratio=(coolant_w / power)[judged], expected=d.liquid_fraction,
                             delta_t_c=measured[judged], expected_delta_t_c=expected[judged],
                             tolerance=d.heat_balance_tolerance, flow_lpm=r.flow_lpm[racks[judged]],
                             supply_c=r.supply_c[racks[judged]], return_c=r.return_c[racks[judged]]))

    # ---- node health -------------------------------------------------------------

    def _node_health(self, t: float) -> list[dict]:
        firing = []
        for name, tr in self.trackers.items():
            entities = np.fromiter(tr.active.keys(), np.int64, len(tr.active))
            scope = tr.spec.scope
            if scope == "rack" or entities.size == 0:
                continue
            nodes = self.g.node[entities] if scope == "gpu" else entities
            firing.append((nodes, tr.spec.severity, name))
        return self.health.update(len(self.node_names), firing, self.node_identity, t)
