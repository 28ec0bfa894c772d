"""Scale-out gives the answers of one process: the eval's scenario detected in-process and
by K `fleetwatch detect` processes over a real Kafka broker (optionally one of them killed
with SIGKILL or frozen half-way), compared alert by alert.

    python bench/eval_scale_out.py --duration 7200 --fault-interval 120 --processes 3 --chaos kill
    python bench/eval_scale_out.py --kafka HOST:PORT ...   # an existing broker instead of a local one

Prints each run's alerts (alertname and target), the largest difference of start times,
and each fault type's recall; exits 1 if the alert sets differ or a start time differs by
more than the commit interval.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.analytics.eval_kafka import simulate_kafka  # noqa: E402
from pipeline.analytics.evaluate import score, simulate  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def target(alert: dict) -> tuple:
    labels = alert["labels"]
    return labels["alertname"], labels.get("site"), labels.get("rack"), labels.get("node"), labels.get("gpu")


def starts(alerts: list[dict]) -> dict[tuple, list]:
    """Each target's alert start times, in order (an alert may fire, resolve and fire again)."""
    out: dict[tuple, list] = {}
    for x in alerts:
        out.setdefault(target(x), []).append(x["starts_at"])
    return {k: sorted(v) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=7200)
    ap.add_argument("--fault-interval", type=float, default=120)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--chaos", choices=("kill", "freeze"))
    ap.add_argument("--kafka", metavar="HOST:PORT", help="a running broker (default: start a local one)")
    ap.add_argument("--normal", choices=("realistic", "simple"), default="realistic",
                    help="the fleet's normal (realistic: node clocks skewed up to 3 s, which an alert's start "
                         "time follows by how batches are cut)")
    args = ap.parse_args()
    broker = None
    if not args.kafka:
        from tests.services import KafkaBroker
        broker = KafkaBroker().start()
    bootstrap = args.kafka or broker.bootstrap
    try:
        cfg = load_config(None, overrides={"fleet": {"speed": 0.0, "fault_interval_s": args.fault_interval,
                                                     "seed": args.seed, "normal": args.normal},
                                           "kafka": {"bootstrap": bootstrap}})
        t0 = time.perf_counter()
        one = simulate(cfg, args.duration)
        t1 = time.perf_counter()
        many, info = simulate_kafka(cfg, args.duration, args.processes, chaos=args.chaos)
        t2 = time.perf_counter()
    finally:
        if broker is not None:
            broker.close()
    a, b = starts(one.alerts), starts(many.alerts)
    both = set(a) & set(b)
    gaps = {k: max(abs((x - y).total_seconds()) for x, y in zip(a[k], b[k])) for k in both}
    worst = max(gaps.values(), default=0.0)
    off = {k: (a[k], b[k]) for k in both if len(a[k]) != len(b[k]) or gaps[k] > cfg.kafka.commit_interval_s}
    sa, sb = score(one), score(many)
    print(f"seed {args.seed}, {args.duration:.0f} s, a fault every {args.fault_interval:.0f} s on average; "
          f"{args.processes} detect processes over Kafka" + (f", one struck ({args.chaos}) half-way: "
                                                             f"{info['fenced']} partitions fenced, "
                                                             f"{info['restored']} restored" if args.chaos else ""))
    print(f"alerts in-process {len(one.alerts)} ({t1 - t0:.0f} s), over Kafka {len(many.alerts)} ({t2 - t1:.0f} s); "
          f"same (alertname, target): {len(both)} of {len(a)}; only in-process: {sorted(set(a) - set(b))}; "
          f"only over Kafka: {sorted(set(b) - set(a))}")
    names = sorted({k[0] for k in both})
    print(f"alertnames: {', '.join(names)}")
    print(f"largest start-time difference: {worst:.1f} s (commit interval {cfg.kafka.commit_interval_s:g} s)")
    for k, (x, y) in off.items():
        print(f"  differs: {k}: in-process {[t.isoformat() for t in x]}, over Kafka {[t.isoformat() for t in y]}")
    print(f"{'fault type':<24}{'injected':>9}{'recall 1':>10}{'recall K':>10}")
    for name, f in sa["faults"].items():
        print(f"{name:<24}{f['injected']:>9}{str(f['recall']):>10}{str(sb['faults'][name]['recall']):>10}")
    same_scores = {k: v for k, v in sa.items()} == {k: v for k, v in sb.items()}
    print(f"the scores JSON is {'identical' if same_scores else 'DIFFERENT'}; false alerts {sa['false_alerts']} "
          f"vs {sb['false_alerts']}")
    return 0 if set(a) == set(b) and not off else 1


if __name__ == "__main__":
    sys.exit(main())
