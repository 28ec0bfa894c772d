"""Content checks where messages enter a consumer (detect, archive, notify).

A message can decode to exactly the right schema and still hold what no consumer can
use: a null in a non-nullable column (Parquet refuses the whole file), an empty node
name, a GPU index of -1, a temperature of 1e308 C (it would poison every baseline), a
timestamp that is not nanoseconds since the epoch, or a reading from a clock that lies
(a day ahead, or 1970). Each consumer screens what it reads with a Gate:

    gate = Gate("archive", FileDeadLetters(path), window)   # or KafkaDeadLetters(subscription)
    messages = await gate.screen(messages)                 # the valid rows, message by message

`split()` takes one batch apart into its valid rows and its rejected rows with the
reason, a batch at a time (pyarrow.compute and numpy; Python runs per rule that is
broken, per alert row, and per dead-lettered row). Only the bad rows are rejected;
the rest of their message goes on. Rejected rows are dead-lettered (over Kafka to the
dead-letter topic, in-process to <data_dir>/deadletter/intake.jsonl) before the
consumer commits, counted per reason, and logged once per reason.

Reasons:
  null_field     a non-nullable column is null (or an event's GPU index, where it names a GPU UUID)
  empty_identity an identity column (site, node, GPU UUID, device, metric, ...) is empty
  out_of_range   a GPU index outside 0-1023, a quality other than 0/1, or a facility value
                 beyond anything physical
  value_out_of_range  a GPU reading beyond anything physical (a P-state outside 0-32, a 345 C
                 die): only that value is nulled, and the row goes on with its other readings
                 (the row as it came is dead-lettered with this reason); NaN, Inf and negative
                 metric values are not touched: detect counts and skips them per value
  bad_timestamp  a time outside 2000-2200 (epoch seconds or milliseconds in a nanosecond
                 column, or the int64 limits)
  time_ahead     a reading stamped more than intake.max_ahead_s ahead of the receiver's clock
  too_old        a reading older than intake.max_age_s
  bad_alert      an alert whose status is not firing/resolved, whose labels_json is not a
                 JSON object of strings with an alertname, or whose evidence_json is not JSON
  detector_error a message the detectors raised an error on, past these checks (roles/detect.py):
                 dead-lettered whole, so that it stops neither the role nor, at every restart,
                 the partition it came in
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bus.base import Message, Topic
from pipeline.model import ALERT, EVENT, FACILITY_SAMPLE, FAULT_LABEL, GPU_SAMPLE, NODE_HEALTH, TS, iso_utc, \
    schema_name
from pipeline.sinks.files import Rotation, append_durably
from pipeline.threads import DaemonThread

log = logging.getLogger(__name__)

NULL_FIELD = "null_field"
EMPTY_IDENTITY = "empty_identity"
OUT_OF_RANGE = "out_of_range"
VALUE_OUT_OF_RANGE = "value_out_of_range"  # one reading nulled: its row goes on
BAD_TIMESTAMP = "bad_timestamp"
TIME_AHEAD = "time_ahead"
TOO_OLD = "too_old"
BAD_ALERT = "bad_alert"
DETECTOR_ERROR = "detector_error"

TOPIC_SCHEMAS: dict[Topic, pa.Schema] = {
    Topic.GPU: GPU_SAMPLE, Topic.FACILITY: FACILITY_SAMPLE, Topic.EVENTS: EVENT, Topic.ALERTS: ALERT,
    Topic.HEALTH: NODE_HEALTH, Topic.LABELS: FAULT_LABEL}
READINGS = frozenset({Topic.GPU, Topic.FACILITY, Topic.EVENTS})  # judged against the receiver's clock

_IDENTITY = {"gpu_sample": ("site", "node", "gpu_uuid"), "facility_sample": ("site", "device", "metric"),
             "event": ("site", "node", "kind"), "alert": ("fingerprint", "alertname", "status"),
             "node_health": ("node", "state"), "fault_label": ("fault_type",)}
_TOGETHER = {"event": (("gpu_uuid", "gpu"),)}  # (column, what must not be null where it is set)
# C: a die or HBM shuts down long before; above, a broken sensor or an exporter's garbage (dcgm-exporter
# 3.3.5 served GPU temperatures of 345 and 82505 C: NVIDIA/dcgm-exporter#312).
_TEMP = (None, 200.0)
_COUNT = (None, 1e15)  # cumulative counters; DCGM's int64 "no value" is 9.2e18
# (low, high) of values that can be true; None = no limit that way.
_RANGES = {
    # (A GPU's power and limit under 10 kW: the largest parts are near 1.4 kW; 65535 W is a garbled read's.)
    "gpu_sample": {"gpu": (0, 1023), "pstate": (0, 32), "power_w": (None, 1e4), "energy_j": (None, 1e15),
                   "gpu_temp_c": _TEMP, "mem_temp_c": _TEMP, "slowdown_temp_c": _TEMP,
                   "sm_clock_mhz": (None, 1e5), "mem_clock_mhz": (None, 1e5),
                   "util_gpu": (None, 1.0), "util_mem": (None, 1.0), "mem_used_bytes": (None, 2 ** 50),
                   "power_limit_w": (None, 1e4), "clock_event_reasons": (None, 2 ** 32),
                   **dict.fromkeys(("pcie_replay_total", "ecc_sbe_volatile_total", "ecc_dbe_volatile_total",
                                    "remapped_rows_correctable", "remapped_rows_uncorrectable",
                                    "nvlink_crc_errors_total"), _COUNT)},
    "facility_sample": {"value": (-1e18, 1e18), "quality": (0, 1)},
    "event": {"gpu": (0, 1023)},
    "fault_label": {"gpu": (0, 1023)},
}
# Where a value out of its range rejects the whole row: what says which GPU, or a row's one value.
# Elsewhere (a GPU reading) only that value is nulled: the row's other readings go on.
_ROW_RANGES = {("gpu_sample", "gpu"), ("facility_sample", "value"), ("facility_sample", "quality"),
               ("event", "gpu"), ("fault_label", "gpu")}
# Every timestamp: nanoseconds since the epoch between these years.
PLAUSIBLE_NS = (946_684_800 * 10**9, 7_258_118_400 * 10**9)  # 2000-01-01, 2200-01-01


class TimeWindow:
    """Readings must lie within [now - max_age_s, now + max_ahead_s] of the receiver's
    clock `now` (unix seconds; injected: the simulator's clock where it runs in the same
    process, the wall clock otherwise). 0 turns a limit off."""

    def __init__(self, max_ahead_s: float = 300.0, max_age_s: float = 0.0,
                 now: Callable[[], float] = time.time) -> None:
        self.max_ahead_s, self.max_age_s, self.now = max_ahead_s, max_age_s, now

    def bounds_ns(self) -> tuple[int | None, int | None]:
        """(oldest, newest) timestamp accepted now, in ns; None where there is no limit."""
        if not self.max_ahead_s and not self.max_age_s:
            return None, None
        now_ns = int(self.now() * 1e9)
        return (now_ns - int(self.max_age_s * 1e9) if self.max_age_s else None,
                now_ns + int(self.max_ahead_s * 1e9) if self.max_ahead_s else None)

    def judge(self, ts_ns: int) -> tuple[str, str] | None:
        """(reason, detail) if one reading's time is outside the window, else None."""
        lo, hi = self.bounds_ns()
        if hi is not None and ts_ns > hi:
            return TIME_AHEAD, (f"stamped {(ts_ns - hi) / 1e9 + self.max_ahead_s:.0f} s ahead of the receiver's "
                                f"clock (intake.max_ahead_s = {self.max_ahead_s:g})")
        if lo is not None and ts_ns < lo:
            return TOO_OLD, (f"stamped {(lo - ts_ns) / 1e9 + self.max_age_s:.0f} s before the receiver's clock "
                             f"(intake.max_age_s = {self.max_age_s:g})")
        return None


@dataclass(frozen=True)
class Rejection:
    reason: str          # one of the reasons above: what is counted
    detail: str          # which column, which value, which limit
    rows: pa.RecordBatch  # the rejected rows, as they came


class _Verdicts:
    """The first rule each row breaks (-1: none), rule by rule over whole columns."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rule: np.ndarray | None = None
        self.rules: list[tuple[str, str]] = []

    def mark(self, bad: np.ndarray, reason: str, detail: str) -> None:
        if self.rule is None:
            self.rule = np.full(self.n, -1, np.int16)
        new = bad & (self.rule < 0)
        if new.any():
            self.rule[new] = len(self.rules)
            self.rules.append((reason, detail))


def _mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def _first(col: pa.Array, bad: np.ndarray) -> Any:
    """The first offending value, for the detail."""
    v = col.filter(pa.array(bad))[0]
    return v.cast(pa.int64()).as_py() if pa.types.is_timestamp(v.type) else v.as_py()


def split(topic: Topic, batch: pa.RecordBatch, window: TimeWindow | None = None,
          bounds: tuple[int | None, int | None] | None = None) -> tuple[pa.RecordBatch, list[Rejection]]:
    """(valid rows, rejections) of one batch (or of a Table: then a Table of valid rows, and
    tables of rejected ones). `bounds` are the window's bounds_ns() when the caller took them
    already (one clock reading per get_batch)."""
    schema = TOPIC_SCHEMAS.get(topic)
    if schema is None or batch.num_rows == 0:
        return batch, []
    name = schema_name(schema)
    v = _Verdicts(batch.num_rows)
    for f in schema:
        col = batch.column(f.name)
        if not f.nullable and col.null_count:
            v.mark(_mask(col.is_null()), NULL_FIELD, f"{f.name} is null (the schema declares it non-nullable)")
    for needs, c in _TOGETHER.get(name, ()):
        col = batch.column(c)
        if col.null_count:
            bad = _mask(pc.and_(batch.column(needs).is_valid(), col.is_null()))
            if bad.any():
                v.mark(bad, NULL_FIELD, f"{c} is null where {needs} is set")
    for c in _IDENTITY.get(name, ()):
        col = batch.column(c)
        lengths = pc.binary_length(col)
        if (pc.min(lengths).as_py() or 0) == 0 and lengths.null_count < len(lengths):
            v.mark(_mask(pc.fill_null(pc.equal(lengths, 0), False)), EMPTY_IDENTITY, f"{c} is empty")
    if topic in READINGS and window is not None:
        lo, hi = bounds if bounds is not None else window.bounds_ns()
        if lo is not None or hi is not None:
            ts = batch.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
            valid = _mask(batch.column("ts").is_valid())
            if hi is not None and (valid & (ts > hi)).any():
                bad = valid & (ts > hi)
                v.mark(bad, TIME_AHEAD, f"ts {iso_utc(int(ts[bad][0]) / 1e9)} is more than "
                                        f"{window.max_ahead_s:g} s ahead of the receiver's clock (intake.max_ahead_s)")
            if lo is not None and (valid & (ts < lo)).any():
                bad = valid & (ts < lo)
                v.mark(bad, TOO_OLD, f"ts {_when(int(ts[bad][0]))} is older than {window.max_age_s:g} s before the "
                                     f"receiver's clock (intake.max_age_s)")
    for f in schema:
        if f.type != TS:
            continue
        col = batch.column(f.name)
        lo_ts, hi_ts = (s.as_py() for s in pc.min_max(col.cast(pa.int64())).values())
        if lo_ts is not None and (lo_ts < PLAUSIBLE_NS[0] or hi_ts >= PLAUSIBLE_NS[1]):
            ns = col.cast(pa.int64()).to_numpy(zero_copy_only=False)
            bad = _mask(col.is_valid()) & ((ns < PLAUSIBLE_NS[0]) | (ns >= PLAUSIBLE_NS[1]))
            v.mark(bad, BAD_TIMESTAMP, f"{f.name} {int(ns[bad][0])} is not nanoseconds since the epoch between "
                                       f"2000 and 2200 ({_when(int(ns[bad][0]))})")
    nulled: list[tuple[str, np.ndarray, str]] = []  # (column, rows, detail): readings taken out, rows kept
    for c, (lo_v, hi_v) in _RANGES.get(name, {}).items():
        col = batch.column(c)
        low, high = (s.as_py() for s in pc.min_max(col).values())
        if low is None:
            continue  # all null (NaN counts as a value but compares false below)
        if (lo_v is not None and low < lo_v) or (hi_v is not None and high > hi_v):
            x = col.to_numpy(zero_copy_only=False).astype(np.float64)
            with np.errstate(invalid="ignore"):
                bad = np.isfinite(x) & ((x < lo_v if lo_v is not None else False) |
                                        (x > hi_v if hi_v is not None else False))
            if bad.any():
                detail = (f"{c} = {_first(col, bad)!r} is outside "
                          f"[{'' if lo_v is None else lo_v}, {'' if hi_v is None else hi_v}]")
                if (name, c) in _ROW_RANGES:
                    v.mark(bad, OUT_OF_RANGE, detail)
                else:
                    nulled.append((c, bad, detail))
    if name == "alert":
        _alerts(batch, v)
    kept = np.ones(batch.num_rows, bool) if v.rule is None else v.rule < 0
    rejected = [Rejection(reason, detail, batch.filter(pa.array(v.rule == k)))
                for k, (reason, detail) in enumerate(v.rules)]
    for c, bad, detail in nulled:  # one reading a GPU cannot give: that value null, the rest of its row kept
        bad &= kept
        if bad.any():
            rejected.append(Rejection(VALUE_OUT_OF_RANGE, f"{detail}: that value nulled, the rest of the row kept",
                                      batch.filter(pa.array(bad))))
    for c, bad, _ in nulled:
        i = batch.schema.get_field_index(c)
        batch = batch.set_column(i, batch.schema.field(i), pc.if_else(pa.array(bad), None, batch.column(c)))
    if not rejected:
        return batch, []
    return (batch if kept.all() else batch.filter(pa.array(kept))), rejected


def _when(ns: int) -> str:
    try:
        return iso_utc(ns / 1e9)
    except (ValueError, OverflowError, OSError):
        return f"{ns} ns"


# A label name Alertmanager takes (model.LabelName.IsValid): it answers 400 for a push holding another,
# and a firing alert is pushed again each minute.
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _alerts(batch: pa.RecordBatch, v: _Verdicts) -> None:
    """Alerts are a handful per tick: their JSON is checked row by row."""
    status = batch.column("status")
    v.mark(~_mask(pc.fill_null(pc.is_in(status, pa.array(["firing", "resolved"])), False)), BAD_ALERT,
           "status is not firing or resolved")
    bad_labels = np.zeros(batch.num_rows, bool)
    bad_evidence = np.zeros(batch.num_rows, bool)
    for i, (labels, evidence) in enumerate(zip(batch.column("labels_json").to_pylist(),
                                               batch.column("evidence_json").to_pylist())):
        try:
            obj = json.loads(labels) if labels is not None else None
        except ValueError:
            obj = None
        bad_labels[i] = not (isinstance(obj, dict) and isinstance(obj.get("alertname"), str)
                             and all(isinstance(x, str) for x in obj.values())
                             and all(_LABEL_NAME.fullmatch(k) for k in obj))
        if evidence is not None:
            try:
                json.loads(evidence)
            except ValueError:
                bad_evidence[i] = True
    v.mark(bad_labels, BAD_ALERT, "labels_json is not a JSON object of strings with an alertname, each name a "
                                  "Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*: Alertmanager refuses others)")
    v.mark(bad_evidence, BAD_ALERT, "evidence_json is not JSON")


# ---- dead letters ------------------------------------------------------------------

class DeadLetters(Protocol):
    where: str

    async def write(self, group: str, rejected: list[tuple[Message, Rejection]]) -> None:
        """Durable before it returns: the consumer commits its input after this."""


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class FileDeadLetters:
    """In-process: one JSON line per rejected row, `{"time", "group", "topic", "reason",
    "detail", "row"}` (timestamps in the row as RFC 3339 with nanoseconds), fsynced in a thread
    (on the event loop, a slow disk had stalled every role at each bad batch, a hung one stopped
    the process), one writer at a time: the gates of a process share the file and its rotation."""

    _one_writer = threading.Lock()

    def __init__(self, path: Path, rotation: Rotation | None = None) -> None:
        self.path = Path(path)
        self.rotation = rotation  # sinks/files.Rotation: daily and by size
        self.where = str(self.path)
        self.failing = False
        self.lost = 0  # rejected rows not kept: the file could not be written (a full disk)
        self._thread: DaemonThread | None = None

    def _append(self, text: str) -> None:
        with self._one_writer:  # (on the file's DaemonThread: a hung write must not hold the process's exit)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_durably(self.path, text, self.rotation)

    async def write(self, group: str, rejected: list[tuple[Message, Rejection]]) -> None:
        lines = []
        for message, rejection in rejected:
            rows = rejection.rows
            cols = [pc.strftime(c, format="%Y-%m-%dT%H:%M:%SZ") if pa.types.is_timestamp(c.type) else c
                    for c in rows.columns]
            table = pa.RecordBatch.from_arrays(cols, names=rows.schema.names)
            head = {"time": iso_utc(time.time()), "group": group, "topic": str(message.topic),
                    "reason": rejection.reason, "detail": rejection.detail}
            lines += [json.dumps({**head, "row": {k: _jsonable(x) for k, x in r.items()}}, default=str) + "\n"
                      for r in table.to_pylist()]
        try:
            if self._thread is None:
                self._thread = DaemonThread("intake-dead-letters")
            await asyncio.wrap_future(self._thread.submit(self._append, "".join(lines)))  # one fsync per get_batch
        except OSError as e:  # a full disk must not stop the consumer: the bad rows are counted, not kept
            if not self.failing:
                log.error("%s: cannot write dead letters to %s (%s): rejected rows are counted but not kept until "
                          "it works again", group, self.path, e)
            self.failing = True
            self.lost += len(lines)
            return
        if self.failing:
            log.warning("%s: dead letters are written to %s again (%d rejected rows were not kept)", group,
                        self.path, self.lost)
        self.failing = False


class KafkaDeadLetters:
    """Over Kafka: the rejected rows as one message on the dead-letter topic (KafkaSubscription.dead_letter_rows)."""

    def __init__(self, subscription) -> None:
        self.subscription = subscription
        self.where = subscription.bus.wire("fleetwatch.deadletter")

    async def write(self, group: str, rejected: list[tuple[Message, Rejection]]) -> None:
        await asyncio.gather(*(self.subscription.dead_letter_rows(m, r.rows, r.reason, r.detail)
                               for m, r in rejected))  # sent together, each acknowledged


def dead_letters_for(subscription, cfg) -> DeadLetters:
    """The dead-letter path of a consumer: the bus's topic where there is one, else a file
    under the config's data_dir, rotated as its daemon section says."""
    if hasattr(subscription, "dead_letter_rows"):
        return KafkaDeadLetters(subscription)
    return FileDeadLetters(Path(cfg.data_dir) / "deadletter" / "intake.jsonl", Rotation.of(cfg.daemon))


class Gate:
    """One consumer's intake: screens each message, dead-letters what is bad, counts it per reason."""

    def __init__(self, group: str, dead_letters: DeadLetters, window: TimeWindow | None = None) -> None:
        self.group = group
        self.dead_letters = dead_letters
        self.window = window
        self.rejected: dict[str, int] = {}  # reason -> rows

    async def screen(self, messages: list[Message]) -> list[Message]:
        """The messages with their bad rows taken out (a message with none left is dropped)."""
        return [m for m in await self.verdicts(messages) if m is not None]

    async def verdicts(self, messages: list[Message]) -> list[Message | None]:
        """For each message: itself, its valid rows, or None when none is valid."""
        out, rejected = self.judge(messages)
        await self.dead_letter(rejected)
        return out

    async def dead_letter(self, rejected: list[tuple[Message, Rejection]]) -> None:
        """What judge() rejected, counted and dead-lettered. The write goes on when its caller is cancelled
        (a stop): other groups may have taken the verdict that dropped these rows."""
        if rejected:
            for m, r in rejected:
                self._count(m, r)
            await asyncio.shield(self.dead_letters.write(self.group, rejected))

    def judge(self, messages: list[Message]) -> tuple[list[Message | None], list[tuple[Message, Rejection]]]:
        """Each message's verdict (as verdicts()), and the rejections to dead-letter."""
        bounds = self.window.bounds_ns() if self.window is not None else None
        clean = self._clean_topics(messages, bounds)
        out: list[Message | None] = []
        rejected: list[tuple[Message, Rejection]] = []
        for m in messages:
            if m.topic in clean:
                out.append(m)
                continue
            valid, rejections = split(m.topic, m.value, self.window, bounds)
            rejected += [(m, r) for r in rejections]
            out.append(m if not rejections else dataclasses.replace(m, value=valid) if valid.num_rows else None)
        return out, rejected

    def _clean_topics(self, messages: list[Message], bounds) -> set[Topic]:
        """Topics whose messages are all clean, checked as one table per topic (over Kafka a
        get_batch returns many messages: one pass instead of one each). The table's chunks are
        the messages' batches, not a copy: concatenating them cost more than the checks."""
        by_topic: dict[Topic, list[pa.RecordBatch]] = {}
        for m in messages:
            by_topic.setdefault(m.topic, []).append(m.value)
        clean = set()
        for topic, batches in by_topic.items():
            if len(batches) < 2:
                continue  # checked on its own below
            try:
                combined = pa.Table.from_batches(batches)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # schemas differ (open schemas): one by one
                continue
            if not split(topic, combined, self.window, bounds)[1]:
                clean.add(topic)
        return clean

    async def reject(self, message: Message, reason: str, detail: str) -> None:
        """A whole message rejected after the screen (a detector's error on it): dead-lettered and counted."""
        r = Rejection(reason, detail, message.value)
        await self.dead_letters.write(self.group, [(message, r)])
        self._count(message, r)

    def _count(self, message: Message, r: Rejection) -> None:
        if r.reason not in self.rejected:
            log.warning("%s: %d %s row(s) rejected (%s: %s); dead-lettered to %s. Further %s rows are counted "
                        "and dead-lettered, not logged", self.group, r.rows.num_rows, message.topic, r.reason,
                        r.detail, self.dead_letters.where, r.reason)
        self.rejected[r.reason] = self.rejected.get(r.reason, 0) + r.rows.num_rows


class ScreenOnce:
    """In-process every consumer group reads the same Message objects: the first group to
    read a message screens it (with the rest of what it read, as one batch: bus/intake.py
    checks many messages in one pass), dead-letters its bad rows once, and the other
    groups take that verdict. Each group screens through its own `view(topics)`."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.readers: dict[Topic, int] = {}  # how many groups read each topic
        self._verdicts: dict[int, list] = {}  # id(message) -> [message, verdict, readers left]

    def view(self, topics) -> "ScreenOnce.View":
        for t in topics:
            self.readers[t] = self.readers.get(t, 0) + 1
        return ScreenOnce.View(self)

    class View:
        def __init__(self, shared: "ScreenOnce") -> None:
            self.shared = shared

        async def reject(self, message: Message, reason: str, detail: str) -> None:
            await self.shared.gate.reject(message, reason, detail)

        async def screen(self, messages: list[Message]) -> list[Message]:
            shared, verdicts = self.shared, self.shared._verdicts
            new = list({id(m): m for m in messages if id(m) not in verdicts}.values())
            rejected: list = []
            if new:  # the message stays referenced while it is in the table: its id is not reused
                judged, rejected = shared.gate.judge(new)
                for m, v in zip(new, judged):
                    verdicts[id(m)] = [m, v, shared.readers.get(m.topic, 1)]
            out = []
            for m in messages:
                entry = verdicts.get(id(m))
                if entry is None:  # (one message object read again after all its readers: judged anew, here)
                    judged, again = shared.gate.judge([m])
                    rejected += again
                    out += [v for v in judged if v is not None]
                    continue
                entry[2] -= 1
                if entry[2] <= 0:
                    del verdicts[id(m)]
                if entry[1] is not None:
                    out.append(entry[1])
            # (after the verdicts are in the table: a group that reads these messages while the dead letters
            # are written takes them, where it had judged them again, each bad row dead-lettered twice)
            await shared.gate.dead_letter(rejected)
            return out
