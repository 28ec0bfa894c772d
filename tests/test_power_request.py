"""Power requests (issue 15, item 1): what is taken, and a refusal that says why."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from pipeline.model import POWER_REQUEST
from pipeline.power.request import PowerRequest, Rejected, from_dict, validate

NOW = datetime(2026, 12, 1, 18, 0, tzinfo=timezone.utc)


def request(**kw) -> PowerRequest:
    return from_dict({"site": "dc1", "duration_s": 900, "reduction_pct": 20, **kw}, "cli", NOW)


def rejected(req: PowerRequest, accepted=(), **kw) -> str:
    with pytest.raises(Rejected) as e:
        validate(req, NOW, list(accepted), **kw)
    return str(e.value)


def test_a_request_in_its_json_form_round_trips_and_is_a_row_of_its_schema():
    req = request(start="2026-12-01T18:05:00Z", racks=["r01", "r02"], ramp_s=20, id="dr-7")
    validate(req, NOW, [], baseline_kw=800, flexible_kw=300)
    assert (req.start, req.end, req.racks, req.reduction_w(800)) == (
        NOW + timedelta(minutes=5), NOW + timedelta(minutes=20), ("r01", "r02"), 160_000)
    assert from_dict(req.to_dict(), "http", NOW) == PowerRequest(**{**req.__dict__, "source": "http"})
    batch = req.to_batch()
    assert batch.schema.equals(POWER_REQUEST, check_metadata=True)
    back = batch.to_pylist()[0]
    assert back["id"] == "dr-7" and back["racks"] == "r01,r02" and back["reduction_pct"] == 20
    assert from_dict({**back, "start": req.to_dict()["start"], "ts": req.to_dict()["ts"]}, "kafka", NOW).racks == req.racks
    assert request(start="now").start == NOW and request().racks == ()
    assert request(id=0).id == "0" and request(start="2026-12-01t18:05:00z").start == NOW + timedelta(minutes=5)


@pytest.mark.parametrize("fields, why", [
    ({"reduction_pct": None}, "exactly one of target_kw, reduction_kw, reduction_pct (got none)"),
    ({"reduction_kw": 50}, "exactly one of target_kw, reduction_kw, reduction_pct (got reduction_kw, reduction_pct)"),
    ({"reduction_pct": -5}, "reduction_pct = -5: must be from 1 to under 100"),
    ({"reduction_pct": 100}, "reduction_pct = 100: must be from 1 to under 100"),
    ({"reduction_pct": 0.15}, "reduction_pct = 0.15: a percentage, from 1 to under 100 (15 for 15%)"),
    ({"reduction_pct": None, "reduction_kw": 0}, "reduction_kw = 0: must be positive"),
    ({"duration_s": -1}, "duration_s = -1: must be positive"),
    ({"ramp_s": 1000}, "ramp_s = 1000: must be positive and no longer than duration_s (900)"),
    ({"start": "2026-12-01T17:50:00Z"}, "start 2026-12-01T17:50:00.000Z is 600 s in the past"),
])
def test_a_bad_request_is_refused_saying_why(fields, why):
    assert why in rejected(request(**fields))


def test_malformed_json_is_refused_naming_the_field():
    for data, why in [({"site": "dc1", "duration_s": 60, "reduce": 5}, "unknown field(s) reduce"),
                      ({"duration_s": 60}, "site is missing"),
                      ({"site": "dc1", "duration_s": "soon"}, "duration_s = 'soon': not a number"),
                      ({"site": "dc1", "duration_s": 60, "start": "18:00"}, "start = '18:00': not a time"),
                      ({"site": "dc1", "duration_s": 60, "start": "2026-12-01T18:00:00"}, "give the time zone"),
                      ({"site": "dc1", "duration_s": 60, "racks": [1]}, "racks = [1]: a list of rack names"),
                      # a sender's type slips: not a 1% request, not the whole site
                      ({"site": "dc1", "duration_s": 60, "reduction_pct": True}, "reduction_pct = True: not a number"),
                      ({"site": "dc1", "duration_s": 60, "reduction_kw": 5, "racks": False}, "racks = False: a list"),
                      ({"site": "dc1", "duration_s": 60, "reduction_kw": 5, "racks": 0}, "racks = 0: a list"),
                      ({"site": "dc1", "duration_s": 60, "reduction_kw": 5, "id": 1.5}, "id = 1.5: a string"),
                      ({"site": "dc1", "duration_s": 60, "reduction_kw": 5, "id": "dr/1"}, "id 'dr/1': at most 128"),
                      ({"site": "dc1", "duration_s": 60, "reduction_kw": 5, "id": "x" * 129}, "...: at most 128")]:
        with pytest.raises(Rejected, match=re.escape(why)):
            from_dict(data, "http", NOW)


def test_a_request_within_the_start_grace_is_taken_as_now():
    validate(request(start="2026-12-01T17:59:45Z"), NOW, [])


def test_more_than_the_site_can_shed_is_refused_with_what_it_can():
    why = rejected(request(reduction_pct=40), baseline_kw=1000, flexible_kw=250)
    assert "shed 40% asks 400.0 kW of site dc1, which can shed at most 250.0 kW" in why
    assert "already under it" in rejected(request(reduction_pct=None, target_kw=1200), baseline_kw=1000)
    validate(request(reduction_pct=None, target_kw=800), NOW, [], baseline_kw=1000, flexible_kw=250)


def test_overlapping_requests_at_one_site_are_refused_and_others_taken():
    """The power loop runs one request at a time: one on other racks had been accepted beside the first, and
    never ran ("never started: no data at its start")."""
    first = request(id="a", racks=["r01", "r02"])
    why = rejected(request(racks=["r02"], start="2026-12-01T18:10:00Z"), [first])
    assert "overlaps request a (site dc1 racks r01,r02, 2026-12-01T18:00:00.000Z to 2026-12-01T18:15:00.000Z" in why
    assert "overlaps request a" in rejected(request(), [first])  # the whole site covers its racks
    assert "one request at a time" in rejected(request(racks=["r03"]), [first])  # other racks of the site
    assert "id a is taken" in rejected(request(id="a", start="2026-12-01T19:00:00Z"), [first])
    validate(request(start="2026-12-01T18:15:00Z"), NOW, [first])         # after it ends
    validate(request(site="dc2"), NOW, [first])                           # another site


def test_a_request_too_long_or_too_far_ahead_is_refused_before_its_end_is_read():
    """Past the bounds its end is past year 9999 (OverflowError on every read of it before)."""
    assert "duration_s = 1e+12: at most 604800 s (7 days)" in rejected(request(duration_s=1e12))
    assert "days ahead (now 2026-12-01T18:00:00.000Z); at most 365 days ahead" in rejected(
        request(start="9999-12-31T23:59:00Z", duration_s=600))
    validate(request(duration_s=7 * 86400, start="2027-11-30T18:00:00Z"), NOW, [])  # a week, within a year
    with pytest.raises(Rejected, match="start = '9999-12-31T23:00:00-05:00': out of range"):
        request(start="9999-12-31T23:00:00-05:00")
    with pytest.raises(Rejected, match="duration_s = 1000.*: not a number"):
        request(duration_s=10 ** 400)  # (JSON's integers have no bound)
