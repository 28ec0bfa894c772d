"""The site tier: each rack against the site's other racks (RackThermalAnomaly).

It reads rack summaries (model.RACK_SUMMARY), which the rack tier (families/peers.py)
makes from a rack's GPUs and coolant: one process holds a site's racks while many hold
the racks themselves (docs/kafka.md). In one process the engine hands the summaries
over directly; over Kafka they travel on `fleetwatch.racks`, keyed by site."""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.bus.base import Topic
from pipeline.detect.batch import Output, RackBatch
from pipeline.detect.family import Family, State, evidence
from pipeline.detect.state import group_median

# A rack whose latest summary is older than this (its GPUs went silent) is no peer.
SUMMARY_STALE_S = 60.0


class RackVsSite(Family):
    topic = Topic.RACKS
    name = "peers"
    raises = ("RackThermalAnomaly",)
    # Per rack: its approach (GPUs at zero power over the mean coolant) and when it was summarised.
    site_peer = State("rack", fields={"approach": (np.float64, np.nan), "summary_t": (np.float64, np.nan)})

    def evaluate(self, b: RackBatch, out: Output) -> None:
        """Physics and peers one level up: what warms every GPU of a rack alike while the
        coolant reads normal (air in the loop, fouled cold plates) shows as the rack's GPUs
        at zero power running further above its coolant than the site's other racks do.
        Judged where the site has three racks with a known approach."""
        inv, peer = self.inventory, self.site_peer
        n = inv.rack_count
        peer.ensure(n)
        # A summary no newer than the rack's last is one read again after a crash (over Kafka the
        # site tier's offsets may trail what it processed, bus/align.py): judged once only.
        new = ~(b.ts <= peer.summary_t[b.slots])
        if not new.all():
            b = dataclasses.replace(b, slots=b.slots[new], ts=b.ts[new], gpu_ref=b.gpu_ref[new],
                                    coolant=b.coolant[new], explained=b.explained[new])
        racks, approach = b.slots, b.gpu_ref - b.coolant
        peer.approach[racks], peer.summary_t[racks] = approach, b.ts
        sites = np.asarray(inv.rack_site, np.int64)
        known = np.isfinite(peer.approach[:n]) & (b.now - peer.summary_t[:n] <= SUMMARY_STALE_S)
        site_med, site_n = group_median(peer.approach[:n], sites, len(inv.site_index), known)
        excess = approach - site_med[sites[racks]]
        judged = np.flatnonzero(np.isfinite(approach) & (site_n[sites[racks]] >= 3))
        threshold = self.config.rack_temp_excess_c
        self.judge(out, "RackThermalAnomaly", racks[judged], (excess[judged] > threshold) & ~b.explained[judged],
                   b.now, excess[judged],
                   evidence(excess_c=excess[judged], gpu_at_zero_power_c=b.gpu_ref[judged],
                            coolant_mean_c=b.coolant[judged], site_median_approach_c=site_med[sites[racks[judged]]],
                            threshold_c=threshold))
