"""Peers one level up: a node's GPUs against the rack's other nodes at the same power
(NodeThermalAnomaly). It also summarises each rack for the site tier, which judges the
rack against the site's other racks (families/rack_vs_site.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.families.heat_balance import HeatBalance
from pipeline.detect.families.staleness import Staleness
from pipeline.detect.family import Family, State, evidence
from pipeline.detect.state import group_median
from pipeline.model import RACK_SUMMARY


class Peers(Family):
    topic = Topic.GPU
    name = "peers"
    raises = ("NodeThermalAnomaly",)
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
        # Judged at steady power, or in step with the rack: the nodes of one training job swing
        # together every 15-45 s and are never steady, but at the same power at the same time
        # their temperatures lag alike, and the comparison is fair (three of the rack's nodes
        # in the batch at least: a batch of one node is in step with itself).
        rack_of = inv.node.rack[nodes]
        step_power, in_batch = group_median(view.node_power, rack_of, inv.rack_count)
        step_swing, _ = group_median(view.node_swing, rack_of, inv.rack_count)
        in_step = ((np.abs(view.node_power - step_power[rack_of]) < d.runaway_steady_w)
                   & (np.abs(view.node_swing - step_swing[rack_of]) < d.runaway_steady_w) & (in_batch[rack_of] >= 3))
        steady = ((view.node_swing < d.runaway_steady_w) | in_step) & (view.node_gpus >= 3)
        ref.ref_temp[nodes] = np.where(steady, view.node_temp - d.thermal_c_per_w * view.node_power, np.nan)
        fresh = np.isfinite(ref.ref_temp[:n_nodes]) & (b.now - reporting.last_seen[:n_nodes]
                                                       <= 5 * reporting.interval[:n_nodes])
        node_rack = inv.node.rack
        rack_med, rack_n = group_median(ref.ref_temp[:n_nodes], node_rack[:n_nodes], inv.rack_count, fresh)
        rack = node_rack[nodes]
        # A node's peers: the rack's nodes of its GPU model (the rise per watt and the cooling are a model's).
        n_models = len(inv.model_ids) + 1
        peer_group = node_rack[:n_nodes] * n_models + inv.node.model[:n_nodes] + 1
        peer_med, peer_n = group_median(ref.ref_temp[:n_nodes], peer_group, inv.rack_count * n_models, fresh)
        peers = peer_group[nodes]
        excess = ref.ref_temp[nodes] - peer_med[peers]
        judged = np.flatnonzero(steady & (peer_n[peers] >= 3))  # others neither raise nor clear it
        self._summarize_racks(b, out, np.unique(rack), rack_med, rack_n)
        self.judge(out, "NodeThermalAnomaly", nodes[judged], excess[judged] > d.node_temp_excess_c, b.now,
                   excess[judged], evidence(excess_c=excess[judged], node_temp_c=view.node_temp[judged],
                                            rack_median_c=peer_med[peers[judged]] + d.thermal_c_per_w
                                            * view.node_power[judged], node_power_w=view.node_power[judged],
                                            threshold_c=d.node_temp_excess_c))
        b.node_hot = self.alerted("NodeThermalAnomaly", n_nodes)[nodes][b.group]

    def _summarize_racks(self, b: GpuBatch, out: Output, racks: np.ndarray, rack_ref: np.ndarray,
                         rack_n: np.ndarray) -> None:
        """The site tier's input (families/rack_vs_site.py): each rack of the batch's GPUs at
        zero power (the median of its nodes' references, known from three nodes), its
        mean coolant temperature (CDU supply and return), and whether a rack alert (its
        coolant) explains its heat."""
        inv, loop = self.inventory, self.engine.family(HeatBalance).loop
        loop.ensure(inv.rack_count)
        ref = np.where(rack_n[racks] >= 3, rack_ref[racks], np.nan)
        coolant = 0.5 * (loop.supply_c[racks] + loop.return_c[racks])
        names = [inv.rack_names[r] for r in racks.tolist()]
        ts = pa.array(np.full(racks.shape[0], round(b.now * 1e9), np.int64)).cast(RACK_SUMMARY.field("ts").type)
        out.racks = pa.RecordBatch.from_arrays(
            [ts, pa.array([s for s, _ in names]), pa.array([r for _, r in names]),
             pa.array(ref, from_pandas=True), pa.array(coolant, from_pandas=True),
             pa.array(self.engine.racks_explaining("RackThermalAnomaly")[racks])], schema=RACK_SUMMARY)
