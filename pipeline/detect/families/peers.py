"""Peers one and two levels up: a node's GPUs against the rack's other nodes at the same
power (NodeThermalAnomaly), and a rack's GPUs over their coolant against the site's
other racks (RackThermalAnomaly)."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.families.heat_balance import HeatBalance
from pipeline.detect.families.staleness import Staleness
from pipeline.detect.family import Family, State, evidence
from pipeline.detect.state import group_median


class Peers(Family):
    topic = Topic.GPU
    name = "peers"
    raises = ("NodeThermalAnomaly", "RackThermalAnomaly")
    node = State("node", fields={"ref_temp": (np.float64, np.nan)})  # median GPU temperature at zero power

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        """A node whose GPUs all run hotter than the rack's other nodes at the same power
        (a restricted coolant branch, a failing node manifold), which the GPU-against-
        siblings detector cannot see. Each node's median GPU temperature is taken to zero
        power (the linear rise per watt) so that busy and idle nodes compare; it is judged
        only at steady power (temperatures lag a load change)."""
        d, inv, view, ref = self.config, self.inventory, b.siblings, self.node
        n_nodes = inv.node_count
        ref.ensure(n_nodes)
        reporting = self.engine.family(Staleness).node
        nodes = b.nodes
        steady = (view.node_swing < d.runaway_steady_w) & (view.node_gpus >= 3)
        ref.ref_temp[nodes] = np.where(steady, view.node_temp - d.thermal_c_per_w * view.node_power, np.nan)
        fresh = np.isfinite(ref.ref_temp[:n_nodes]) & (b.now - reporting.last_seen[:n_nodes]
                                                       <= 5 * reporting.interval[:n_nodes])
        node_rack = inv.node.rack
        rack_med, rack_n = group_median(ref.ref_temp[:n_nodes], node_rack[:n_nodes], inv.rack_count, fresh)
        rack = node_rack[nodes]
        excess = ref.ref_temp[nodes] - rack_med[rack]
        judged = np.flatnonzero(steady & (rack_n[rack] >= 3))  # others neither raise nor clear it
        self._rack_against_site(b, out, np.unique(rack), rack_med, rack_n)
        self.judge(out, "NodeThermalAnomaly", nodes[judged], excess[judged] > d.node_temp_excess_c, b.now,
                   excess[judged], evidence(excess_c=excess[judged], node_temp_c=view.node_temp[judged],
                                            rack_median_c=rack_med[rack[judged]] + d.thermal_c_per_w
                                            * view.node_power[judged], node_power_w=view.node_power[judged],
                                            threshold_c=d.node_temp_excess_c))
        b.node_hot = self.alerted("NodeThermalAnomaly", n_nodes)[nodes][b.group]

    def _rack_against_site(self, b: GpuBatch, out: Output, racks: np.ndarray, rack_ref: np.ndarray,
                           rack_n: np.ndarray) -> None:
        """Physics and peers one level further up: each rack's GPUs at zero power (the
        median of its nodes' references) against the rack's own mean coolant temperature
        (CDU supply and return), and that approach against the site's other racks. It
        finds what warms every GPU of a rack alike while the coolant reads normal: air
        in the loop, fouled cold plates. It needs the rack's coolant readings in this
        process (over Kafka, the rack's facility partition and its nodes'), and three racks."""
        inv, loop = self.inventory, self.engine.family(HeatBalance).loop
        n_racks = inv.rack_count
        loop.ensure(n_racks)
        approach = rack_ref - 0.5 * (loop.supply_c[:n_racks] + loop.return_c[:n_racks])
        sites = np.asarray(inv.rack_site, np.int64)
        known = np.isfinite(approach) & (rack_n >= 3)
        site_med, site_n = group_median(approach, sites, len(inv.site_index), known)
        excess = approach[racks] - site_med[sites[racks]]
        judged = np.flatnonzero(known[racks] & (site_n[sites[racks]] >= 3))
        racks, excess = racks[judged], excess[judged]
        cooling = self.engine.racks_explaining("RackThermalAnomaly")[racks]
        threshold = self.config.rack_temp_excess_c
        self.judge(out, "RackThermalAnomaly", racks, (excess > threshold) & ~cooling, b.now, excess,
                   evidence(excess_c=excess, gpu_at_zero_power_c=rack_ref[racks],
                            coolant_mean_c=(rack_ref - approach)[racks], site_median_approach_c=site_med[sites[racks]],
                            threshold_c=threshold))
