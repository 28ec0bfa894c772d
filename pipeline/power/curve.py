"""A GPU's power -> throughput curve: what a power cap costs in work.

The first curve is the recorded H100's (`sources/recordings/h100/h100_powercap_*`): a
continuous bf16 matmul load while the limit steps 700 -> 500 -> 350 -> 200 -> 700 W.
Each step's steady state (from 1 s after the limit was set to the next set) gives the
power the GPU held, its SM clock and the TFLOP/s the load achieved:

    limit   power   SM clock   TFLOP/s   relative
    700 W   698 W   1386 MHz     687      1.00
    500 W   499 W   1156 MHz     576      0.84
    350 W   350 W    699 MHz     345      0.50
    200 W   200 W    358 MHz     178      0.26

`throughput(p)` interpolates between those points (linearly; 0 at 0 W), relative to the
GPU's uncapped work at full load. The planner (power/planner.py) reads costs off the
curve's upper concave hull (`hull`): along it a watt saved never costs less than the
one before it, so taking the cheapest watts first across the fleet is optimal; along
the measured points 350 W sits under the hull (it costs more per watt than 500 or 200
W), and a plan uses it only where a GPU's class forbids going lower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.resources import RECORDINGS

SETTLE_S = 1.0  # after a new limit, the 1 s power average has settled (the recording: 0.2-0.4 s, 1 s at most)


@dataclass(frozen=True)
class PowerCurve:
    """Relative throughput at each power (W), increasing; 0 W is 0."""
    power_w: np.ndarray
    throughput: np.ndarray
    min_limit_w: float      # the lowest limit the GPU takes (NVML constraints)
    max_limit_w: float      # the highest, its default at full load
    sm_clock_mhz: np.ndarray  # the SM clock at each point (the simulator reports it)

    def at(self, power_w) -> np.ndarray:
        """Relative throughput of a fully loaded GPU held to `power_w`."""
        return np.interp(np.asarray(power_w, np.float64), self.power_w, self.throughput)

    def clock_at(self, power_w) -> np.ndarray:
        return np.interp(np.asarray(power_w, np.float64), self.power_w, self.sm_clock_mhz)

    def power_for(self, throughput) -> np.ndarray:
        """The power at which a fully loaded GPU does `throughput` (relative): the inverse."""
        return np.interp(np.asarray(throughput, np.float64), self.throughput, self.power_w)

    def hull(self) -> "PowerCurve":
        """The upper concave hull of the points from the minimum limit up: the curve the
        planner optimises on (marginal throughput per watt never rises with power)."""
        keep = self.power_w >= 0.95 * self.min_limit_w  # (the GPU holds a limit to within a watt or two)
        xs, ys, cs = self.power_w[keep], self.throughput[keep], self.sm_clock_mhz[keep]
        chosen: list[int] = []
        for i in range(len(xs)):
            while len(chosen) >= 2:
                a, b = chosen[-2], chosen[-1]
                # b lies on or under the chord a -> i: not a hull vertex
                if (ys[b] - ys[a]) * (xs[i] - xs[a]) <= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                    chosen.pop()
                else:
                    break
            chosen.append(i)
        idx = np.array(chosen)
        return PowerCurve(np.concatenate([[0.0], xs[idx]]), np.concatenate([[0.0], ys[idx]]),
                          self.min_limit_w, self.max_limit_w, np.concatenate([[0.0], cs[idx]]))


def from_recording(folder: Path | str = RECORDINGS / "h100", name: str | None = None) -> PowerCurve:
    """The curve measured in a power-cap recording: NAME_powercap_{summary.json,trace.jsonl,
    load.jsonl} in `folder` (the format: the shipped recording's README; `scripts/gpu-check`
    records one on a real GPU). Without `name`, the folder's one such recording."""
    folder = Path(folder)
    found = [folder / f"{name}_powercap_summary.json"] if name else sorted(folder.glob("*_powercap_summary.json"))
    if len(found) != 1 or not found[0].is_file():
        raise ValueError(f"{folder}: expected one {name or '*'}_powercap_summary.json, found "
                         f"{', '.join(x.name for x in found if x.is_file()) or 'none'}")
    model = found[0].name.removesuffix("_powercap_summary.json")
    summary = json.loads(found[0].read_text())
    trace = [json.loads(line) for line in (folder / f"{model}_powercap_trace.jsonl").read_text().splitlines() if line]
    load = [json.loads(line) for line in (folder / f"{model}_powercap_load.jsonl").read_text().splitlines() if line]
    t0 = trace[0]["t_wall"] - trace[0]["t"]
    sets = [(0.0, summary["default_mw"])] + [(s["t"], s["target_mw"]) for s in summary["set_log"]]
    ends = [t for t, _ in sets[1:]] + [trace[-1]["t"] + 1e-9]
    points: dict[float, tuple[list, list, list]] = {}
    for (start, limit_mw), end in zip(sets, ends):
        rows = [r for r in trace if start + SETTLE_S <= r["t"] < end and r["enforced_mw"] == limit_mw]
        tflops = [x["tflops"] for x in load if start + SETTLE_S <= x["t"] - t0 < end]
        if not rows or not tflops or min(r["power_mw"] for r in rows) < 0.9 * limit_mw:
            continue  # no load held the GPU at this limit (the idle start): not a point of the curve
        p, c, w = points.setdefault(limit_mw / 1000.0, ([], [], []))
        p += [r["power_mw"] / 1000.0 for r in rows]
        c += [r["sm_mhz"] for r in rows]
        w += tflops
    limits = sorted(points)
    if not limits:
        raise ValueError(f"{folder}: no step of {model}_powercap_trace.jsonl held the GPU at its limit under a load "
                         f"with its TFLOP/s in {model}_powercap_load.jsonl: there is no curve to read")
    power = np.array([np.mean(points[x][0]) for x in limits])
    tflops = np.array([np.mean(points[x][2]) for x in limits])
    clock = np.array([np.mean(points[x][1]) for x in limits])
    lo, hi = (v / 1000.0 for v in summary["constraints_mw"])
    return PowerCurve(np.concatenate([[0.0], power]), np.concatenate([[0.0], tflops / tflops[-1]]), lo, hi,
                      np.concatenate([[0.0], clock]))
