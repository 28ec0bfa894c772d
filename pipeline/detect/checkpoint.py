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

The embedded daemon (no Kafka) keeps the same batch, all of its entities as one
partition, in `<data_dir>/state/detector.arrow` (`LocalCheckpoint`): written atomically
every `daemon.checkpoint_interval_s` and at shutdown, restored at start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.keys import partition_for
from pipeline.detect.engine import Engine
from pipeline.model import CHECKPOINT, UPGRADES, Alert, parse_iso_utc, schema_name, schema_version, upgraded
from pipeline.sinks.files import RewrittenFile

log = logging.getLogger(__name__)

SCOPES = ("gpu", "node", "rack", "point")
IDENTITY = {"gpu": ("gpu_uuid", "node", "site", "rack", "gpu"), "node": ("node", "site", "rack"),
            "rack": ("site", "rack"), "point": ("device", "metric", "site", "rack", "device_class")}
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
    """`owner`: the identity column whose key places an entity's state: `owner` (its data's
    key: the rack tier) or `site` (the site tier, whose input is keyed by site)."""

    def __init__(self, engine: Engine, partitions: int, owner: str = "owner") -> None:
        self.engine = engine
        self.partitions = partitions
        self.owner = owner

    def repartition(self, partitions: int) -> None:
        """The cluster's partition count (not kafka.partitions where they differ): where each
        entity's checkpoint goes, and the partition whose event time each rack follows."""
        self.partitions = partitions
        self.engine.inventory.repartition(partitions)

    def partition(self, owners: pa.Array) -> np.ndarray:
        """The partition of each owner key (where its data arrives); -1 for none."""
        return np.fromiter((partition_for(key, self.partitions) if key else -1 for key in owners.to_pylist()),
                           np.int64, len(owners))

    def _rows(self, scope: str, partitions: set[int]) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
        """Identities of the scope's entities in `partitions`, their slots and partitions."""
        ids = self.engine.identities(scope)
        owner_part = self.partition(ids.column(self.owner))
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
                if tr.spec.entity == scope:
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
        firing alerts). Into partitions forgotten first (`forget`: their clocks and GPUs too), or a
        fresh engine."""
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
            e.inventory.place(scope, slots, rows)
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
                    if name not in e.trackers:  # an alert this version no longer has
                        continue
                    e.trackers[name].adopt(int(slots[i]), _alert(d))
                    summary["alerts"] += 1
        for tr in e.trackers.values():
            tr.refresh()
        return summary

    def forget(self, partitions: set[int]) -> None:
        """Drop the state of partitions this process no longer owns: the next owner
        continues from the checkpoint, and our copy would go stale. Their event-time clocks
        go too, and their GPUs are let go: a process fenced after its last commit may be given
        them back, and reads again from that commit what its clocks had passed (it would all
        be late) and the moves and replacements it had seen."""
        e = self.engine
        state = e.state()
        e.gpu_time.forget(np.asarray(sorted(partitions), np.int64))
        gpus = e.inventory.gpus_of(partitions)  # (retired ones too: a replacement read again)
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
            elif scope == "point":
                e.point_series.forget(slots)
            for tr in e.trackers.values():
                if tr.spec.entity == scope:
                    tr.forget(slots)
        if gpus.size:  # (after their state: let go, they have no partition)
            e.gpu_series.forget(gpus)
            e.inventory.let_go(gpus)


class _OnePartition(Checkpointer):
    """Every entity in partition 0; retired ones (no owner) in none."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, 1)

    def partition(self, owners: pa.Array) -> np.ndarray:
        return np.where(pc.is_valid(owners).to_numpy(zero_copy_only=False), 0, -1)


class CheckpointUnreadable(Exception):
    """A checkpoint file that is not one this version can restore."""


class LocalCheckpoint:
    """The embedded daemon's checkpoint: one Arrow IPC file, replaced atomically, with the
    detector and alert state of every entity (the Kafka checkpoint's format, as one
    partition)."""

    FILE = "detector.arrow"

    def __init__(self, engine: Engine, directory: Path) -> None:
        self.engine = engine
        self.path = Path(directory) / self.FILE
        self.saves = 0
        self._file = RewrittenFile(log, self.path, "detect", "detection goes on, a restart now would resume from "
                                   "the previous checkpoint")

    def snapshot(self) -> pa.RecordBatch | None:
        """The state now (on the event loop: the engine must not move meanwhile)."""
        return _OnePartition(self.engine).snapshot({0}).get(0)

    def write(self, batch: pa.RecordBatch | None) -> bool:
        """Encode and replace the file (disk work: in a worker thread); False when it failed."""
        if batch is None:
            batch = pa.RecordBatch.from_pylist([], schema=CHECKPOINT)
        batch = batch.replace_schema_metadata({**batch.schema.metadata,
                                               b"fleetwatch.saved_at": str(time.time()).encode()})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        return self._file.write(sink.getvalue().to_pybytes())

    async def save(self) -> bool:
        """Snapshot now, write it off the loop. A failure is logged (once until a save
        works again) and detection goes on; the previous checkpoint stays in place."""
        if not await asyncio.to_thread(self.write, self.snapshot()):
            return False
        self.saves += 1
        return True

    def load(self) -> pa.RecordBatch | None:
        """The saved batch; None when there is none; CheckpointUnreadable when it is corrupt
        or of another schema."""
        try:
            with pa.memory_map(str(self.path)) as source:
                table = pa.ipc.open_file(source).read_all()
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as e:
            raise CheckpointUnreadable(f"not an Arrow IPC file ({e})") from None
        schema = table.schema
        try:
            name, version = schema_name(schema), schema_version(schema)
        except (KeyError, TypeError, ValueError):
            raise CheckpointUnreadable("no fleetwatch schema in its metadata") from None
        if (name, version) == (schema_name(CHECKPOINT), schema_version(CHECKPOINT)):
            expected = CHECKPOINT
        elif (name, version) in UPGRADES:  # written by an older version: read, then upgraded
            expected = UPGRADES[(name, version)][0]
        else:
            raise CheckpointUnreadable(f"schema {name} v{version}, expected {schema_name(CHECKPOINT)} "
                                       f"v{schema_version(CHECKPOINT)}")
        for f in expected:
            if f.name not in schema.names or schema.field(f.name).type != f.type:
                raise CheckpointUnreadable(f"column {f.name!r} missing or not {f.type}")
        bad = [f.name for f in schema if f.name not in expected.names and f.type != pa.float64()]
        if bad:
            raise CheckpointUnreadable(f"state columns {bad} are not float64")
        if not table.num_rows:
            return None
        # Fixed fields first, in order (as the current version wrote them), then the state.
        table = table.select([*expected.names, *(n for n in schema.names if n not in expected.names)])
        return upgraded(table.combine_chunks().to_batches()[0])

    def restore(self) -> dict[str, int] | None:
        """Load the file into the engine (which must be fresh); the summary of what it
        held, or None when there is none. An unreadable file is moved aside with a warning
        and None returned; if it failed half-way the engine is not usable: `restore`
        raises CheckpointUnreadable after moving the file aside, and the caller starts
        with a fresh engine."""
        try:
            batch = self.load()
        except CheckpointUnreadable as e:
            self._set_aside(str(e))
            return None
        if batch is None:
            return None
        try:
            summary = _OnePartition(self.engine).restore(batch)
        except Exception as e:  # noqa: BLE001 (any defect of the file: start cold rather than not at all)
            self._set_aside(f"{type(e).__name__}: {e}")
            raise CheckpointUnreadable(str(e)) from e
        self.engine.resume()
        return summary

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.unreadable-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
        try:
            os.replace(self.path, aside)
        except OSError as e:
            log.warning("detect: cannot move the unreadable checkpoint %s aside (%s)", self.path, e)
            aside = self.path
        log.warning("detect: the checkpoint %s cannot be restored (%s); moved to %s, starting cold: baselines warm "
                    "up again and alerts firing before the restart resolve or fire again", self.path, why, aside.name)


def _family(alertname) -> str:
    from pipeline.detect.catalog import ALERTS_BY_NAME
    spec = ALERTS_BY_NAME.get(alertname)
    return spec.family if spec is not None else ""


def reconcile(engine: Engine, logged: dict[str, dict[str, Any]], now: float) -> list[tuple[datetime, Alert]]:
    """Make the engine's firing alerts those that alerts.jsonl (what operators were told:
    the latest change per fingerprint) says are firing. The checkpoint can lag the log by
    up to a checkpoint interval after a crash:
    - firing in the engine, not in the log (never told, or told resolved since): dropped;
      it fires afresh if its condition holds;
    - firing in the log, not in the engine (fired after the checkpoint, or no checkpoint):
      resolved now, returned as state changes to publish; it fires again if its
      condition holds, instead of staying firing for ever.
    Alerts firing in both go on from the checkpoint, and are not raised again. The remediation
    role's own alerts are left to it: it restores them with its cases (remediate/store.py)."""
    told = {fp: a for fp, a in logged.items() if a.get("status") == "firing"
            and _family(a.get("labels", {}).get("alertname")) != "remediate"}
    kept: set[str] = set()
    dropped = 0
    for tr in engine.trackers.values():
        for entity, alert in list(tr.active.items()):
            if alert.fingerprint in told:
                kept.add(alert.fingerprint)
            else:
                tr.forget(np.array([entity]))
                dropped += 1
    at = datetime.fromtimestamp(now, timezone.utc)
    out = []
    for fp, a in told.items():
        if fp in kept:
            continue
        try:
            starts = datetime.fromtimestamp(parse_iso_utc(a["startsAt"]), timezone.utc)
            out.append((at, Alert(labels=dict(a["labels"]), annotations=dict(a.get("annotations") or {}),
                                  starts_at=starts, detector=str(a.get("detector") or ""),
                                  score=float(a.get("score") or 0.0), evidence=dict(a.get("evidence") or {}),
                                  ends_at=max(at, starts))))
        except (KeyError, TypeError, ValueError) as e:
            log.warning("detect: alert %s in alerts.jsonl is unreadable (%s); not resolved", fp, e)
    if dropped or out:
        log.info("detect: %d alerts firing in the checkpoint were not in alerts.jsonl (fire again if they hold); "
                 "%d firing in alerts.jsonl but not in the detector state are resolved now", dropped, len(out))
    return out
