"""Early detection on the labelled corpus of tests/corpus.py: the scorer against NAB's baseline.

Scores every series of the corpus (tests/corpus.py: 57 series of documented real-world
shapes in 13 families, 67 labelled anomaly windows) with, in one run:
  score_series        the univariate scorer of `fleetwatch replay` (pipeline/detect/series.py)
  previous            the scorer it replaced (issue 16; as of commit 91a1d30, below): EWMA and
                      robust z-scores and a CUSUM, scored on a fixed scale
  windowed_gaussian   NAB's windowedGaussian baseline (window 6400, step 100)
  raise_nothing       no detection at all (0 by construction of the normalized score)
and prints, per family and overall, the normalized NAB score (standard profile:
A_TP 1.0, A_FP -0.11, A_FN -1.0; 100 = every window caught at its first point and no
false positive, 0 = raising nothing, negative = worse than raising nothing), each at
its one corpus-wide threshold (chosen to maximize the score, as NAB does), the windows
caught / missed and false-positive rows there, and each detector's values/s (one
core, whole corpus, after a warm-up call so that JIT compilation is not counted). Then
the speed on one long series (LONG points, 1-minute samples with a daily season and
noise), where the period search runs every 8,192 samples instead of at the corpus'
short series' start, against the previous scorer.

    python bench/anomaly_corpus.py [--seed 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from pipeline.detect.series import score_series, typical_time  # noqa: E402
from pipeline.detect.state import Cusum, EwmaZ, RobustZ  # noqa: E402
from tests.corpus import corpus, evaluate, families, sweep, windowed_gaussian  # noqa: E402

LONG = 500_000


def raise_nothing(ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.zeros(len(ts))


def previous(ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The replay scorer before issue 16, on the same kernels: an EWMA z (half-life 20
    intervals, outliers beyond 6 sd gated, 15 in a row relearn), a streaming median/MAD z
    where spikes pulled the EWMA, a CUSUM of the clipped z, and max(z^2/(z^2+4.5^2),
    S^2/(S^2+15^2))."""
    ts, values = np.asarray(ts, np.float64), np.asarray(values, np.float64)
    order = np.argsort(ts, kind="stable")
    t, x = typical_time(ts[order]), values[order]
    slots = np.zeros(x.shape[0], np.int64)
    ze, _ = EwmaZ(20.0, 6.0, 20, 15, min_sd_rel=1e-3, min_sd_abs=1e-9).update(x, slots, t)
    zr = RobustZ(20.0, 20, min_sd_rel=1e-3, min_sd_abs=1e-9).update(x, slots, t)
    z = np.clip(np.nan_to_num(np.where(2.0 * np.abs(zr) < np.abs(ze), zr, ze), nan=0.0), -1e6, 1e6)
    cus, _ = Cusum(80.0, 1.5, 15.0, 20).update(np.where(np.isfinite(x), np.clip(z, -6.0, 6.0), np.nan), slots)
    s = np.nan_to_num(np.abs(cus), nan=0.0) * 15.0
    score = np.where(np.isfinite(x), np.maximum(z * z / (z * z + 4.5 ** 2), s * s / (s * s + 15.0 ** 2)), 0.0)
    out = np.empty_like(score)
    out[order] = np.clip(score, 0.0, 1.0)
    return out


DETECTORS = {"score_series": score_series, "previous": previous, "windowed_gaussian": windowed_gaussian,
             "raise_nothing": raise_nothing}


def long_series_speed() -> dict:
    """values/s of the scorer and the previous one on one long seasonal series."""
    i = np.arange(LONG)
    v = 10 * np.sin(2 * np.pi * i / 1440) + np.random.default_rng(0).normal(0, 1, LONG)
    ts = 60.0 * i
    out = {}
    for name, fn in (("score_series", score_series), ("previous", previous)):
        fn(ts[:100], v[:100])
        t0 = time.perf_counter()
        fn(ts, v)
        out[name] = LONG / (time.perf_counter() - t0)
    out["ratio"] = out["score_series"] / out["previous"]
    return out


def run(seed: int = 16) -> dict:
    t0 = time.perf_counter()
    series = corpus(seed)
    gen_s = time.perf_counter() - t0
    sweeps = [sweep(s) for s in series]
    points = sum(len(s.ts) for s in series)
    out = {"seed": seed, "series": len(series), "windows": sum(len(s.windows) for s in series),
           "points": points, "generate_s": round(gen_s, 3), "detectors": {}}
    for name, fn in DETECTORS.items():
        fn(series[0].ts[:50], series[0].values[:50])  # JIT warm-up
        t0 = time.perf_counter()
        scores = [fn(s.ts, s.values) for s in series]
        el = time.perf_counter() - t0
        r = evaluate(series, scores, sweeps=sweeps)
        out["detectors"][name] = {
            "normalized": r.normalized, "raw": r.raw, "threshold": r.threshold,
            "tp": r.tp, "fn": r.fn, "fp": r.fp, "seconds": el, "values_per_s": points / el if el > 0 else None,
            "families": {f: {k: v for k, v in d.items()} for f, d in r.families.items()},
        }
    out["families"] = families(series)
    out["long_series"] = long_series_speed()
    return out


def table(res: dict) -> str:
    names = list(res["detectors"])
    fams = res["families"]
    d0 = res["detectors"][names[0]]["families"]
    lines = [f"corpus: {res['series']} series, {res['windows']} windows, {res['points']:,} points "
             f"(generated in {res['generate_s']:.2f} s, seed {res['seed']})",
             "normalized NAB score (standard profile), one threshold per detector over the corpus",
             "",
             f"{'family':<13} {'series':>6} {'windows':>7} " + " ".join(f"{n:>18}" for n in names)]
    for f in fams:
        row = f"{f:<13} {d0[f]['series']:>6} {d0[f]['windows']:>7} "
        row += " ".join(f"{res['detectors'][n]['families'][f]['normalized']:>18.1f}" for n in names)
        lines.append(row)
    lines.append(f"{'overall':<13} {res['series']:>6} {res['windows']:>7} "
                 + " ".join(f"{res['detectors'][n]['normalized']:>18.1f}" for n in names))
    lines.append("")

    def row(label, fmt):
        return f"{label:<28} " + " ".join(f"{fmt(res['detectors'][n]):>18}" for n in names)

    lines.append(row("threshold", lambda d: f"{d['threshold']:.6g}"))
    lines.append(row("windows caught / missed", lambda d: f"{d['tp']} / {d['fn']}"))
    lines.append(row("false-positive rows", lambda d: f"{d['fp']}"))
    lines.append(row("values/s (one core)", lambda d: f"{d['values_per_s']:.3g}" if d["values_per_s"] else "-"))
    ls = res["long_series"]
    lines.append("")
    lines.append(f"one series of {LONG:,} points: score_series {ls['score_series']:.3g} values/s, "
                 f"previous {ls['previous']:.3g} values/s (ratio {ls['ratio']:.2f})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    res = run(args.seed)
    if args.json:
        print(json.dumps(res, indent=2, default=float))
    else:
        print(table(res))


if __name__ == "__main__":
    main()
