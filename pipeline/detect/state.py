"""Detector state as flat numpy arrays, one slot per series, and the registry that
maps series identities (GPU UUIDs, facility points) to slots batch at a time."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.detect import kernels


class SlotArrays:
    """Named state arrays that grow together (capacity doubles) as series appear."""

    def __init__(self, spec: dict[str, tuple[type, float]], capacity: int = 64) -> None:
        self._spec = spec
        self.capacity = capacity
        for name, (dtype, fill) in spec.items():
            setattr(self, name, np.full(capacity, fill, dtype))

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._spec)

    def reset(self, slots: np.ndarray, fields: tuple[str, ...]) -> None:
        """Back to the initial values, as for a series never seen."""
        for name in fields:
            getattr(self, name)[slots] = self._spec[name][1]

    def ensure(self, n: int) -> None:
        if n <= self.capacity:
            return
        new_cap = max(n, 2 * self.capacity)
        for name, (dtype, fill) in self._spec.items():
            old = getattr(self, name)
            grown = np.full(new_cap, fill, dtype)
            grown[: old.shape[0]] = old
            setattr(self, name, grown)
        self.capacity = new_cap


class Outputs:
    """Per-sample output arrays of a detector, reused from batch to batch: fresh large
    arrays cost page faults that were a third of the EWMA's time. A result is valid
    until the detector's next update."""

    def __init__(self, **dtypes: type) -> None:
        self._dtypes = dtypes
        self._buffers = {name: np.empty(0, dtype) for name, dtype in dtypes.items()}

    def take(self, n: int) -> tuple[np.ndarray, ...]:
        for name, buf in self._buffers.items():
            if buf.shape[0] < n:
                self._buffers[name] = np.empty(max(n, 2 * buf.shape[0]), self._dtypes[name])
        return tuple(buf[:n] for buf in self._buffers.values())


class KeyIndex:
    """Dense slots for string keys, in first-seen order (a null is a key too). A batch costs what
    its own rows cost, however many keys are known: a large batch is one vectorised hash probe
    against the known keys; a small one (a node's scrape against a 100k-GPU site) looks up only
    its distinct keys, in a dict kept beside them (built the first time a small batch comes).
    Only keys never seen before run Python once each (through `on_new`)."""

    SMALL = 8  # a batch is small where the known keys are SMALL times its rows or more

    def __init__(self, on_new: Callable[[pa.Array, np.ndarray], None] | None = None) -> None:
        self._on_new = on_new
        self._last: tuple[pa.Array, np.ndarray] | None = None
        self._parts: list[pa.Array] = []  # the known keys in slot order, in pieces (`keys` joins them)
        self._n = 0
        self._slot: dict[str | None, int] = {}  # key -> slot for the first `_in_slot` keys
        self._in_slot = 0

    def __len__(self) -> int:
        return self._n

    @property
    def keys(self) -> pa.Array:
        """The known keys, each at its slot."""
        if len(self._parts) != 1:
            self._parts = [pa.concat_arrays(self._parts) if self._parts else pa.array([], pa.string())]
        return self._parts[0]

    def slots(self, keys: pa.Array) -> np.ndarray:
        if self._last is not None and self._last[0] is keys:
            return self._last[1]  # the same column object again (static columns of a source)
        col = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        if col.type != pa.string():
            col = col.cast(pa.string())
        out = self._small(col) if len(col) * self.SMALL <= self._n else self._large(col)
        self._last = (keys, out)
        return out

    def _large(self, keys: pa.Array) -> np.ndarray:
        idx = pc.index_in(keys, value_set=self.keys)
        if idx.null_count:
            new = pc.unique(pc.filter(keys, pc.is_null(idx)))
            self._add(new, pc.index_in(new, value_set=keys).to_numpy().astype(np.int64))
            idx = pc.index_in(keys, value_set=self.keys)
        return idx.to_numpy().astype(np.int64)

    def _small(self, keys: pa.Array) -> np.ndarray:
        if self._in_slot < self._n:  # keys registered by large batches since: into the dict
            rest = self.keys.slice(self._in_slot).to_pylist()
            self._slot.update(zip(rest, range(self._in_slot, self._n)))
            self._in_slot = self._n
        enc = pc.dictionary_encode(keys, null_encoding="encode")  # distinct keys in first-seen order
        codes = enc.indices.to_numpy().astype(np.int64)
        distinct = enc.dictionary.to_pylist()
        get = self._slot.get
        found = np.fromiter((get(k, -1) for k in distinct), np.int64, len(distinct))
        unseen = found < 0
        if unseen.any():
            fresh = np.flatnonzero(unseen)
            _, first_rows = np.unique(codes, return_index=True)  # each distinct key's first row
            found[fresh] = np.arange(self._n, self._n + fresh.size)
            self._add(enc.dictionary.take(pa.array(fresh)), first_rows[fresh].astype(np.int64))
        return found[codes]

    def _add(self, new: pa.Array, first_rows: np.ndarray) -> None:
        """Keys never seen (distinct, in first-seen order), the next slots; `on_new` told."""
        start = self._n
        self._parts.append(new)
        self._n += len(new)
        if self._in_slot == start and self._slot:  # the dict is kept: it takes them now
            self._slot.update(zip(new.to_pylist(), range(start, self._n)))
            self._in_slot = self._n
        if self._on_new is not None:
            self._on_new(new, first_rows)


class EwmaZ:
    def __init__(self, halflife_s: float, z_gate: float, warmup: int, relearn: int,
                 min_sd_rel: float = 0.001, min_sd_abs: float = 1e-9) -> None:
        self.params = (halflife_s, z_gate, warmup, relearn, min_sd_rel, min_sd_abs)
        self.warmup = warmup
        self.arrays = SlotArrays({"mean": (np.float64, 0.0), "var": (np.float64, 0.0), "count": (np.int64, 0),
                                  "last_ts": (np.float64, 0.0), "outliers": (np.int64, 0)})
        self._out = Outputs(z=np.float64, base=np.float64)

    def update(self, values: np.ndarray, slots: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(z, baseline mean) per sample."""
        self.arrays.ensure(int(slots.max()) + 1 if slots.size else 0)
        z, base = self._out.take(values.shape[0])
        s = self.arrays
        kernels.ewma_zscore(values, slots, ts, s.mean, s.var, s.count, s.last_ts, s.outliers, *self.params, z, base)
        return z, base


class RobustZ:
    def __init__(self, halflife_s: float, warmup: int, min_sd_rel: float = 0.001, min_sd_abs: float = 1e-9) -> None:
        self.params = (halflife_s, warmup, min_sd_rel, min_sd_abs)
        self.arrays = SlotArrays({"med": (np.float64, 0.0), "mad": (np.float64, 0.0), "count": (np.int64, 0),
                                  "last_ts": (np.float64, 0.0)})
        self._out = Outputs(z=np.float64)

    def update(self, values: np.ndarray, slots: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Robust z, (x - median) / (1.4826 MAD), per sample."""
        self.arrays.ensure(int(slots.max()) + 1 if slots.size else 0)
        (z,) = self._out.take(values.shape[0])
        s = self.arrays
        kernels.robust_zscore(values, slots, ts, s.med, s.mad, s.count, s.last_ts, *self.params, z)
        return z


class Cusum:
    def __init__(self, halflife_s: float, k: float, h: float, warmup: int, cap: float = 2.0,
                 prior_var: float = 1.0, slope_sd: float = 0.0) -> None:
        self.params = (halflife_s, k, h, warmup, cap, prior_var, slope_sd)
        self.arrays = SlotArrays({"mean": (np.float64, 0.0), "count": (np.int64, 0),
                                  "s_hi": (np.float64, 0.0), "s_lo": (np.float64, 0.0),
                                  "c_mean": (np.float64, np.nan), "c_var": (np.float64, 0.0),
                                  "cov": (np.float64, 0.0)})
        self._out = Outputs(score=np.float64, base=np.float64)

    def update(self, values: np.ndarray, slots: np.ndarray, covariate: np.ndarray | None = None,
               seconds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(signed score, the baseline each sample was judged against) per sample: S+/h upwards,
        -S-/h downwards, |score| >= 1 is an alarm. The baseline regresses on `covariate`
        (kernels.cusum; NaN or none: explains nothing); `seconds`, what each sample stands for
        (its interval; none: 1 s each)."""
        self.arrays.ensure(int(slots.max()) + 1 if slots.size else 0)
        n = values.shape[0]
        covariate = np.full(n, np.nan) if covariate is None else covariate
        seconds = np.ones(n) if seconds is None else seconds
        score, base = self._out.take(n)
        s = self.arrays
        kernels.cusum(values, covariate, seconds, slots, s.mean, s.count, s.s_hi, s.s_lo, s.c_mean, s.c_var, s.cov,
                      *self.params, score, base)
        return score, base


class CounterDelta:
    GLITCH_SAMPLES = 3  # a counter back where it dropped from within this many samples: the drop was a bad reading

    def __init__(self) -> None:
        self.arrays = SlotArrays({"last_value": (np.float64, np.nan), "last_ts": (np.float64, 0.0),
                                  "dropped_from": (np.float64, np.nan), "since_drop": (np.int64, 0)})

    def update(self, values: np.ndarray, slots: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(increase, rate per second) per sample; 0 across a counter reset, and none across a bad reading."""
        a = self.arrays
        a.ensure(int(slots.max()) + 1 if slots.size else 0)
        delta, rate = np.empty_like(values), np.empty_like(values)
        kernels.counter_delta(values, slots, ts, a.last_value, a.last_ts, a.dropped_from, a.since_drop,
                              self.GLITCH_SAMPLES, delta, rate)
        return delta, rate


class Flatline:
    def __init__(self) -> None:
        self.arrays = SlotArrays({"last_value": (np.float64, np.nan), "runs": (np.int64, 0)})

    def update(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Consecutive exact repeats per sample."""
        self.arrays.ensure(int(slots.max()) + 1 if slots.size else 0)
        runs = np.empty(values.shape[0], np.int64)
        kernels.flatline(values, slots, self.arrays.last_value, self.arrays.runs, runs)
        return runs


def group_median(values: np.ndarray, groups: np.ndarray, n_groups: int,
                 include: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(median per group, members counted) over the finite, included values."""
    out = np.empty(n_groups)
    inc = np.ones(values.shape[0], np.bool_) if include is None else include
    counts = kernels.group_median(values, groups, n_groups, inc, out)
    return out, counts
