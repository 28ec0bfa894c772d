"""Who reports, how often, and who went silent: a GPU of a reporting node that stopped
(GpuNotReporting) and a node that stopped (NodeNotReporting), unless it said it would:
a node announced as going down for maintenance (an event of a faults.MAINTENANCE_EVENTS
kind: a rolling reboot, a driver upgrade, as NVIDIA's GPU Operator drains nodes for one)
is quiet for detect.maintenance_s."""

from __future__ import annotations

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import GpuBatch, Output
from pipeline.detect.family import Family, State



class Staleness(Family):
    topic = Topic.GPU
    name = "staleness"
    raises = ("GpuNotReporting", "NodeNotReporting")
    gpu = State("gpu", fields={"last_seen": (np.float64, np.nan), "interval": (np.float64, np.nan),
                               "offbus": (np.bool_, False)})  # fell off the bus: not also GpuNotReporting
    # A node's `heard_at`: its partition's clock when its latest sample came in. Its silence is how far the
    # clock moved since: a node whose clock runs ahead moves the partition's clock, and one whose clock
    # runs behind is behind it, but neither makes a node that reports silent.
    node = State("node", fields={"last_seen": (np.float64, np.nan), "interval": (np.float64, np.nan),
                                 "quiet_until": (np.float64, -np.inf), "heard_at": (np.float64, np.nan)})

    def ensure(self) -> None:
        self.gpu.ensure(self.inventory.gpu_count)
        self.node.ensure(self.inventory.node_count)

    def observe(self, b: GpuBatch) -> None:
        """Reporting cadence: each GPU's interval (a slow average of its gaps), and the gap
        since its previous sample for the families that follow lags."""
        self.ensure()
        gpu, node, slots, ts = self.gpu, self.node, b.slots, b.ts
        gap = ts - gpu.last_seen[slots]
        seen_before = np.isfinite(gap) & (gap > 0)
        interval = gpu.interval[slots]
        gpu.interval[slots] = np.where(seen_before, np.where(np.isnan(interval), gap, 0.9 * interval + 0.1 * gap),
                                       interval)
        gpu.last_seen[slots] = ts
        node.last_seen[b.node] = ts
        node.interval[b.node] = gpu.interval[slots]
        self.heard(b.nodes)
        gpu.offbus[slots] = False  # a GPU that reports is on the bus again
        b.gap = np.where(seen_before, gap, np.nan)

    def evaluate(self, b: GpuBatch, out: Output) -> None:
        """GPUs of reporting nodes that went silent, and nodes that went silent, by event
        time (detect/watermark.py): a GPU against its own node's latest sample, a node
        against its partition's watermark, each past the lateness bound, so that what
        arrives late within it (an XID explaining the silence, a slow scrape) is in first."""
        inv, gpu, node, k, t = self.inventory, self.gpu, self.node, self.config.missing_after_intervals, b.now
        lateness = self.config.lateness_s
        n_gpus, n_nodes = inv.gpu_count, inv.node_count
        present = np.zeros(n_nodes, bool)
        present[b.nodes] = True
        gpu_node = inv.gpu.node[:n_gpus]
        cand = np.flatnonzero(present[gpu_node] & ~inv.gpu.retired[:n_gpus])
        silent = node.last_seen[gpu_node[cand]] - gpu.last_seen[cand]
        self.judge(out, "GpuNotReporting", cand, (silent - lateness > k * gpu.interval[cand]) & ~gpu.offbus[cand], t,
                   silent, lambda i: {"silent_s": float(silent[i])})
        all_nodes = np.arange(n_nodes)
        clock = self.clock(all_nodes)
        heard = node.heard_at[:n_nodes]  # (NaN: a checkpoint from before it was kept: the node's own time)
        node_silent = clock - np.where(np.isnan(heard), node.last_seen[:n_nodes], heard)
        gone = np.flatnonzero(node_silent > self.config.forget_after_s) if self.config.forget_after_s else []
        if len(gone):
            self.engine.forget_nodes(out, gone, t, node_silent[gone])
            node_silent[gone] = np.nan
        quiet = node.quiet_until[:n_nodes] > clock
        self.judge(out, "NodeNotReporting", all_nodes,
                   (node_silent - lateness > 2 * k * node.interval[:n_nodes]) & ~quiet, t,
                   node_silent, lambda i: {"silent_s": float(node_silent[i])})

    def clock(self, nodes: np.ndarray) -> np.ndarray:
        """Per node: its partition's clock (the whole stream's in one process)."""
        inv = self.inventory
        return self.engine.gpu_time.newest(inv.rack_partition[inv.node.rack[nodes]], self.engine.one_stream)

    def heard(self, nodes: np.ndarray) -> None:
        """These nodes sent samples now, late ones too (a node whose clock NTP stepped back is alive)."""
        self.ensure()
        if nodes.size:
            self.node.heard_at[nodes] = np.fmax(self.node.heard_at[nodes], self.clock(nodes))

    def maintenance(self, nodes: np.ndarray, ts: np.ndarray, hold_s: float | None = None) -> None:
        """Nodes announced (at `ts`, Unix seconds) as going down for maintenance (or their collector
        restarting: `hold_s`, detect.restart_grace_s)."""
        self.ensure()
        np.maximum.at(self.node.quiet_until, nodes, ts + (self.config.maintenance_s if hold_s is None else hold_s))

    def announced(self, nodes: np.ndarray, interval_s: np.ndarray) -> None:
        """Nodes whose collector started reading every `interval_s`: their GPUs' intervals start from it (learned
        from the gaps alone, a tenfold rise had left a node silent past its old interval's bound: a false
        NodeNotReporting)."""
        self.ensure()
        ok = np.isfinite(interval_s) & (interval_s > 0)
        nodes, interval_s = nodes[ok], interval_s[ok]
        if not nodes.size:
            return
        self.node.interval[nodes] = interval_s
        n_gpus = self.inventory.gpu_count
        at = np.full(self.inventory.node_count, np.nan)
        at[nodes] = interval_s
        gpu_interval = at[self.inventory.gpu.node[:n_gpus]]
        mine = np.isfinite(gpu_interval)
        self.gpu.interval[:n_gpus][mine] = gpu_interval[mine]

    def latest(self) -> float | None:
        """Unix seconds of the latest GPU sample seen (None before any)."""
        self.ensure()
        seen = self.node.last_seen[:self.inventory.node_count]
        return float(np.nanmax(seen)) if np.isfinite(seen).any() else None

    def shift(self, seconds: float) -> None:
        """Move every last-seen time by `seconds` (a resumed process: its downtime is no silence)."""
        self.ensure()
        self.gpu.last_seen[:self.inventory.gpu_count] += seconds
        self.node.last_seen[:self.inventory.node_count] += seconds
        self.node.heard_at[:self.inventory.node_count] += seconds
