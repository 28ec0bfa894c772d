"""The DCGM exporter source: existing dcgm-exporter endpoints, scraped (`fleetwatch dcgm`,
or `fleetwatch run --source dcgm --dcgm-targets URL[,URL...]`).

- Targets: `dcgm.targets` (URLs or HOST:PORT) and `dcgm.targets_file` (one per line, or
  Prometheus file_sd JSON whose labels may say `site`, `rack` and `node`), read at start.
- Each target is scraped every `dcgm.interval_s` on its own schedule (at most `dcgm.concurrency`
  in flight, aiohttp, each within `dcgm.timeout_s`), so a slow target delays no other. The text
  is parsed in a worker thread (prometheus_client's parser, each distinct label set once per
  text: `dcgm_samples`); the `DCGM_FI_*` fields of the counters table (sources/dcgm_fields.py)
  become gpu_samples columns in base units, one row per GPU (its `UUID` label). What arrived is
  published as one batch (keyed by rack on the bus) once every target has answered or failed, or
  at the latest every min(interval, 1 s). Fields an exporter does not send, or sends as NaN,
  Inf or one of DCGM's blank values (an older exporter's "not supported", 9223372036854775794),
  are null.
- Who is who: the node is the target's `node` label, else the exporter's `hostname` label
  (`Hostname` before dcgm-exporter#655) unless it names no node (`localhost`, a container's
  id), else the target's host; site and rack are the target's labels, else the mapping file's
  (`dcgm.mapping_file`, CSV node,site,rack), else `dcgm.site`/`dcgm.rack`. `gpu`,
  `modelName`, `pci_bus_id`, `DCGM_FI_DRIVER_VERSION` (and `DCGM_FI_DEV_SERIAL` where the
  exporter enables it) fill the row, and the pod mapping's `pod`, `namespace` and `container`
  and the HPC job mapping's `hpc_job` (the `job` column) say who uses the GPU. A GPU seen in
  several series (several pods or jobs, MIG instances) is one row, its pods and jobs
  comma-separated; a MIG GPU's memory is its instances' sum and its utilisation their
  graphics activity by compute slices (`_mig_gpu`).
- Events: `DCGM_FI_DEV_XID_ERRORS` is the last XID's value: a change to a non-zero value is an
  `xid` event (the value at a GPU's first scrape is its baseline: the gauge cannot say when that
  XID happened). dcgm-exporter's own XID counters (`DCGM_EXP_XID_ERRORS_TOTAL`, `_COUNT`, a series
  per `xid`) show an XID that repeats, which the gauge cannot; the gauge and the counters telling of
  one XID are one event (`XidTally`). Energy going backwards is a `gpu_reset` event, as the NVML
  agent reports it.
- Failures: a target that is down (connection refused, no route, DNS), slow (past the
  timeout), answers other than 200, sends more than 16 MiB, or sends what is not the text
  format, or no GPU, is counted per reason, logged when it starts failing and when it
  recovers, and the others go on without it. Its GPUs go silent and the detectors' usual
  staleness alerts (NodeNotReporting, GpuNotReporting) fire.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError, DcgmConfig, read_secret
from pipeline.model import (COLLECTOR_STARTED, COLLECTOR_STOPPING, GPU_INFO, GPU_METRICS, GPU_SAMPLE, GPU_SETTINGS,
                            GPU_WORKLOAD, TS, is_host_name)
from pipeline.sources.dcgm_fields import BY_COLUMN, BY_NAME, COLUMN_LABELS, GR_ENGINE_ACTIVE, STANDS_IN, \
    WORKLOAD_LABELS, XID, XID_COUNT, XID_TOTAL, column_array, dcgm_blank
from pipeline.waits import wait_any, wait_set

log = logging.getLogger(__name__)

# Host names an exporter may send that name no node (TargetState's node: the target's host instead).
_LOOPBACK = re.compile(r"localhost(\.localdomain)?|ip6-localhost|127(\.\d{1,3}){3}|::1", re.I)
_CONTAINER_ID = re.compile(r"[0-9a-f]{12}")

MAX_BYTES = 16 * 2 ** 20  # an exposition of 8 GPUs is ~25 KB; past this it is not one
# Why a scrape failed (counted per reason).
DOWN, TIMEOUT, HTTP_STATUS, TOO_LARGE, GARBAGE, NO_GPUS = "down", "timeout", "http_status", "too_large", "garbage", \
    "no_gpus"
REASONS = (DOWN, TIMEOUT, HTTP_STATUS, TOO_LARGE, GARBAGE, NO_GPUS)
_LOG_PER_ROUND = 10  # target state changes logged per batch; past that, one line says there are more


class ExpositionError(ValueError):
    """The text is not Prometheus' text format."""


# ---- targets and placement -------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    url: str
    labels: tuple[tuple[str, str], ...] = ()  # site, rack, node from a file_sd entry

    def label(self, name: str) -> str:
        return dict(self.labels).get(name, "")


def target_url(text: str, key: str = "dcgm.targets") -> str:
    """A target as a URL: HOST:PORT gets http:// and /metrics. ConfigError naming `key`."""
    raw = text.strip()
    url = raw if "://" in raw else f"http://{raw}"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or " " in raw:
        raise ConfigError(f"config error: {key} = {raw!r}: expected a URL (http://gpu-node-1:9400/metrics) or "
                          f"HOST:PORT")
    return url if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}/metrics"


def load_targets(cfg: DcgmConfig) -> list[Target]:
    """dcgm.targets, then dcgm.targets_file's; each URL once (the first wins)."""
    out = [Target(target_url(t)) for t in cfg.targets]
    if cfg.targets_file:
        out += _targets_file(Path(cfg.targets_file))
    seen: dict[str, Target] = {}
    for t in out:
        seen.setdefault(t.url, t)
    return list(seen.values())


def _targets_file(path: Path) -> list[Target]:
    key = f"dcgm.targets_file ({path})"
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config error: dcgm.targets_file = {str(path)!r}: cannot read it ({e.strerror})") from None
    if text.lstrip().startswith("["):  # Prometheus file_sd: [{"targets": [...], "labels": {...}}]
        try:
            groups = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config error: {key}: not valid JSON ({e})") from None
        out = []
        for i, g in enumerate(groups):
            if not isinstance(g, dict) or not isinstance(g.get("targets"), list):
                raise ConfigError(f"config error: {key}: entry {i} is not {{\"targets\": [...], \"labels\": {{...}}}}")
            labels = g.get("labels") or {}
            if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
                raise ConfigError(f"config error: {key}: entry {i}'s labels must be an object of strings")
            mine = tuple(sorted((k, v) for k, v in labels.items() if k in ("site", "rack", "node") and v))
            out += [Target(target_url(str(t), key), mine) for t in g["targets"]]
        return out
    return [Target(target_url(line.split("#", 1)[0], key)) for line in text.splitlines()
            if line.split("#", 1)[0].strip()]


def load_mapping(path: str) -> dict[str, tuple[str, str]]:
    """node -> (site, rack) from a CSV with the header node,site,rack (# comments allowed)."""
    if not path:
        return {}
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise ConfigError(f"config error: dcgm.mapping_file = {path!r}: cannot read it ({e.strerror})") from None
    rows = list(csv.reader(lines))
    if not rows or [c.strip() for c in rows[0]] != ["node", "site", "rack"]:
        raise ConfigError(f"config error: dcgm.mapping_file = {path!r}: the first line must be the header "
                          f"node,site,rack")
    out = {}
    for n, row in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in row]
        if len(cells) != 3 or not all(cells):
            raise ConfigError(f"config error: dcgm.mapping_file = {path!r}: line {n} is not node,site,rack: "
                              f"{','.join(row)!r}")
        out[cells[0]] = (cells[1], cells[2])
    return out


# ---- parsing ---------------------------------------------------------------------------------

@dataclass
class Exposition:
    """One exporter's GPUs, a row each, in DCGM order of first appearance."""
    uuids: list[str]
    info: dict[str, list[str | None]]           # gpu, node (hostname), model, pci_bus_id, driver_version, serial
    values: dict[str, np.ndarray]               # gpu_samples column -> base units, NaN = not sent
    xid: np.ndarray                             # last XID per GPU, NaN = not sent
    samples: int = 0                            # DCGM samples read
    # The exporter's XID counters (XID_TOTAL, XID_COUNT): (row, name, XID) -> value, the largest
    # where a GPU repeats them (a MIG GPU's instances).
    xid_counts: dict[tuple[int, str, int], float] = field(default_factory=dict)


_XID_COUNTERS = (XID_TOTAL, XID_COUNT)
_WANTED = frozenset(n for n, f in BY_NAME.items()
                    if f.column or f.stands_in or f.name in (XID, GR_ENGINE_ACTIVE, *_XID_COUNTERS))
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class _NotPlain(Exception):
    """A line the fast path does not take: the reference parser reads the whole text."""


def dcgm_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(metric name, labels, value) of every sample of a DCGM field Fleetwatch reads.

    prometheus_client's parser is the reference, and it reads any text the fast path does not
    take. The fast path reads the lines dcgm-exporter writes (`NAME{LABELS} VALUE [TIMESTAMP]`,
    comments) and has prometheus_client parse each distinct label set once: every field of a
    GPU repeats its labels, so that is once per GPU instead of once per value (13x faster on
    an 8-GPU exposition; a test checks the two agree on generated expositions)."""
    try:
        return _fast_samples(text)
    except _NotPlain:
        return reference_samples(text)


def reference_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """dcgm_samples through prometheus_client's parser alone (ExpositionError if it refuses)."""
    from prometheus_client.parser import text_string_to_metric_families
    out = []
    try:
        for family in text_string_to_metric_families(text):
            name = family.name  # (a counter's samples are named NAME_total by the parser)
            if name not in _WANTED and name.endswith("_total") and name[:-6] in _WANTED:
                name = name[:-6]  # an untyped NAME_total: a counter an OpenMetrics proxy renamed
            if name in _WANTED:
                out += [(name, s.labels, s.value) for s in family.samples]
    except Exception as e:  # the parser raises ValueError (and worse) on what is not its format
        raise ExpositionError(f"not the Prometheus text format: {str(e)[:200]}") from None
    return out


def _fast_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families
    parsed: dict[str, dict[str, str]] = {}
    out = []
    for line in text.split("\n"):
        if not line or line[0] == "#" or line.isspace():
            continue
        brace = line.find("{")
        if brace >= 0:
            name, close = line[:brace], line.rfind("}")
            rest = line[close + 1:]
            if close < brace or not rest[:1].isspace() or " # " in line[brace:]:  # (an exemplar: its own braces)
                raise _NotPlain
        else:
            name, _, rest = line.partition(" ")
        if name not in _WANTED and name.endswith("_total") and name[:-6] in _WANTED:
            name = name[:-6]  # a counter an OpenMetrics proxy renamed (the OpenTelemetry collector's)
        if name not in _WANTED and not _NAME.fullmatch(name):
            raise _NotPlain
        parts = rest.split()
        if not parts:  # a name without a value: the reference parser says which line
            raise _NotPlain
        value, *stamp = parts
        if len(stamp) > 1 or "_" in value or (stamp and not stamp[0].lstrip("-").isdigit()):
            raise _NotPlain
        try:
            number = float(value)
        except ValueError:
            raise _NotPlain from None
        if name in _WANTED:
            block = line[brace + 1:close] if brace >= 0 else ""
            labels = parsed.get(block)
            if labels is None:
                try:
                    labels = next(iter(text_string_to_metric_families(f"x{{{block}}} 0"))).samples[0].labels
                except Exception:
                    raise _NotPlain from None
                parsed[block] = labels
            out.append((name, labels, number))
    return out


def parse_exposition(text: str, fast: bool = True) -> Exposition:
    """The DCGM fields of a dcgm-exporter's text, by GPU (ExpositionError if it is not the
    text format). Unknown metrics are skipped; NaN and Inf are missing values. fast=False:
    prometheus_client's parser alone (bench/dcgm_scrape.py's reference)."""
    rows: dict[str, int] = {}
    info: dict[str, list[str | None]] = {c: [] for c in ("gpu", "node", *GPU_INFO, *GPU_WORKLOAD)}
    found: dict[str, tuple[list[int], list[float]]] = {}
    instances: dict[int, dict[str, MigInstance]] = {}  # a MIG GPU's row -> its GPU instances (GPU_I_ID)
    xid_counts: dict[tuple[int, str, int], float] = {}
    workloads: dict[tuple[int, str], dict[str, None]] = {}  # (row, column) -> its pods or jobs, in order
    samples = dcgm_samples(text) if fast else reference_samples(text)
    for name, labels, value in samples:
        if "nvlink" in labels:  # a link's own series (dcgm-exporter's link entities): the GPU's total is read
            continue
        spec = BY_NAME[name]
        host = labels.get("hostname") or labels.get("Hostname") or ""
        key = labels.get("UUID") or f"{host}:{labels.get('gpu', '')}"
        r = rows.get(key)
        if r is None:
            r = rows[key] = len(rows)
            for column, names in COLUMN_LABELS.items():
                if column in info:
                    info[column].append(next((v for n in names if (v := labels.get(n))), None))
            for column in GPU_WORKLOAD:
                info[column].append(None)
        # A GPU shared by pods or jobs (a series for each): each one, comma-separated, first seen first
        # (a dict per GPU and column: a membership test in the joined text was quadratic in the pods).
        for label, column in WORKLOAD_LABELS.items():
            if v := labels.get(label):
                workloads.setdefault((r, column), {}).setdefault(v, None)
        if name in _XID_COUNTERS:  # (the COUNT's series without an `xid` label says there were none)
            code = xid_code(labels.get("xid", ""))
            if code is not None:  # a value that is no count (NaN, a blank, negative) is there, unknown: NaN
                ok = math.isfinite(value) and value >= 0 and not dcgm_blank(np.float64(value))
                key = (r, name, code)
                xid_counts[key] = max(value, xid_counts.get(key, 0.0)) if ok else xid_counts.get(key, math.nan)
            continue
        if gi := labels.get("GPU_I_ID"):  # (an empty label, as some exporters render it for a whole GPU: none)
            instance = instances.setdefault(r, {}).setdefault(gi, MigInstance(labels.get("GPU_I_PROFILE", "")))
            if dcgm_blank(np.float64(value)):
                value = math.nan
            if name == GR_ENGINE_ACTIVE:
                instance.active = value
                continue
            if spec.column == "mem_used_bytes":
                instance.fb_used = value
                continue
        if name == GR_ENGINE_ACTIVE:  # (a whole GPU's: GPU_UTIL says it)
            continue
        rs, vs = found.setdefault(spec.column or (spec.name if spec.stands_in else XID), ([], []))
        rs.append(r)
        vs.append(value)
    n = len(rows)
    for (r, column), names in workloads.items():
        info[column][r] = ",".join(names)
    values = {}
    for column, (rs, vs) in found.items():
        v = np.full(n, np.nan)
        v[np.asarray(rs, np.int64)] = np.asarray(vs, np.float64)
        v[dcgm_blank(v)] = np.nan  # an older exporter's "no value": missing, as today's leaves it out
        values[column] = v
    for r, of_gpu in instances.items():
        _mig_gpu(values, n, r, list(of_gpu.values()), info["model"][r] or "")
    for spec in STANDS_IN:  # (in the same DCGM unit as the column's own field)
        if (v := values.pop(spec.name, None)) is not None:
            own = values.setdefault(spec.stands_in, np.full(n, np.nan))
            np.copyto(own, v, where=np.isnan(own))
    xid = values.pop(XID, np.full(n, np.nan))
    for column, v in values.items():
        values[column] = BY_COLUMN[column].to_column(v)
    return Exposition(list(rows), info, values, xid, len(samples), xid_counts)


def xid_code(text: str | float) -> int | None:
    """An XID as an event's code (int32): None for 0 (no XID) or what is no XID (a label of other
    digits than ASCII's, a value past int32, a fraction)."""
    if isinstance(text, str):
        if not (text.isascii() and text.isdigit()):
            return None
        text = int(text)
    elif not (math.isfinite(text) and text == int(text)):
        return None
    return int(text) if 0 < text < 2 ** 31 else None


@dataclass
class MigInstance:
    """One GPU instance of a MIG GPU, as dcgm-exporter serves it (GPU_I_ID, GPU_I_PROFILE labels)."""
    profile: str                  # e.g. 3g.40gb: 3 compute slices
    active: float = math.nan      # DCGM_FI_PROF_GR_ENGINE_ACTIVE, 0-1 of the instance
    fb_used: float = math.nan     # DCGM_FI_DEV_FB_USED, MiB of the instance's memory

    @property
    def slices(self) -> int | None:
        m = _MIG_PROFILE.match(self.profile)
        return int(m[1] or m[2]) if m else None


_MIG_PROFILE = re.compile(r"(?:(\d+)c\.)?(\d+)g\.")  # 3g.40gb; a compute instance's 1c.3g.40gb
# Compute slices of a MIG GPU (A100, H100, H200, B200: 7; A30: 4): instances not configured are idle.
_MIG_SLICES = {"A30": 4}


def _mig_gpu(values: dict[str, np.ndarray], n: int, r: int, of_gpu: list[MigInstance], model: str) -> None:
    """A MIG GPU's series are its instances' (NVIDIA/dcgm-exporter#317): the device's fields repeat
    on each, but memory is each instance's own, and GPU_UTIL and MEM_COPY_UTIL read 0 there (#216),
    which would call a busy GPU idle. Its memory is the instances' sum; its utilisation their graphics
    activity weighted by compute slices, where the exporter sends it (DCP fields), else unknown."""
    def column(name: str) -> np.ndarray:
        return values.setdefault(name, np.full(n, np.nan))
    fb = [i.fb_used for i in of_gpu if not math.isnan(i.fb_used)]
    if fb and math.isnan(column("mem_used_bytes")[r]):  # (a series of the whole GPU's, if any, says it)
        column("mem_used_bytes")[r] = sum(fb)
    total = next((k for name, k in _MIG_SLICES.items() if name in model), 7)
    known = all(i.slices is not None and not math.isnan(i.active) for i in of_gpu)
    column("util_gpu")[r] = (min(sum(i.active * i.slices for i in of_gpu) / total, 1.0) * 100.0  # (in %)
                             if known and of_gpu else math.nan)
    column("util_mem")[r] = math.nan


def gpu_index(texts: list[str | None], fallback: int) -> np.ndarray:
    """The `gpu` label as GPU indices (int16); a missing or odd one: its row in the exposition."""
    out = np.empty(len(texts), np.int16)
    for i, t in enumerate(texts):
        out[i] = int(t) if t is not None and t.isascii() and t.isdigit() and int(t) < 1024 else fallback + i
    return out


# ---- the source ---------------------------------------------------------------------------------

@dataclass
class XidTally:
    """How many of one XID one GPU had since Fleetwatch first read it, as each of the exporter's
    series shows it. Each is a lower bound (the last-XID gauge sees a change, not a repeat; the
    window's count misses what leaves the window as new ones come; the total is exact but starts
    again with the exporter), so the largest is what is known, and events go out as it grows."""
    seen: Counter[str] = field(default_factory=Counter)  # series -> XIDs it showed
    last: dict[str, float] = field(default_factory=dict)  # a counter series -> its last value
    sent: float = 0.0                                      # XIDs published as events

    def count(self, name: str, value: float) -> None:
        """A counter series' value now: what it grew by is new (a total that went down started
        again with its exporter: all of it is new; a window's count that went down lost old ones)."""
        old = self.last.get(name, 0.0)
        if not math.isnan(old):  # (NaN: no count yet from a series there before Fleetwatch: the baseline)
            self.seen[name] += value - old if value >= old else (value if name == XID_TOTAL else 0.0)
        self.last[name] = value


@dataclass
class TargetState:
    target: Target
    failing: str = ""                                      # the reason it fails now; "" while it answers
    detail: str = ""
    node: str = ""                                         # the node its last good scrape named
    said_hostname: str = ""                                # the exporter's unusable host name, said once
    last_xid: dict[str, float] = field(default_factory=dict)     # per UUID
    last_energy: dict[str, float] = field(default_factory=dict)  # per UUID (J)
    last_power: dict[str, float] = field(default_factory=dict)   # per UUID (W): with the energy, a reading anew
    xids: dict[str, dict[int, XidTally]] = field(default_factory=dict)  # per UUID, per XID
    listed: set[str] = field(default_factory=set)          # the GPUs its last scrape listed
    said_unrefreshed: bool = False                         # a reading served twice, said once


@dataclass
class Scraped:
    state: TargetState
    batch: pa.RecordBatch | None = None
    events: list[dict] = field(default_factory=list)
    reason: str = ""
    detail: str = ""
    uuids: list[str] = field(default_factory=list)  # every GPU the scrape listed (fresh readings or not)


class DcgmSource:
    """dcgm-exporter endpoints as a Source (sources/base.py)."""

    def __init__(self, cfg: DcgmConfig, targets: list[Target], mapping: dict[str, tuple[str, str]],
                 env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self._ssl, self._auth = tls_and_auth(cfg, env)
        self.states = [TargetState(t) for t in targets]
        self.mapping = mapping
        self.gpu_samples = 0
        self.rounds = 0
        self._announced: dict[tuple[str, str, str], None] = {}  # (site, rack, node) said started, in order
        self.scrapes = 0
        self.failures: Counter[str] = Counter()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcgm-parse")
        self._logged = 0
        self.xid_baselines: list[str] = []  # GPUs whose first scrape showed an XID: said once a round
        self._duplicates: set[tuple[str, str]] = set()  # pairs of targets that list the same GPUs
        self._owner: dict[str, TargetState] = {}  # GPU UUID -> the target it is read from (of two that list it)
        self.unrefreshed = 0  # GPU readings the exporter served again unchanged: left out

    # ---- one target ------------------------------------------------------------------

    async def scrape(self, session, st: TargetState, limit: asyncio.Semaphore) -> Scraped:
        import aiohttp
        async with limit:
            try:
                headers = {"Accept": "text/plain;version=0.0.4"}
                if self._auth and "@" not in urlsplit(st.target.url).netloc:  # (a URL's own user comes first)
                    headers["Authorization"] = self._auth
                async with session.get(st.target.url, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                                       headers=headers, ssl=self._ssl) as resp:
                    if resp.status != 200:
                        return Scraped(st, reason=HTTP_STATUS, detail=f"HTTP {resp.status} {resp.reason or ''}".strip())
                    chunks, size = [], 0
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        if size > MAX_BYTES:
                            return Scraped(st, reason=TOO_LARGE, detail=f"more than {MAX_BYTES // 2 ** 20} MiB")
                        chunks.append(chunk)
                    body = b"".join(chunks)
            except TimeoutError:
                return Scraped(st, reason=TIMEOUT, detail=f"no answer within dcgm.timeout_s = {self.cfg.timeout_s:g}")
            except (aiohttp.ClientError, OSError) as e:
                return Scraped(st, reason=DOWN, detail=f"{type(e).__name__}: {e}"[:300])
        ts = time.time_ns() // 1000 * 1000  # microseconds, as the NVML agent stamps
        try:
            parsed = await asyncio.get_running_loop().run_in_executor(
                self._pool, parse_exposition, body.decode("utf-8", errors="replace"))
        except ExpositionError as e:
            return Scraped(st, reason=GARBAGE, detail=str(e))
        except Exception as e:  # what no exporter should send, found by the parser: this target's problem only
            return Scraped(st, reason=GARBAGE, detail=f"not readable as DCGM fields: {e!r}"[:300])
        if not parsed.uuids:
            old_names = b"\ndcgm_" in body  # dcgm-exporter --use-old-namespace (its 1.x names)
            return Scraped(st, reason=NO_GPUS, detail=f"no DCGM field with a GPU in {len(body)} bytes" + (
                "; its metrics have dcgm-exporter 1.x's names (dcgm_*): run the exporter without "
                "--use-old-namespace" if old_names else ""))
        try:
            batch, events = self.rows(st, parsed, ts)
        except ExpositionError as e:
            return Scraped(st, reason=GARBAGE, detail=str(e))
        except Exception as e:  # labels or values no gpu_samples row can hold: this target's problem only
            return Scraped(st, reason=GARBAGE, detail=f"not readable as GPU samples: {e!r}"[:300])
        return Scraped(st, batch, events, uuids=parsed.uuids)

    @staticmethod
    def _exporters_host(st: TargetState, host: str | None) -> str | None:
        """The exporter's hostname label, unless it cannot name the node: dcgm-exporter -r names
        its host engine's (`localhost` from v4, NVIDIA/dcgm-exporter#572), and in a container
        without NODE_NAME it names the container (Docker's 12 hex digits, #581: a new node at
        each restart), and a label that is no host name (`-oProxyCommand=...` from a tampered
        exporter) must never become a node a command is run for. Then None (the target's host),
        said once per target."""
        if host is None or is_host_name(host) and not (_LOOPBACK.fullmatch(host) or _CONTAINER_ID.fullmatch(host)):
            return host
        if st.said_hostname != host:
            st.said_hostname = host
            log.warning("dcgm: %s: the exporter names its host %r, which is no node's name (dcgm-exporter -r "
                        "names its host engine's; in a container it names the container; or no host name at "
                        "all): its GPUs are node "
                        "%r, the target's host; give the node in the target's labels to name it otherwise",
                        st.target.url, host, urlsplit(st.target.url).hostname)
        return None

    def rows(self, st: TargetState, p: Exposition, ts_ns: int) -> tuple[pa.RecordBatch, list[dict]]:
        """One target's GPUs as gpu_samples rows, and its events (XID changes, GPU resets)."""
        n = len(p.uuids)
        target = st.target
        hosts = sorted({h for h in p.info["node"] if h})
        if len(hosts) > 1:  # (read as one node, every GPU had been the first host's, and an XID named the wrong node)
            raise ExpositionError(
                f"the series of {len(hosts)} hosts in one answer ({', '.join(hosts[:3])}{', ...' * (len(hosts) > 3)}):"
                f" a Prometheus /federate endpoint, or a proxy that merges exporters? Give each node's dcgm-exporter "
                f"as a target")
        node = target.label("node") or self._exporters_host(st, next((h for h in p.info["node"] if h), None)) \
            or urlsplit(target.url).hostname
        mapped = self.mapping.get(node, ("", ""))
        site = target.label("site") or mapped[0] or self.cfg.site
        rack = target.label("rack") or mapped[1] or self.cfg.rack
        st.node = node
        gpu = gpu_index(p.info["gpu"], 0)
        cols: dict[str, Any] = {
            "ts": pa.array(np.full(n, ts_ns, np.int64)).cast(TS), "site": pa.array([site] * n, pa.string()),
            "rack": pa.array([rack] * n, pa.string()), "node": pa.array([node] * n, pa.string()),
            "gpu": pa.array(gpu), "gpu_uuid": pa.array(p.uuids, pa.string())}
        missing = np.full(n, np.nan)
        for m in GPU_METRICS + GPU_SETTINGS:
            cols[m] = column_array(m, p.values.get(m, missing))
        for m in GPU_INFO + GPU_WORKLOAD:
            cols[m] = pa.array(p.info[m], pa.string())
        batch = pa.RecordBatch.from_pydict(cols, schema=GPU_SAMPLE)
        events = []
        energy = p.values.get("energy_j", missing)
        counted: dict[int, list[tuple[str, int, float]]] = {}
        for (r, name, code), value in p.xid_counts.items():
            counted.setdefault(r, []).append((name, code, value))
        fresh = np.ones(n, bool)
        power = p.values.get("power_w", missing)
        for i, uuid in enumerate(p.uuids):  # a handful of GPUs per target: Python per GPU, not per value
            for code, text in self._xids(st, uuid, p.xid[i], counted.get(i, ()), f"{node} GPU {gpu[i]}"):
                events.append(self._event(ts_ns, site, rack, node, int(gpu[i]), uuid, "xid", code, text))
            e = energy[i]
            if math.isfinite(e):
                before = st.last_energy.get(uuid, -math.inf)
                if e < before:
                    events.append(self._event(ts_ns, site, rack, node, int(gpu[i]), uuid, "gpu_reset", None,
                                              f"energy counter went back from {st.last_energy[uuid]:.0f} J to "
                                              f"{e:.0f} J: GPU reset, counters restart at zero"))
                # A live GPU's energy counts on between two of the exporter's reads, and its power moves: both as
                # before is a reading served again (one alone, a counter stuck: the GPU's readings go on).
                fresh[i] = e != before or power[i] != st.last_power.get(uuid, power[i])
                st.last_energy[uuid] = e
            st.last_power[uuid] = power[i]
        if not fresh.all():
            batch = self._unrefreshed(st, batch, fresh)
        return batch, events

    def _unrefreshed(self, st: TargetState, batch: pa.RecordBatch, fresh: np.ndarray) -> pa.RecordBatch:
        """The rows the exporter read anew: one it serves again as it was (scraped more often than it reads
        the GPUs) is no new sample: a counter's rate over it would be 0 then three times the rate."""
        self.unrefreshed += int((~fresh).sum())
        if not st.said_unrefreshed:
            st.said_unrefreshed = True
            log.warning("dcgm: target %s served a GPU's readings unchanged since the last scrape (its energy "
                        "counter too): its exporter reads the GPUs less often than every dcgm.interval_s = %g s. "
                        "Such readings are left out (counted in fleetwatch_dcgm_unrefreshed_readings_total); set "
                        "dcgm.interval_s to the exporter's collect interval (dcgm-exporter -c, 30000 ms by default)",
                        st.target.url, self.cfg.interval_s)
        return batch.filter(pa.array(fresh))

    def _xids(self, st: TargetState, uuid: str, x: float, counted, gpu: str) -> list[tuple[int, str]]:
        """One GPU's new XIDs (code, text) from the last-XID gauge `x` and the exporter's XID counters
        `counted` ((name, code, value); NaN: no count this scrape), by their tallies (XidTally)."""
        first = uuid not in st.xids
        tallies = st.xids.setdefault(uuid, {})
        if math.isfinite(x):
            before, code = st.last_xid.get(uuid), xid_code(float(x))
            if before is None:
                if code:
                    self._baseline(f"{gpu} XID {code}")
            elif code and x != before:
                tallies.setdefault(code, XidTally()).seen[XID] += 1
            st.last_xid[uuid] = x
        now = set()
        for name, code, value in counted:
            now.add((name, code))
            tally = tallies.setdefault(code, XidTally())
            if math.isnan(value):  # there, but no count this scrape: neither new nor gone
                if first:  # (its first count is the baseline)
                    tally.last.setdefault(name, math.nan)
            elif first:  # there before Fleetwatch read the GPU: a baseline
                tally.last[name] = value
                self._baseline(f"{gpu} XID {code}")
            else:
                tally.count(name, value)
        out = []
        for code, tally in tallies.items():
            for name in [n for n in tally.last if (n, code) not in now]:
                tally.last[name] = 0.0  # gone: the window emptied, or the exporter started again
            known, source = max((v, n) for n, v in tally.seen.items()) if tally.seen else (0.0, "")
            if known > tally.sent:
                times = known - tally.sent
                tally.sent = known
                out.append((code, f"from dcgm-exporter's {source}" if times == 1 else
                            f"{times:.0f} times since the last scrape, from dcgm-exporter's {source}"))
        return out

    def _baseline(self, what: str) -> None:
        if what not in self.xid_baselines:
            self.xid_baselines.append(what)

    @staticmethod
    def _event(ts_ns: int, site: str, rack: str, node: str, gpu: int, uuid: str, kind: str, code: int | None,
               text: str) -> dict:
        return {"ts": ts_ns, "site": site, "rack": rack, "node": node, "gpu": gpu, "gpu_uuid": uuid, "kind": kind,
                "code": code, "text": text}

    # ---- batches -------------------------------------------------------------------------

    def batches(self, results: list[Scraped]) -> list[tuple[pa.RecordBatch | None, list[dict]]]:
        """Scrape results as (gpu_samples batch, events) to publish, in order: one batch of every
        target that answered, or more where a target answered twice (a node twice in one batch
        would be one evaluation of two scrapes). Counts and logs each result."""
        self._logged = 0
        generations: list[list[Scraped]] = []
        seen: dict[int, int] = {}
        for r in results:
            self.scrapes += 1
            self._note(r)
            if r.batch is not None:
                g = seen.get(id(r.state), 0)
                seen[id(r.state)] = g + 1
                if g == len(generations):
                    generations.append([])
                generations[g].append(r)
        if self.xid_baselines:
            log.info("dcgm: %d GPUs showed an XID at their first scrape, from before Fleetwatch scraped them: not "
                     "alerted (a new XID will be): %s%s", len(self.xid_baselines), ", ".join(self.xid_baselines[:10]),
                     " ..." if len(self.xid_baselines) > 10 else "")
            self.xid_baselines.clear()
        out = []
        for gen in generations:
            gen = self._one_target_per_gpu(gen)
            if not gen:
                continue
            parts = [r.batch for r in gen]
            batch = parts[0] if len(parts) == 1 else pa.concat_batches(parts)
            self.gpu_samples += batch.num_rows
            out.append((batch if batch.num_rows else None, [e for r in gen for e in r.events]))
        return out or [(None, [])]

    def _one_target_per_gpu(self, gen: list[Scraped]) -> list[Scraped]:
        """A GPU (UUID) two targets list (one exporter under two names, a copied targets file) is read
        from one of them, scrape after scrape, until that one fails or stops listing it (a GPU read from
        both by turns would move between two nodes at every scrape): said once per pair of targets."""
        keep = []
        for r in gen:
            other = next((o for u in r.uuids if (o := self._owner.get(u)) is not None and o is not r.state
                          and not o.failing), None)
            if other is None:
                for u in r.state.listed.difference(r.uuids):
                    if self._owner.get(u) is r.state:
                        del self._owner[u]
                r.state.listed = set(r.uuids)
                self._owner.update(dict.fromkeys(r.uuids, r.state))
                keep.append(r)
            elif (pair := (other.target.url, r.state.target.url)) not in self._duplicates:
                self._duplicates.add(pair)
                log.warning("dcgm: targets %s and %s list the same GPUs (one exporter under two names?): read from "
                            "the first only", *pair)
        return keep

    async def round(self, session, limit: asyncio.Semaphore) -> tuple[pa.RecordBatch | None, list[dict]]:
        """Every target once, at once: their rows as one batch, and their events (tests, bench)."""
        results = await asyncio.gather(*(self.scrape(session, st, limit) for st in self.states))
        self.rounds += 1
        return self.batches(results)[0]

    def _note(self, r: Scraped) -> None:
        """Count a failure; log a target's change of state (failing, another reason, answering again)."""
        st = r.state
        if r.reason:
            self.failures[r.reason] += 1
        if r.reason == st.failing:
            return
        was = st.failing
        st.failing, st.detail = r.reason, r.detail
        self._logged += 1
        if self._logged > _LOG_PER_ROUND:
            if self._logged == _LOG_PER_ROUND + 1:
                log.warning("dcgm: more targets changed state; see the summary and "
                            "fleetwatch_dcgm_scrape_failures_total")
            return
        if r.reason:
            log.warning("dcgm: target %s%s fails: %s (%s); its GPUs go silent until it answers", st.target.url,
                        f" ({st.node})" if st.node else "", r.reason, r.detail)
        else:
            log.info("dcgm: target %s (%s) answers again (it failed: %s)", st.target.url, st.node, was)

    # ---- running ---------------------------------------------------------------------------

    async def run(self, emit, stop: asyncio.Event) -> None:
        """Each target on its own schedule (a slow one delays no other); what arrived is published
        once every target has answered or failed since the last batch, or at the latest every
        min(interval, 1 s)."""
        import aiohttp

        from pipeline.bus.base import Topic
        from pipeline.sources.nvml import events_batch, node_event
        limit = asyncio.Semaphore(self.cfg.concurrency)
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency, ttl_dns_cache=300)
        arrived: list[Scraped] = []
        reported: set[int] = set()
        everyone = asyncio.Event()
        flush_s = min(self.cfg.interval_s, 1.0)

        async def follow(session, st: TargetState) -> None:
            next_at = time.monotonic()
            while not stop.is_set():
                arrived.append(await self.scrape(session, st, limit))
                reported.add(id(st))
                if len(reported) == len(self.states):
                    everyone.set()
                next_at += self.cfg.interval_s
                delay = next_at - time.monotonic()
                if delay < 0:  # the scrape took longer than the interval: skip, do not pile up
                    next_at, delay = time.monotonic(), 0.0
                await wait_set(stop, delay)

        async def publish() -> None:
            taken = arrived[:]
            arrived.clear()
            reported.clear()
            everyone.clear()
            self.rounds += 1
            for batch, events in self.batches(taken):
                if batch is not None:
                    events = self._said_started(batch) + events
                    await emit(Topic.GPU, batch)
                if events:
                    await emit(Topic.EVENTS, events_batch(events))
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                followers = [asyncio.create_task(follow(session, st)) for st in self.states]
                try:
                    while not stop.is_set():
                        await wait_any([everyone, stop], flush_s)
                        if arrived:
                            await publish()
                finally:
                    for f in followers:
                        f.cancel()
                    await asyncio.gather(*followers, return_exceptions=True)
                    if arrived:
                        await publish()
                    if stop.is_set() and self._announced:  # (on request: a restart may follow)
                        await emit(Topic.EVENTS, events_batch([
                            node_event(where, COLLECTOR_STOPPING, None, "the DCGM source stops on request")
                            for where in self._announced]))
        finally:
            self._pool.shutdown(wait=False)
            self.log_summary()

    def _said_started(self, batch) -> list[dict]:
        """`collector_started` for each node this process reads for the first time: detection's bound on its
        silence starts from dcgm.interval_s (a raised interval had been a false NodeNotReporting per node)."""
        new = [w for w in dict.fromkeys(zip(batch.column("site").to_pylist(), batch.column("rack").to_pylist(),
                                            batch.column("node").to_pylist())) if w not in self._announced]
        self._announced.update(dict.fromkeys(new))
        from pipeline.sources.nvml import node_event
        ms = round(self.cfg.interval_s * 1000)
        return [node_event(w, COLLECTOR_STARTED, ms, f"read through dcgm-exporter every {self.cfg.interval_s:g} s")
                for w in new]

    def log_summary(self) -> None:
        failing = [st for st in self.states if st.failing]
        log.info("dcgm: %d scrapes of %d targets: %d GPU samples; failed scrapes: %s%s", self.scrapes,
                 len(self.states), self.gpu_samples, ", ".join(f"{r} {self.failures[r]}" for r in REASONS if self.failures[r]) or "none",
                 "; failing now: " + ", ".join(f"{st.target.url} ({st.failing})" for st in failing[:20])
                 + (f" and {len(failing) - 20} more" if len(failing) > 20 else "") if failing else "")

    def stats(self) -> dict[str, int]:
        return {"gpu_samples": self.gpu_samples, "batches": self.rounds, "scrapes": self.scrapes,
                "scrape_failures": sum(self.failures.values()),
                "targets": len(self.states), "targets_failing": sum(1 for st in self.states if st.failing),
                "unrefreshed": self.unrefreshed, **{f"failed_{r}": self.failures[r] for r in REASONS}}

    def describe(self) -> str:
        failing = sum(1 for st in self.states if st.failing)
        return (f"DCGM exporter source: {len(self.states)} targets every {self.cfg.interval_s:g} s"
                + (f" ({failing} failing)" if failing else ""))


class DcgmMetrics:
    """The source's own counters on /metrics (a prometheus_client collector for ctx.collectors)."""

    def __init__(self, source: DcgmSource) -> None:
        self.source = source

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.source
        scrapes = CounterMetricFamily("fleetwatch_dcgm_scrapes", "dcgm-exporter scrapes tried")
        scrapes.add_metric([], s.scrapes)
        failures = CounterMetricFamily("fleetwatch_dcgm_scrape_failures", "dcgm-exporter scrapes that failed, by "
                                       "reason", labels=["reason"])
        for r in REASONS:
            failures.add_metric([r], s.failures[r])
        targets = GaugeMetricFamily("fleetwatch_dcgm_targets", "dcgm-exporter targets, by state", labels=["state"])
        failing = sum(1 for st in s.states if st.failing)
        targets.add_metric(["up"], len(s.states) - failing)
        targets.add_metric(["failing"], failing)
        unrefreshed = CounterMetricFamily("fleetwatch_dcgm_unrefreshed_readings", "GPU readings an exporter served "
                                          "again unchanged (scraped more often than it reads the GPUs): left out")
        unrefreshed.add_metric([], s.unrefreshed)
        return [scrapes, failures, targets, unrefreshed]


def tls_and_auth(cfg: DcgmConfig, env: Mapping[str, str] | None = None):
    """(the TLS context for https targets: the system's CAs, or dcgm.ca_file's; the Authorization header of
    dcgm.username's basic auth, or None). ConfigError naming the setting; the password is never in a message."""
    import base64

    from pipeline.redact import hide_secret
    from pipeline.tls import ca_context
    context = ca_context("dcgm.ca_file", cfg.ca_file)
    password = read_secret("dcgm.password", cfg.password_env, cfg.password_file, "the exporters' password",
                           "remove dcgm.password_env", env)
    if password is not None and not cfg.username:
        raise ConfigError("config error: dcgm.password_env/_file without dcgm.username: give the user the password "
                          "is for")
    auth = "Basic " + base64.b64encode(cfg.username.encode() + b":" + (password or b"")).decode() \
        if cfg.username else None
    if password:  # (an exporter's proxy may quote the password or the header back: never in a log)
        hide_secret(password.decode(errors="replace"))
        hide_secret(auth.removeprefix("Basic "))
    return context, auth


def preflight(cfg, env=None, warn: bool = True) -> None:
    """Before the source starts: the targets, the mapping, TLS and auth, as it reads them at start."""
    if not load_targets(cfg.dcgm):
        raise ConfigError(f"config error: dcgm.targets_file = {cfg.dcgm.targets_file!r}: names no target")
    load_mapping(cfg.dcgm.mapping_file)
    tls_and_auth(cfg.dcgm, env)


def build(ctx, spec) -> DcgmSource:
    """The dcgm role: dcgm.targets and dcgm.targets_file, placed by dcgm.mapping_file."""
    cfg = ctx.cfg.dcgm
    source = DcgmSource(cfg, load_targets(cfg), load_mapping(cfg.mapping_file))
    ctx.collectors.append(DcgmMetrics(source))
    log.info("dcgm: %d dcgm-exporter targets, every %g s, timeout %g s, %d at once", len(source.states),
             cfg.interval_s, cfg.timeout_s, cfg.concurrency)
    return source
