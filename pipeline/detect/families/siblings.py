"""GPU temperature against its node's siblings at the same power, and the runaway it
shows: a large excess, or a smaller one still rising against its own recent average.

The excess over siblings (`SiblingView`) is what the node and rack peers, the
over-temperature and the drift detector read after it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.family import Family, State, evidence, lag
from pipeline.detect.state import group_median

THERMAL_TAU_S = 6.5  # slow thermal time constant of an H100 (the recorded trace, sources/recordings/h100)
RISE_TAU_S = 20.0    # memory of the average a rising temperature excess is compared with


@dataclass
class SiblingView:
    """Per row unless said: the GPU against its node's siblings."""
    excess: np.ndarray          # temperature over the siblings' median at equal power, C (NaN under 3 siblings)
    peer_c: np.ndarray          # the siblings' median (power-adjusted), C
    power_eff: np.ndarray       # the power the GPU's temperature follows now (its fast and slow lags), W
    node_temp: np.ndarray       # per node of the batch: median power-adjusted GPU temperature
    node_power: np.ndarray      # per node of the batch: median effective power
    node_gpus: np.ndarray       # per node of the batch: GPUs in that median
    node_swing: np.ndarray      # per node of the batch: median |power - its slow average|
    cooling_alerted: np.ndarray  # a rack cooling alert explains the GPU's heat (as the batch started)


class SiblingTemperature(Family):
    topic = Topic.GPU
    name = "thermal"
    raises = ("GpuThermalRunaway",)
    gpu = State("gpu", fields={"p_slow": (np.float64, np.nan),        # power through the slow thermal lag
                               "excess_slow": (np.float64, np.nan)})  # excess through RISE_TAU_S

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        d, state, slots, group, n_groups = self.config, self.gpu, b.slots, b.group, b.n_groups
        state.ensure(self.inventory.gpu_count)
        temp, power = b.metrics["gpu_temp_c"], b.metrics["power_w"]
        # Each GPU's temperature at its peers' power: what the GPU's own power explains is
        # taken out before comparing it with the median of its node. Temperature follows
        # power through two lags (H100 trace: ~60% at once, the rest with tau 6.5 s), so it
        # reflects 0.6 P + 0.4 P_slow. A power reading that repeats exactly is not trusted
        # (a stuck sensor): that GPU is taken to draw like its peers (below), in P_slow as well,
        # so that the real reading coming back later is not a jump in the excess. Except at
        # the GPU's limit with reason 0x4: a cap holds it there, steady to the watt, and that
        # is what it draws, whatever the sensor (a deep cap's repeats are no stuck sensor).
        pinned = b.held_at_limit()
        stuck = (b.power_runs >= 3) & ~pinned
        # Its peers' share of their own limits, times its own: under caps that differ within the
        # node (demand response's plan), a GPU held at 500 W among peers at 200 W is not taken to
        # draw 200 W and look 12 C too hot. Without a limit, the peers' median power.
        limit = b.metrics["power_limit_w"]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = power / limit
        med_power, _ = group_median(np.where(stuck, np.nan, power), group, n_groups)
        med_share, _ = group_median(np.where(stuck | ~(limit > 0), np.nan, share), group, n_groups)
        with np.errstate(invalid="ignore"):
            guess = np.where((limit > 0) & ~np.isnan(med_share[group]), med_share[group] * limit, med_power[group])
        power = np.where(stuck, guess, power)
        a = 1.0 - np.exp(-np.nan_to_num(b.gap, nan=1.0) / THERMAL_TAU_S)
        p_slow = lag(state.p_slow[slots], power, a)
        state.p_slow[slots] = p_slow
        p_eff = 0.6 * power + 0.4 * p_slow
        med_p_eff, _ = group_median(p_eff, group, n_groups)
        p_eff = np.where(np.isnan(p_eff), med_p_eff[group], p_eff)
        adj_temp = temp - d.thermal_c_per_w * (p_eff - med_p_eff[group])
        med_temp, n_temp = group_median(adj_temp, group, n_groups)
        peer_c = med_temp[group]
        excess = np.where(n_temp[group] >= 3, adj_temp - peer_c, np.nan)
        # Rack cooling alerts pending or firing explain their GPUs' thermal symptoms (the
        # catalog's `suppresses`; the same rack alerts explain over-temperature, drift and
        # HW slowdown, a test checks, so this one view serves all three). Not
        # RackHeatImbalance: a drifting sensor raises it too, and it must not hide a GPU
        # that really overheats.
        cooling = self.engine.racks_explaining("GpuOverTemperature")[b.rack]

        # One alert per problem: a coolant problem of the rack explains its GPUs'
        # temperatures; a runaway explains the GPU's high temperature and its drift; a
        # drift already alerted on the GPU is the same problem growing.
        drift_state = self.engine.trackers["GpuThermalDrift"].arrays
        drift_state.ensure(self.inventory.gpu_count)
        # Rate of change: a runaway is an excess that keeps rising. Against its own average
        # of the last ~RISE_TAU_S, a GPU ramping at 0.15 C/s is ~2.7 C up, a hot but steady
        # one is not; that catches it at the early excess instead of the full one.
        prev = state.excess_slow[slots]
        a_rise = 1.0 - np.exp(-np.nan_to_num(b.gap, nan=1.0) / RISE_TAU_S)
        state.excess_slow[slots] = lag(prev, excess, a_rise)
        rise = excess - prev
        # Only at steady power, on the GPU and across its node: right after a load starts or
        # stops the temperatures lag their power (the H100 replay shows 8 C swings), and
        # that is not a runaway. A runaway heats up at constant power.
        swing = np.abs(power - p_slow)
        node_swing, _ = group_median(swing, group, n_groups)
        steady = (swing < d.runaway_steady_w) & (node_swing[group] < d.runaway_steady_w)
        runaway = (excess > d.peer_temp_excess_c) | (steady & (excess > d.runaway_early_c)
                                                     & (rise > d.runaway_rise_c))
        self.judge(out, "GpuThermalRunaway", slots, runaway & ~drift_state.firing[slots],
                   b.now, excess, evidence(temp_c=temp, excess_c=excess, rise_c=rise, peer_median_c=peer_c,
                                         power_w=b.metrics["power_w"], peer_power_w=med_p_eff[group],
                                         threshold_c=d.peer_temp_excess_c, early_threshold_c=d.runaway_early_c,
                                         rise_threshold_c=d.runaway_rise_c))
        b.siblings = SiblingView(excess=excess, peer_c=peer_c, power_eff=p_eff, node_temp=med_temp,
                                 node_power=med_p_eff, node_gpus=n_temp, node_swing=node_swing,
                                 cooling_alerted=cooling)
