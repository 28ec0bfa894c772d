"""Hysteresis (`detect/health.Tracker`): a condition fires after `detect.fire_after` hits in a
row and resolves after `detect.resolve_after` clear evaluations, and a streak must also last
as long as it would at the 1 s scrapes the detectors are tuned at (`detect.streak_s`)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detect.catalog import ALERTS
from pipeline.detect.health import Tracker

RUNAWAY = next(a for a in ALERTS if a.name == "GpuThermalRunaway")
ONE = np.array([0])


def tracker(streak_s: float = 1.0, fire_after: int = 3, resolve_after: int = 30) -> Tracker:
    return Tracker(RUNAWAY, "peer_temperature", fire_after, resolve_after, lambda e: {"gpu": str(e)}, "",
                   streak_s)


def play(tr: Tracker, step_s: float, pattern: list[bool], t0: float = 1000.0) -> list[tuple[float, bool]]:
    """Evaluate one GPU every step_s; (time, True for firing / False for resolved) of each change."""
    changes = []
    for k, hit in enumerate(pattern):
        t = t0 + k * step_s
        for _, alert in tr.update(ONE, np.array([hit]), t, np.array([1.0]), lambda i: {}):
            changes.append((round(t - t0, 6), alert.ends_at is None))
    return changes


def test_at_1_s_scrapes_the_counts_decide_as_they_always_did():
    """Three hits fire on the third, 30 clears resolve on the 30th: 2 s and 29 s."""
    assert play(tracker(), 1.0, [True] * 3 + [False] * 30) == [(2.0, True), (32.0, False)]
    assert play(tracker(), 1.0, [True, True, False] * 5) == []  # never three in a row


def test_at_0_2_s_scrapes_a_condition_must_hold_as_long_as_at_1_s():
    """A real H200's temperature leads its 1 s power average by up to a second when a load
    starts: at 0.2-s scrapes that was 5 hits in a row, and 3 fired. Now a streak must span
    the 2 s (less half a step for jitter) that three 1-s scrapes span, and a clear one the 29 s."""
    assert play(tracker(), 0.2, [True] * 6 + [False] * 200) == []  # a 1.2 s lead: no alert
    changes = play(tracker(), 0.2, [True] * 10 + [False] * 200)
    assert changes == [(1.6, True), (2.0 + 28.6, False)]  # fired 1.6 s into it, resolved 28.6 s after it cleared
    assert play(tracker(streak_s=0.0), 0.2, [True] * 3) == [(0.4, True)]  # 0: counts alone, as before


def test_a_streak_broken_by_one_clear_starts_again():
    changes = play(tracker(), 0.2, [True] * 8 + [False] + [True] * 8)
    assert changes == []  # 1.4 s, a break, 1.4 s: never 1.5 s in a row
    assert play(tracker(), 0.2, [True] * 8 + [False] + [True] * 9) == [(3.4, True)]  # 1.6 s from the break


def test_at_slow_scrapes_the_counts_still_decide():
    """At 30-s scrapes three hits span 60 s, more than the 2 s: the count is the bound, as before."""
    assert play(tracker(), 30.0, [True] * 3) == [(60.0, True)]


@pytest.mark.parametrize("fire_after", [1, 2])
def test_fire_at_once_stays_at_once(fire_after):
    """`fire_after = 1` (an XID, a leak) fires on its first hit at any scrape interval; 2 needs 0.5 s."""
    want = [(0.0, True)] if fire_after == 1 else [(0.6, True)]
    assert play(tracker(fire_after=fire_after), 0.2, [True] * 6) == want


def test_a_batch_stamped_before_the_streak_began_pulls_its_start_back():
    """Over Kafka one partition's batch can be stamped before another's that began a streak (`t`
    is each batch's event time). The streak spans from its earliest evaluation: a clear from a
    batch an hour ahead must not hold a firing alert for that hour."""
    tr = tracker()
    assert play(tr, 1.0, [True] * 3, t0=1000.0) == [(2.0, True)]
    assert play(tr, 1.0, [False], t0=1000.0 + 3600.0) == []  # its first clear, from a batch an hour ahead
    assert play(tr, 1.0, [False] * 40, t0=1004.0) == [(29.0, False)]  # 31 clears, the first 28.5 s from 1004

    tr = tracker()
    assert play(tr, 0.2, [True], t0=1000.0) == []  # a hit, then batches stamped up to 2.8 s before it
    assert play(tr, 0.2, [True] * 12, t0=997.2) == [(1.6, True)]  # 1.5 s from 997.2 or more (it never fired before)


def test_a_restart_s_downtime_is_no_time_a_condition_held():
    """Two hits at 0.2-s scrapes, 60 s down, one more: a 0.4-s streak, not a 60-s one
    (`Engine.resume` shifts the streaks as it does the staleness clocks)."""
    tr = tracker()
    play(tr, 0.2, [True, True], t0=1000.0)
    tr.shift(60.0)
    assert play(tr, 0.2, [True] * 8, t0=1060.4) == [(1.2, True)]  # the 9th hit: 1.6 s held, 0.4 s before the restart


def test_an_entity_judged_twice_in_one_evaluation_is_one_judgement():
    """A rack's A and B feeds are two PDU rows of one rack: its two clears had popped one alert twice
    (KeyError: the detect role died), and two hits fired it twice. Hit where any row hit, with that
    row's score and evidence."""
    tr = tracker(fire_after=1, resolve_after=2)
    twice = np.array([0, 0])
    fired = tr.update(twice, np.array([False, True]), 1000.0, np.array([1.0, 7.0]), lambda i: {"row": i})
    assert [(a.ends_at, a.score, a.evidence["row"]) for _, a in fired] == [(None, 7.0, 1)]
    assert tr.update(twice, np.array([True, True]), 1001.0, np.array([1.0, 2.0]), lambda i: {}) == []
    changes = [tr.update(twice, np.array([False, False]), t, np.array([0.0, 0.0]), lambda i: {}) for t in (1002.0, 1003.0)]
    assert [len(c) for c in changes] == [0, 1] and changes[1][0][1].ends_at is not None and not tr.active
