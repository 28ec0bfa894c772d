"""The statistical detectors' speed per core, against numpy and river, at 100,000 series.

Each tick is one batch with one value per series (a fleet scrape), TICKS ticks, with
noise, spikes, NaNs and an irregular clock. Measured in one run, single-threaded:
  numba   the kernels the engine runs (pipeline/detect/kernels.py, through state.py)
  numpy   the same algorithms written as vectorised numpy over the batch (each series
          appears once per batch, so a whole batch is one set of array expressions)
  river   the equivalent online detectors of the `river` library, one object per
          series: stats.EWMean + stats.EWVar for the EWMA z-score, drift.PageHinkley
          for the CUSUM (timed on RIVER_SERIES series; per-value cost does not depend
          on the number of series)
and prints values/s and the ratios; then each detector alone against its numpy version,
the robust median/MAD z-score included. The numpy versions are checked to give the
same scores as the kernels. Also: the kernels' JIT compile time (a cold on-disk cache
against a warm one, each in a fresh process), and state bytes per series.

    python bench/detect_kernels.py [--series 100000] [--ticks 50] [--river-series 2000]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from pipeline.detect import kernels  # noqa: E402
from pipeline.detect.state import Cusum, EwmaZ, RobustZ  # noqa: E402

HALFLIFE, Z_GATE, WARMUP, RELEARN, MIN_SD_REL, MIN_SD_ABS = 600.0, 6.0, 20, 3600, 0.001, 1e-9
CUSUM_K, CUSUM_H, CUSUM_CAP = 1.0, 50.0, 2.0


def workload(series: int, ticks: int, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    level = rng.uniform(20, 80, series)
    out, t = [], np.zeros(series)
    for _ in range(ticks):
        t = t + rng.uniform(0.8, 1.2, series)  # irregular sampling
        x = level + rng.normal(0, 1, series)
        x[rng.random(series) < 0.001] += 50.0   # spikes
        x[rng.random(series) < 0.001] = np.nan  # missing readings
        out.append((x, np.arange(series, dtype=np.int64), t.copy()))
    return out


# ---- numpy: the same algorithms, vectorised over a batch with unique slots ------------

def np_alpha(dt: np.ndarray, count: np.ndarray) -> np.ndarray:
    a = np.minimum(1.0 - np.exp(-math.log(2.0) * np.maximum(dt, 0.0) / HALFLIFE), kernels.MAX_ALPHA)
    return np.maximum(a, 1.0 / (count + 1.0))


class NumpyEwmaZ:
    def __init__(self, n: int) -> None:
        self.mean, self.var, self.last_ts = np.zeros(n), np.zeros(n), np.zeros(n)
        self.count, self.outliers = np.zeros(n, np.int64), np.zeros(n, np.int64)

    def update(self, x: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        ok = np.isfinite(x)
        mean, var, count = self.mean[s], self.var[s], self.count[s]
        first = ok & (count == 0)
        sd = np.sqrt(var + (MIN_SD_REL * np.abs(mean)) ** 2 + MIN_SD_ABS ** 2)
        z = np.where(count >= WARMUP, (x - mean) / sd, 0.0)
        z = np.where(ok, np.where(first, 0.0, z), np.nan)
        old = ok & ~first
        out_gate = old & (np.abs(z) > Z_GATE)
        learn = old & ~out_gate
        outl = np.where(out_gate, self.outliers[s] + 1, np.where(learn, 0, self.outliers[s]))
        a = np_alpha(t - self.last_ts[s], count)
        d = x - mean
        new_mean = np.where(learn, mean + a * d, np.where(first, x, mean))
        new_var = np.where(learn, (1.0 - a) * (var + a * d * d), np.where(first, 0.0, var))
        new_count = np.where(learn, count + 1, np.where(first, 1, np.where(out_gate & (outl >= RELEARN), 0, count)))
        self.mean[s], self.var[s], self.count[s] = new_mean, new_var, new_count
        self.outliers[s] = np.where(first, 0, outl)
        self.last_ts[s] = np.where(ok, t, self.last_ts[s])
        return z


class NumpyCusum:
    def __init__(self, n: int) -> None:
        self.mean, self.hi, self.lo = np.zeros(n), np.zeros(n), np.zeros(n)
        self.count = np.zeros(n, np.int64)

    def update(self, x: np.ndarray, s: np.ndarray) -> np.ndarray:
        ok = np.isfinite(x)
        mean, count, hi, lo = self.mean[s], self.count[s], self.hi[s], self.lo[s]
        first = ok & (count == 0)
        old = ok & ~first
        d = x - mean
        armed = old & (count >= WARMUP)
        hi = np.where(armed, np.minimum(np.maximum(0.0, hi + d - CUSUM_K), CUSUM_CAP * CUSUM_H), np.where(first, 0, hi))
        lo = np.where(armed, np.minimum(np.maximum(0.0, lo - d - CUSUM_K), CUSUM_CAP * CUSUM_H), np.where(first, 0, lo))
        learn = old & (hi == 0.0) & (lo == 0.0)
        a = np.maximum(1.0 - math.exp(-math.log(2.0) / HALFLIFE), 1.0 / (count + 1.0))
        self.mean[s] = np.where(learn, mean + a * d, np.where(first, x, mean))
        self.count[s] = np.where(learn, count + 1, np.where(first, 1, count))
        self.hi[s], self.lo[s] = hi, lo
        return np.where(ok, np.where(hi >= lo, hi / CUSUM_H, -lo / CUSUM_H), np.nan)


class NumpyRobustZ:
    def __init__(self, n: int) -> None:
        self.med, self.mad, self.last_ts = np.zeros(n), np.zeros(n), np.zeros(n)
        self.count = np.zeros(n, np.int64)

    def update(self, x: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        ok = np.isfinite(x)
        med, mad, count = self.med[s], self.mad[s], self.count[s]
        first = ok & (count == 0)
        old = ok & ~first
        d = x - med
        floor2 = (MIN_SD_REL * med) ** 2 + MIN_SD_ABS ** 2
        sd = kernels.MAD_TO_SD * mad
        z = np.where(ok, np.where(old & (count >= WARMUP), d / np.sqrt(sd * sd + floor2), 0.0), np.nan)
        r = np.where(sd * sd >= floor2, mad, np.abs(d))
        a = np_alpha(t - self.last_ts[s], count)
        self.med[s] = np.where(old, med + a * kernels.MAD_TO_SD * r * np.sign(d), np.where(first, x, med))
        self.mad[s] = np.where(old, r + a * r * np.sign(np.abs(d) - r), np.where(first, 0.0, mad))
        self.count[s] = np.where(ok, count + 1, count)
        self.last_ts[s] = np.where(ok, t, self.last_ts[s])
        return z


# ---- river: one online detector object per series ---------------------------------------

def river_run(batches, series: int) -> float:
    from river import drift, stats
    fading = 1.0 - (1.0 - math.exp(-math.log(2.0) / HALFLIFE))
    means = [stats.EWMean(fading_factor=1 - fading) for _ in range(series)]
    variances = [stats.EWVar(fading_factor=1 - fading) for _ in range(series)]
    cusums = [drift.PageHinkley(delta=CUSUM_K, threshold=CUSUM_H) for _ in range(series)]
    t0 = time.perf_counter()
    n = 0
    for x, _, _ in batches:
        for i, v in enumerate(x[:series].tolist()):
            if v != v:  # NaN: skipped, as the kernels do
                continue
            m, var = means[i].get(), variances[i].get()
            _ = (v - m) / math.sqrt(var + 1e-18) if var else 0.0
            means[i].update(v)
            variances[i].update(v)
            cusums[i].update(v)
            n += 1
    return n / (time.perf_counter() - t0)


def timed(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def compile_times() -> tuple[float, float]:
    """warm_up() in a fresh process: with an empty on-disk cache (compiles), then with it filled."""
    code = ("import time; t = time.perf_counter(); from pipeline.detect import kernels; kernels.warm_up(); "
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"NUMBA_CACHE_DIR": cache}
        root = os.path.join(os.path.dirname(__file__), "..")
        cold, warm = (float(subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True,
                                           capture_output=True, text=True).stdout) for _ in range(2))
    return cold, warm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=100_000)
    ap.add_argument("--ticks", type=int, default=50)
    ap.add_argument("--river-series", type=int, default=2_000)
    args = ap.parse_args()
    batches = workload(args.series, args.ticks)
    values = sum(int(np.isfinite(x).sum()) for x, _, _ in batches)
    kernels.warm_up()

    def detectors():
        return (EwmaZ(HALFLIFE, Z_GATE, WARMUP, RELEARN, MIN_SD_REL, MIN_SD_ABS),
                Cusum(HALFLIFE, CUSUM_K, CUSUM_H, WARMUP, CUSUM_CAP), RobustZ(HALFLIFE, WARMUP, MIN_SD_REL, MIN_SD_ABS),
                NumpyEwmaZ(args.series), NumpyCusum(args.series), NumpyRobustZ(args.series))

    # Same scores first (not timed): each numpy version is the same algorithm.
    ewma, cus, rob, nz, nc, nr = detectors()
    for x, s, t in batches:
        z, _ = ewma.update(x, s, t)
        assert np.allclose(z, nz.update(x, s, t), equal_nan=True, rtol=1e-9, atol=1e-9), "numpy EWMA differs"
        assert np.allclose(cus.update(x, s)[0], nc.update(x, s), equal_nan=True, rtol=1e-9, atol=1e-9), \
            "numpy CUSUM differs"
        assert np.allclose(rob.update(x, s, t), nr.update(x, s, t), equal_nan=True, rtol=1e-9, atol=1e-9), \
            "numpy robust z differs"

    ewma, cus, rob, nz, nc, nr = detectors()

    def numba_run() -> None:
        for x, s, t in batches:
            ewma.update(x, s, t)
            cus.update(x, s)

    def numpy_run() -> None:
        for x, s, t in batches:
            nz.update(x, s, t)
            nc.update(x, s)
    numba_s, numpy_s = timed(numba_run), timed(numpy_run)
    ewma, cus, rob, nz, nc, nr = detectors()
    per_kernel = {  # values/s of each detector alone
        "EWMA z-score": (values / timed(lambda: [ewma.update(x, s, t) for x, s, t in batches]),
                         values / timed(lambda: [nz.update(x, s, t) for x, s, t in batches])),
        "CUSUM": (values / timed(lambda: [cus.update(x, s) for x, s, _ in batches]),
                  values / timed(lambda: [nc.update(x, s) for x, s, _ in batches])),
        "robust median/MAD z-score": (values / timed(lambda: [rob.update(x, s, t) for x, s, t in batches]),
                                      values / timed(lambda: [nr.update(x, s, t) for x, s, t in batches]))}
    river_rate = river_run(batches, args.river_series)
    cold, warm = compile_times()
    numba_rate, numpy_rate = values / numba_s, values / numpy_s
    def state_bytes(*dets) -> int:
        return sum(getattr(d.arrays, f).itemsize for d in dets for f in d.arrays.fields)
    state, robust_state = state_bytes(ewma, cus), state_bytes(rob)
    print(f"{args.series:,} series x {args.ticks} ticks = {values:,} finite values; one thread; "
          f"EWMA z-score + CUSUM per value")
    print(f"{'':44s} {'values/s':>14s} {'x numba':>9s}")
    for name, rate in (("numba kernels (Fleetwatch)", numba_rate), ("numpy, vectorised (same algorithms)", numpy_rate),
                       (f"river EWMean+EWVar+PageHinkley ({args.river_series:,} series)", river_rate)):
        print(f"{name:44s} {rate:14,.0f} {rate / numba_rate:9.4f}")
    print(f"numba vs numpy: {numba_rate / numpy_rate:.1f}x; numba vs river: {numba_rate / river_rate:,.0f}x")
    for name, (fast, slow) in per_kernel.items():
        print(f"{name} alone: numba {fast:,.0f} values/s, numpy {slow:,.0f} values/s ({fast / slow:.1f}x)")
    print(f"JIT: warm_up() in a fresh process takes {cold:.2f} s with an empty cache (compile), {warm:.2f} s with "
          f"the on-disk cache; the daemon calls it at start-up, before the first sample")
    print(f"state: {state} bytes per series for EWMA z-score + CUSUM ({args.series:,} series: "
          f"{state * args.series / 2**20:.1f} MiB); {robust_state} bytes for the robust z-score "
          f"({robust_state * args.series / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
