"""The detection engine: telemetry and events in, alert state changes and node health out.

One `process(message)` call per bus message. Every detector runs over the whole
batch at once (numpy expressions and Numba kernels over flat state arrays); Python
runs per row only for the rare things: a series never seen before, an XID event,
an alert that changes state.

The detectors are families (detect/family.py says what one is), one module each under
detect/families/, run in the order of FAMILIES for the message's topic (docs/detection.md
explains each in operator terms). Correlation: a rack with a coolant alert
pending or firing suppresses the over-temperature alerts of its GPUs; a GPU that fell
off the bus does not also raise GpuNotReporting. The engine keeps what they share: the
inventory of GPUs, nodes, racks and facility points (detect/inventory.py), one
hysteresis tracker per alert, node health, and replaced GPUs.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.base import Message, Topic
from pipeline.config import Config
from pipeline.detect import kernels
from pipeline.detect.batch import EventBatch, FacilityBatch, GpuBatch, Output, RackBatch, Stats, numeric, seconds
from pipeline.detect.catalog import DETECTOR_ALERTS, explained_by
from pipeline.detect.families.coolant import Coolant
from pipeline.detect.families.counters import Counters
from pipeline.detect.families.drift import Drift
from pipeline.detect.families.heat_balance import HeatBalance
from pipeline.detect.families.over_temperature import OverTemperature
from pipeline.detect.families.pdu import PduLoad
from pipeline.detect.families.peers import Peers
from pipeline.detect.families.performance import Performance
from pipeline.detect.families.power_caps import PowerCaps
from pipeline.detect.families.rack_vs_site import RackVsSite
from pipeline.detect.families.staleness import Staleness
from pipeline.detect.families.siblings import SiblingTemperature
from pipeline.detect.families.site_power import SitePower
from pipeline.detect.families.xid import Xid
from pipeline.detect.family import Family, JoinedArrays
from pipeline.detect.health import NodeHealth, NodeIdentity, Tracker
from pipeline.detect.inventory import Inventory
from pipeline.detect.state import SlotArrays
from pipeline.detect.watermark import SeriesClocks, Watermarks
from pipeline.faults import MAINTENANCE_EVENTS
from pipeline.model import COLLECTOR_STARTED, COLLECTOR_STOPPING, GPU_METRICS, GPU_SETTINGS, Alert, bad_quality

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Family)

# The order the families run in, for each topic's batches: a family reads what the
# ones before it learnt or alerted on the same batch (peers read the siblings' excess,
# over-temperature the runaway and node alerts, the clocks-event check every thermal one).
# Two tiers: a rack's families need only the rack's data (its nodes' GPUs and events, its
# CDU and PDU; the site meter is one more "rack"), the site tier compares a site's racks
# from their summaries. One process runs both, handing the summaries over directly; over
# Kafka they run apart, each partitioned by its own key (docs/kafka.md).
RACK_TIER: tuple[type[Family], ...] = (
    SiblingTemperature, Peers, OverTemperature, Drift, Performance, Counters, Staleness, PowerCaps,  # GPU
    Coolant, PduLoad, HeatBalance, SitePower,                                             # facility
    Xid,                                                                                  # events
)
SITE_TIER: tuple[type[Family], ...] = (RackVsSite,)                                       # rack summaries
FAMILIES = RACK_TIER + SITE_TIER


class Engine:
    """`families`: the detector families to run, in order (tests add one)."""

    def __init__(self, cfg: Config, *, families: tuple[type[Family], ...] = FAMILIES, one_stream: bool = True) -> None:
        kernels.warm_up()  # compile or load from cache now, not on the first sample
        self.cfg = cfg
        self.stats = Stats()
        self.inventory = Inventory(cfg.kafka.partitions)
        # Event time (detect/watermark.py): GPU telemetry's per partition, which judges silence,
        # and each GPU's and facility point's newest sample, behind which a row is late.
        self.gpu_time = Watermarks()
        self.gpu_series, self.point_series = SeriesClocks(cfg.detect.lateness_s), SeriesClocks(cfg.detect.lateness_s)
        self.one_stream = one_stream  # all of the fleet's data in one order (in-process); over Kafka, partitions
        self.trackers: dict[str, Tracker] = {}
        self.families = [family(self) for family in families]
        self._by_type = {type(f): f for f in self.families}
        raised = [name for f in self.families for name in f.raises]
        catalog = {spec.name for spec in DETECTOR_ALERTS}
        # A tier raises its share of the catalog; all the families together raise all of it.
        expected = catalog if families == FAMILIES else set(raised) & catalog
        if len(raised) != len(set(raised)) or set(raised) != expected:
            raise ValueError(f"each detector alert of the catalog must be raised by one family: not in the catalog "
                             f"{sorted(set(raised) - catalog)}, raised by none {sorted(catalog - set(raised))}, "
                             f"or one raised by two")
        d = cfg.detect
        for spec in DETECTOR_ALERTS:  # catalog order; the catalog says its detector and fire-after
            fire_after = getattr(d, spec.fire_after) if isinstance(spec.fire_after, str) else spec.fire_after
            self.trackers[spec.name] = Tracker(spec, spec.detector, fire_after, d.resolve_after,
                                               self.inventory.labels_getter(spec.entity), cfg.alerts.runbook_base_url,
                                               d.streak_s)
        for f in self.families:
            f.check_declared()
        # Per topic: the families that observe (not all do), and those that evaluate, in order.
        self._by_topic = {}
        for topic in (Topic.GPU, Topic.FACILITY, Topic.EVENTS, Topic.RACKS):
            mine = [f for f in self.families if f.topic == topic]
            self._by_topic[topic] = ([f for f in mine if type(f).observe is not Family.observe], mine)
        # Rack summaries go straight to the site tier where it runs here; else out.racks carries them.
        self.site_tier_here = bool(self._by_topic[Topic.RACKS][1])
        self.health = NodeHealth()
        self._resume_pending = False  # see resume()

    def family(self, kind: type[F]) -> F:
        """The instance of a family (for a family that reads another's state)."""
        return self._by_type[kind]

    @property
    def node_names(self) -> list[str]:
        return self.inventory.node_names

    def state(self) -> dict[str, dict[str, tuple[SlotArrays, tuple[str, ...]]]]:
        """Every per-entity state array, by the scope its slots index (gpu, node, rack,
        point), named for checkpoints (detect/checkpoint.py): each family's declared
        State (arrays of several families under one name are joined) and each alert's
        tracker. Identities (which node a GPU is on, which rack a node is in) are not
        state: they come with the keys."""
        named: dict[str, dict[str, list[SlotArrays]]] = {"gpu": {}, "node": {}, "rack": {}, "point": {}}
        for f in self.families:
            for scope, name, arrays in f.state():
                named[scope].setdefault(name, []).append(arrays)
        out = {}
        for scope, by_name in named.items():
            joined = {name: parts[0] if len(parts) == 1 else JoinedArrays(parts) for name, parts in by_name.items()}
            out[scope] = {name: (arrays, arrays.fields) for name, arrays in joined.items()}
        for name, tr in self.trackers.items():
            out[tr.spec.entity][f"tracker.{name}"] = (tr.arrays, tr.arrays.fields)
        return out

    def identities(self, scope: str) -> pa.RecordBatch:
        return self.inventory.identities(scope)

    def slots_for(self, scope: str, ids: pa.RecordBatch) -> np.ndarray:
        return self.inventory.slots_for(scope, ids)

    def node_identity(self, n: int) -> NodeIdentity:
        return self.inventory.node_identity(n)

    # ---- entry point -------------------------------------------------------------

    def process(self, message: Message) -> Output:
        batch = message.value
        if batch.num_rows == 0:
            return Output()
        self.inventory.current = batch
        out = Output()
        if message.topic == Topic.GPU:
            self._gpu(batch, out)
        elif message.topic == Topic.FACILITY:
            self._facility(batch, out)
        elif message.topic == Topic.EVENTS:
            self._events(batch, out)
        elif message.topic == Topic.RACKS:
            self._racks(batch, out)
        if out.racks is not None and self.site_tier_here:
            racks, out.racks = out.racks, None
            self.inventory.current = racks
            self._racks(racks, out)
        if out.alerts:
            self.stats.alerts_fired += sum(a.ends_at is None for _, a in out.alerts)
            self.stats.alerts_resolved += sum(a.ends_at is not None for _, a in out.alerts)
            out.health = self._node_health(max(ts for ts, _ in out.alerts).timestamp())
        return out

    def _run(self, topic: str, batch, out: Output) -> None:
        observers, evaluators = self._by_topic[topic]
        for f in observers:
            f.observe(batch)
        for f in evaluators:
            f.evaluate(batch, out)

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
        return self.family(Staleness).latest()

    def _resume_clock(self, t: float) -> None:
        self._resume_pending = False
        last = self.latest_data_time()
        if last is None:
            return
        jump = t - last
        self.family(Staleness).shift(jump)
        for tr in self.trackers.values():
            tr.shift(jump)
        log.info("detect: resumed from the checkpoint; data continues %.0f s after its latest sample "
                 "(not counted as silence)", jump)

    def _replacements(self, out: Output, present: np.ndarray, t: float) -> None:
        for old, new in self.inventory.replacements(present):
            self._retire(out, old, new, t)

    def _retire(self, out: Output, old: int, new: int, t: float) -> None:
        """Retire the replaced GPU's series: its alerts resolve, its state is dropped, it is
        no longer expected to report (no GpuNotReporting) nor checkpointed. The new GPU's
        series starts fresh (warm-up); a `gpu_replaced` event says what happened."""
        now = datetime.fromtimestamp(t, timezone.utc)
        inv = self.inventory
        old_uuid, new_uuid = inv.gpu_ids.keys[old].as_py(), inv.gpu_ids.keys[new].as_py()
        self._forget(out, "gpu", np.array([old]), now, f"GPU replaced by {new_uuid}")
        inv.gpu.retired[old], inv.gpu.retired[new] = True, False
        self._event(out, "gpu", new, now, "gpu_replaced",
                        lambda at: f"GPU {at['gpu']} of {at['node']} replaced: {old_uuid} -> {new_uuid}")
        log.info("detect: %s; the old series is retired", out.events[-1]["text"])

    def _moved(self, out: Output, slots: np.ndarray, nodes: np.ndarray, index: np.ndarray, t: float) -> None:
        """GPUs that report from another node or index than before (moved in a swap test, their node
        renamed): their alerts, which name where they were, resolve and their series start afresh there
        (a new node's peers, a new slot's airflow); a `gpu_moved` event says from where. A node all of whose
        GPUs left is forgotten (a renamed node is not NodeNotReporting for ever under its old name)."""
        now = datetime.fromtimestamp(t, timezone.utc)
        inv = self.inventory
        was = [f"GPU {int(inv.gpu.index[s])} of {inv.node_names[int(inv.gpu.node[s])]}" for s in slots.tolist()]
        self._forget(out, "gpu", slots, now, "GPU moved: alerted afresh where it reports now")
        left = inv.move(slots, nodes, index)
        for s, where in zip(slots.tolist(), was):
            self._event(out, "gpu", s, now, "gpu_moved",
                            lambda at, where=where: f"GPU {at['UUID']} moved: {where} -> GPU {at['gpu']} of {at['node']}")
            log.info("detect: %s; its series starts afresh there", out.events[-1]["text"])
        n = inv.gpu_count
        holding = np.unique(inv.gpu.node[:n][~inv.gpu.retired[:n]])
        emptied = np.setdiff1d(left, holding)
        if emptied.size:
            self._forget(out, "node", emptied, now, "its GPUs moved to another node")
            log.info("detect: node(s) %s report no GPU since their GPUs moved: forgotten",
                     ", ".join(inv.node_names[int(k)] for k in emptied))

    def _reracked(self, out: Output, nodes: np.ndarray, racks: np.ndarray, t: float) -> None:
        """Nodes that report from another rack than before (moved, or their rack label corrected): their
        alerts and their GPUs', which name the rack they were in, resolve, and their series start afresh
        among their new rack's peers; a `node_moved` event says from where."""
        now = datetime.fromtimestamp(t, timezone.utc)
        inv = self.inventory
        was = [inv.rack_names[int(r)][1] for r in inv.node.rack[nodes]]
        self._forget_nodes(out, nodes, now, "node moved to another rack: alerted afresh where it is now")
        inv.node.rack[nodes] = racks
        for k, rack in zip(nodes.tolist(), was):
            self._event(out, "node", k, now, "node_moved",
                        lambda at, rack=rack: f"node {at['node']} moved: rack {rack} -> rack {at['rack']}")
            log.info("detect: %s; its series start afresh there", out.events[-1]["text"])

    def forget_nodes(self, out: Output, nodes: np.ndarray, t: float, silent_s: np.ndarray) -> None:
        """Nodes silent for `detect.forget_after_s` (decommissioned, scaled away, dead and left): their
        alerts and their GPUs' resolve, saying why, their state is dropped and their GPUs are no longer
        checkpointed; a `node_forgotten` event each. One that reports again starts afresh."""
        now = datetime.fromtimestamp(t, timezone.utc)
        gpus = self._forget_nodes(out, nodes, now, f"node silent for over {self.cfg.detect.forget_after_s:g} s: "
                                                   "forgotten (detect.forget_after_s)")
        self.inventory.gpu.retired[gpus] = True  # (put back by replacements() when they report again)
        for k, s in zip(nodes.tolist(), silent_s.tolist()):
            self._event(out, "node", k, now, "node_forgotten",
                        lambda at, s=s: f"node {at['node']} silent for {s:.0f} s (detect.forget_after_s): forgotten; "
                                        "its alerts resolved, and it starts afresh if it reports again")
            log.warning("detect: %s", out.events[-1]["text"])

    def _forget_nodes(self, out: Output, nodes: np.ndarray, now: datetime, why: str) -> np.ndarray:
        """`_forget` the nodes and their GPUs; returns the GPUs' slots."""
        inv = self.inventory
        n = inv.gpu_count
        gpus = np.flatnonzero(np.isin(inv.gpu.node[:n], nodes) & ~inv.gpu.retired[:n])
        if gpus.size:
            self._forget(out, "gpu", gpus, now, why)
        self._forget(out, "node", nodes, now, why)
        return gpus

    def _forget(self, out: Output, scope: str, slots: np.ndarray, now: datetime, why: str) -> None:
        """The entities' alerts resolve, annotated with `why` (their condition did not clear), and their
        state is dropped (a retired or moved GPU, a node left empty or silent for good)."""
        for tr in self.trackers.values():
            if tr.spec.entity == scope:
                out.alerts.extend((now, dataclasses.replace(tr.active[e], ends_at=now, annotations={
                                       **tr.active[e].annotations, "resolution": why}))
                                  for e in slots.tolist() if e in tr.active)
                tr.forget(slots)
        for arrays, fields in self.state()[scope].values():
            arrays.ensure(int(slots.max()) + 1)
            arrays.reset(slots, fields)

    def _event(self, out: Output, scope: str, slot: int, now: datetime, kind: str, text) -> None:
        """An event the engine found about a GPU or a node (`text(its labels now)` says what)."""
        labels = self.inventory.labels_getter(scope)(slot)
        gpu = scope == "gpu"
        out.events.append({"ts": now, "site": labels["site"], "rack": labels["rack"], "node": labels["node"],
                           "gpu": int(labels["gpu"]) if gpu else None, "gpu_uuid": labels["UUID"] if gpu else None,
                           "kind": kind, "code": None, "text": text(labels)})

    def active_alerts(self) -> list[Alert]:
        return [a for t in self.trackers.values() for a in t.active.values()]

    def racks_explaining(self, target: str) -> np.ndarray:
        """Per rack: a rack alert that explains `target` (the catalog's `suppresses`) pending
        or firing: the rack's coolant explains its GPUs' heat, for example."""
        n = self.inventory.rack_count
        names = explained_by(target, "rack")
        return np.logical_or.reduce([self.trackers[name].pending_or_firing(n) for name in names])

    # ---- batches -----------------------------------------------------------------

    def _on_time(self, batch: pa.RecordBatch, series: SeriesClocks, slots: np.ndarray, ts: np.ndarray,
                 clock: Watermarks | None = None, part: np.ndarray | None = None, on_late=None) -> tuple:
        """The batch without its late rows (counted, logged once; `on_late(their slots)`), its slots and
        times likewise; the series' clocks, and the partitions' (`clock`), then advance."""
        late = series.late(slots, ts)
        if late.any():
            if on_late is not None:
                on_late(slots[late])
            if not self.stats.late_samples:
                log.warning("detect: rows more than detect.lateness_s (%g s) behind their series' newest are late: "
                            "archived, not detected on; counted in fleetwatch_late_samples_total, logged once",
                            series.lateness_s)
            self.stats.late_samples += int(late.sum())
            keep = ~late
            batch, ts, slots = batch.filter(pa.array(keep)), ts[keep], slots[keep]
            part = part[keep] if part is not None else None
        series.advance(slots, ts)
        if clock is not None:
            clock.advance(part, ts)
        return batch, ts, slots

    def _gpu(self, batch: pa.RecordBatch, out: Output) -> None:
        inv = self.inventory
        slots = inv.gpu_ids.slots(batch.column("gpu_uuid"))
        ts = seconds(batch)
        if (rounds := once_each(slots, ts)) is not None:
            for rows in rounds:  # the families judge each GPU once a batch: a GPU's scrapes one after another
                inv.current = batch.take(pa.array(rows))
                self._gpu(inv.current, out)
            return
        batch, ts, slots = self._on_time(batch, self.gpu_series, slots, ts, self.gpu_time,
                                         inv.rack_partition[inv.node.rack[inv.gpu.node[slots]]],
                                         lambda late: self.family(Staleness).heard(np.unique(inv.gpu.node[late])))
        if batch.num_rows == 0:
            return
        inv.current = batch
        if "model" in batch.schema.names:  # (nodes of one model are peers: an air-cooled L4 beside H100s is not)
            inv.node.model[inv.gpu.node[slots]] = inv.model_ids.slots(batch.column("model"))
        inv.seat(slots, batch)  # GPUs let go with a partition, given back without a checkpoint of them
        moved, to_node, to_index = inv.moves(slots, batch)
        if moved.size:
            self._moved(out, moved, to_node, to_index, float(ts.max()))
        reracked, to_rack = inv.reracked(inv.gpu.node[slots], batch)
        if reracked.size:
            self._reracked(out, reracked, to_rack, float(ts.max()))
        if inv.replaced or inv.gpu.retired[slots].any():
            self._replacements(out, slots, float(ts.max()))
        if self._resume_pending:
            self._resume_clock(float(ts.max()))
        self.stats.gpu_samples += batch.num_rows
        metrics = {name: numeric(batch, name, self.stats) for name in GPU_METRICS + GPU_SETTINGS}
        node = inv.gpu.node[slots]
        nodes, group = np.unique(node, return_inverse=True)
        self._run(Topic.GPU, GpuBatch(slots=slots, ts=ts, now=float(ts.max()), metrics=metrics, node=node,
                                      rack=inv.node.rack[node], nodes=nodes, group=group,
                                      reasons=np.nan_to_num(metrics["clock_event_reasons"]).astype(np.int64)), out)

    def _facility(self, batch: pa.RecordBatch, out: Output) -> None:
        inv = self.inventory
        keys = pc.binary_join_element_wise(batch.column("device"), batch.column("metric"), "/")
        slots = inv.point_ids.slots(keys)
        ts = seconds(batch)
        batch, ts, slots = self._on_time(batch, self.point_series, slots, ts)
        if batch.num_rows == 0:
            return
        self.stats.facility_samples += batch.num_rows
        now = float(ts.max())
        heard_slots, heard_ts = np.zeros(0, np.int64), np.zeros(0)
        if (bad := self._bad_quality(batch)).any():
            heard_slots, heard_ts = slots[bad], ts[bad]
            batch, slots, ts = batch.filter(pa.array(~bad)), slots[~bad], ts[~bad]
            if batch.num_rows == 0:
                return
        value = numeric(batch, "value", self.stats)
        self._run(Topic.FACILITY, FacilityBatch(slots=slots, ts=ts, now=now, value=value,
                                                kind=inv.point.kind[slots], rack=inv.point.rack[slots],
                                                devices=inv.point_devices, heard_slots=heard_slots,
                                                heard_ts=heard_ts), out)

    def _bad_quality(self, batch: pa.RecordBatch) -> np.ndarray:
        """The readings their BMS marks bad or uncertain (a sensor fault, a lost link): left out of the batch
        the families judge (a faulted leak sensor's true had raised CoolantLeak; read as no value, a lost link
        had resolved a real leak), heard (FacilityBatch.heard_slots: a PDU feed marked bad is no failed-over
        feed, pipeline/feeds.py). Null is good, as a reading without a quality."""
        bad = bad_quality(batch).to_numpy(zero_copy_only=False)
        if bad.any():
            if not self.stats.bad_quality:
                log.warning("detect: facility readings of bad quality (quality not 1) are archived, not detected "
                            "on; counted in fleetwatch_bad_quality_readings_total, logged once")
            self.stats.bad_quality += int(bad.sum())
        return bad

    def _racks(self, batch: pa.RecordBatch, out: Output) -> None:
        ts = seconds(batch)
        times = np.unique(ts)
        if times.size > 1:  # summaries of several times (over Kafka, a backlog read after a rebalance):
            for t in times:  # judged time by time, as one process judges them, each stamped with its own
                self._racks(batch.filter(pa.array(ts == t)), out)
            return
        slots = self.inventory.rack_ids.slots(pc.binary_join_element_wise(batch.column("site"), batch.column("rack"),
                                                                          "/"))
        col = lambda name: pc.fill_null(batch.column(name), float("nan")).to_numpy(zero_copy_only=False)  # noqa: E731
        self._run(Topic.RACKS, RackBatch(slots=slots, ts=ts, now=float(ts.max()), gpu_ref=col("gpu_at_zero_power_c"),
                                         coolant=col("coolant_mean_c"),
                                         explained=batch.column("explained").to_numpy(zero_copy_only=False)), out)

    def _events(self, batch: pa.RecordBatch, out: Output) -> None:
        planned = batch.filter(pc.is_in(batch.column("kind"), pa.array(MAINTENANCE_EVENTS)))
        if planned.num_rows:  # node events: a planned outage
            self.inventory.current = planned
            self.family(Staleness).maintenance(self.inventory.node_ids.slots(planned.column("node")), seconds(planned))
        for kind in (COLLECTOR_STARTED, COLLECTOR_STOPPING):  # node events: a collector's own
            said = batch.filter(pc.equal(batch.column("kind"), kind))
            if not said.num_rows:
                continue
            self.inventory.current = said
            nodes = self.inventory.node_ids.slots(said.column("node"))
            if kind == COLLECTOR_STOPPING:
                self.family(Staleness).maintenance(nodes, seconds(said), self.cfg.detect.restart_grace_s)
            else:
                ms = pc.fill_null(said.column("code").cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
                self.family(Staleness).announced(nodes, ms / 1000.0)
        batch = batch.filter(pc.is_valid(batch.column("gpu_uuid")))  # the other node-level events alert nothing yet
        if batch.num_rows == 0:
            return
        self.inventory.current = batch
        slots = self.inventory.gpu_ids.slots(batch.column("gpu_uuid"))
        ts = seconds(batch)
        if self.inventory.replaced:
            self._replacements(out, slots, float(ts.max()))
        self.stats.events += batch.num_rows
        self._run(Topic.EVENTS, EventBatch(rows=batch, slots=slots, ts=ts), out)

    # ---- node health -------------------------------------------------------------

    def _node_health(self, t: float) -> list[dict]:
        firing = []
        for name, tr in self.trackers.items():
            entities = np.fromiter(tr.active.keys(), np.int64, len(tr.active))
            scope = tr.spec.entity
            if scope == "rack" or entities.size == 0:
                continue
            nodes = self.inventory.gpu.node[entities] if scope == "gpu" else entities
            remediations = [tr.active[int(e)].annotations.get("remediation", tr.spec.remediation) for e in entities]
            firing.append((nodes, tr.spec.severity, name, remediations))
        return self.health.update(self.inventory.node_count, firing, self.node_identity, t)


def once_each(slots: np.ndarray, ts: np.ndarray) -> list[np.ndarray] | None:
    """None where every slot is in the batch once (the common case); else the batch's rows in rounds
    that hold each slot at most once, its rows in time order (a message of two scrapes: an agent's
    backlog, an exporter scraped twice), with a row that repeats another of its slot and time left
    out (a producer's retry)."""
    if slots.size < 2 or np.unique(slots).size == slots.size:
        return None
    order = np.lexsort((ts, slots))
    s, t = slots[order], ts[order]
    last = np.ones(order.size, bool)  # of the rows of one slot and time, the last
    last[:-1] = (s[1:] != s[:-1]) | (t[1:] != t[:-1])
    order, s = order[last], s[last]
    at = np.arange(s.size)
    rank = at - np.maximum.accumulate(np.where(np.r_[True, s[1:] != s[:-1]], at, 0))
    return [np.sort(order[rank == r]) for r in range(int(rank.max()) + 1)]
