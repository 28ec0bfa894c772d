"""A rack's PDU feeds (A and B, the usual redundant design): each PDU reads its share of the rack, and
the rack's power is their sum. A feed that goes silent while another of its rack reads (its PDU failed,
the other feed carries the whole rack) is out of the sum, judged by its own reporting interval: its last
reading beside the doubled other had read as 1.5x the rack. The detectors' heat balance and the power
loop's PDU sum both count feeds so."""

from __future__ import annotations

import numpy as np

FEED_SILENT_INTERVALS = 3.0  # a feed unread this many of its intervals while another of its rack reads,
FEED_SILENT_MIN_S = 5.0      # and this long, is out of the rack's sum
INTERVAL_WEIGHT = 0.2        # each gap's weight in a feed's interval (an EW mean)


def silence_allowed_s(interval_s):
    """How long a feed may go unread while another of its rack reads; without an interval yet (one
    reading), for ever. Scalar or array, as given."""
    interval = np.asarray(interval_s, np.float64)
    out = np.where(np.isnan(interval), np.inf, np.fmax(FEED_SILENT_INTERVALS * interval, FEED_SILENT_MIN_S))
    return out if out.ndim else float(out)


def next_interval(interval_s, gap_s):
    """A feed's interval after a reading `gap_s` after its last one: the first gap, then the gaps' EW mean.
    A gap past the silence allowed is an outage, not its interval (it would hold the next outage long), and
    one not positive tells nothing. Scalar or array, as given."""
    interval, gap = np.asarray(interval_s, np.float64), np.asarray(gap_s, np.float64)
    step = np.isfinite(gap) & (gap > 0) & ~(gap > silence_allowed_s(interval))
    out = np.where(step, np.where(np.isnan(interval), gap, interval + INTERVAL_WEIGHT * (gap - interval)), interval)
    return out if out.ndim else float(out)
