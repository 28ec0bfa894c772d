"""Detector state by Kafka partition: what a detect process checkpoints before it
commits its offsets, and what the next owner of a partition restores.

Over Kafka each node's telemetry and events arrive on the partition its name hashes
to (a rack's facility readings on its rack name's), and a detect process owns a set of
partition numbers. When a partition moves to another process (a rebalance, a crash),
the new owner restores the state of the partition's nodes and racks from the
checkpoint: baselines, counters, hysteresis counts, node states and firing alerts. It
continues where the old owner committed instead of warming up cold, which would delay
detection and raise again the alerts already raised.

A checkpoint is one Arrow batch per partition: a row per entity (GPU, node, rack,
facility point) with its identity labels, one float64 column per state array
(`<container>.<field>`, null where another scope's), its node state, and its firing
alerts as JSON.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.kafka import partition_for
from pipeline.detect.engine import Engine
from pipeline.model import CHECKPOINT, Alert

SCOPES = ("gpu", "node", "rack", "point")
IDENTITY = {"gpu": ("gpu_uuid", "node", "site", "rack", "gpu"), "node": ("node", "site", "rack"),
            "rack": ("site", "rack"), "point": ("device", "metric", "site", "rack")}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


def _alert_json(a: Alert) -> dict:
    return {"labels": a.labels, "annotations": a.annotations, "starts_at_us": (a.starts_at - _EPOCH) // _US,
            "detector": a.detector, "score": a.score, "evidence": a.evidence}


def _alert(d: dict) -> Alert:
    return Alert(labels=d["labels"], annotations=d["annotations"], starts_at=_EPOCH + d["starts_at_us"] * _US,
                 detector=d["detector"], score=d["score"], evidence=d["evidence"])


def _checkpoint_batch(table: pa.Table) -> pa.RecordBatch:
    """The CHECKPOINT schema's fields first, in order and type, then the state columns."""
    n = table.num_rows
    fixed = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
             for f in CHECKPOINT]
    state = [name for name in table.column_names if name not in CHECKPOINT.names]
    schema = pa.schema([*CHECKPOINT, *(table.schema.field(name) for name in state)], metadata=CHECKPOINT.metadata)
    return pa.Table.from_arrays([*fixed, *(table.column(name) for name in state)],
                                schema=schema).combine_chunks().to_batches()[0]


class Checkpointer:
    def __init__(self, engine: Engine, partitions: int) -> None:
        self.engine = engine
        self.partitions = partitions
        self._partition_of: dict[str, int] = {}

    def partition(self, owners: pa.Array) -> np.ndarray:
        """The partition of each owner key (where its data arrives); -1 for none."""
        out = np.empty(len(owners), np.int64)
        for i, key in enumerate(owners.to_pylist()):  # once per entity per checkpoint; cached
            p = self._partition_of.get(key)
            if p is None:
                p = self._partition_of[key] = partition_for(key, self.partitions) if key else -1
            out[i] = p
        return out

    def _rows(self, scope: str, partitions: set[int]) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
        """Identities of the scope's entities in `partitions`, their slots and partitions."""
        ids = self.engine.identities(scope)
        owner_part = self.partition(ids.column("owner"))
        slots = np.flatnonzero(np.isin(owner_part, list(partitions)))
        return ids.take(pa.array(slots)), slots, owner_part[slots]

    def snapshot(self, partitions: set[int]) -> dict[int, pa.RecordBatch]:
        """The state of every entity in each of `partitions`, one batch per partition."""
        e = self.engine
        state = e.state()
        tables: dict[int, list[pa.Table]] = {p: [] for p in partitions}
        for scope in SCOPES:
            ids, slots, owner_part = self._rows(scope, partitions)
            if not slots.size:
                continue
            cols = {"scope": pa.array([scope] * len(slots)), **{c: ids.column(c) for c in IDENTITY[scope]}}
            for name, (arrays, fields) in state[scope].items():
                arrays.ensure(int(slots.max()) + 1)
                for f in fields:
                    cols[f"{name}.{f}"] = pa.array(getattr(arrays, f)[slots].astype(np.float64))
            if scope == "node":
                e.health.ensure(int(slots.max()) + 1)
                cols["health.state"] = pa.array(e.health.state[slots].astype(np.float64))
            alerts: list[str | None] = [None] * len(slots)
            row_of = {int(s): i for i, s in enumerate(slots)}
            firing: dict[int, dict] = {}
            for name, tr in e.trackers.items():
                if tr.spec.scope == scope:
                    for entity, alert in tr.active.items():
                        if entity in row_of:
                            firing.setdefault(row_of[entity], {})[name] = _alert_json(alert)
            for i, d in firing.items():
                alerts[i] = json.dumps(d)
            cols["alerts"] = pa.array(alerts, pa.string())
            table = pa.table(cols)
            for p in partitions:
                rows = np.flatnonzero(owner_part == p)
                if rows.size:
                    tables[p].append(table.take(pa.array(rows)))
        return {p: _checkpoint_batch(pa.concat_tables(parts, promote_options="default"))
                for p, parts in tables.items() if parts}

    def restore(self, batch: pa.RecordBatch) -> dict[str, int]:
        """Load one partition's checkpoint; returns what it held (entities per scope,
        firing alerts)."""
        e = self.engine
        state = e.state()
        summary = {"alerts": 0}
        scope_col = batch.column("scope")
        for scope in SCOPES:
            rows = batch.filter(pc.equal(scope_col, scope))
            summary[scope] = rows.num_rows
            if not rows.num_rows:
                continue
            slots = e.slots_for(scope, rows.select(list(IDENTITY[scope])))
            for name, (arrays, fields) in state[scope].items():
                arrays.ensure(int(slots.max()) + 1)
                for f in fields:
                    col = f"{name}.{f}"
                    if col in rows.schema.names:
                        target = getattr(arrays, f)
                        target[slots] = rows.column(col).to_numpy(zero_copy_only=False).astype(target.dtype)
            if scope == "node":
                e.health.ensure(int(slots.max()) + 1)
                e.health.state[slots] = rows.column("health.state").to_numpy(zero_copy_only=False).astype(np.int8)
            for i, text in enumerate(rows.column("alerts").to_pylist()):
                for name, d in json.loads(text).items() if text else ():
                    e.trackers[name].adopt(int(slots[i]), _alert(d))
                    summary["alerts"] += 1
        for tr in e.trackers.values():
            tr.refresh()
        return summary

    def forget(self, partitions: set[int]) -> None:
        """Drop the state of partitions this process no longer owns: the next owner
        continues from the checkpoint, and our copy would go stale."""
        e = self.engine
        state = e.state()
        for scope in SCOPES:
            _, slots, _ = self._rows(scope, partitions)
            if not slots.size:
                continue
            for arrays, fields in state[scope].values():
                arrays.ensure(int(slots.max()) + 1)
                arrays.reset(slots, fields)
            if scope == "node":
                e.health.ensure(int(slots.max()) + 1)
                e.health.state[slots] = 0
            for tr in e.trackers.values():
                if tr.spec.scope == scope:
                    tr.forget(slots)
