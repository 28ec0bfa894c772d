"""The capacity report (analytics/capacity.py): a known fleet hour split exactly, the real
simulator and detectors' archive adding up, empty and partial archives, older files."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.analytics.capacity import FAULT_ALERTS, add_parser, cmd_capacity, report, text
from pipeline.config import ConfigError
from pipeline.model import FACILITY_SAMPLE_V1, GPU_SAMPLE, GPU_SAMPLE_V3
from pipeline.power.curve import from_recording
from pipeline.sinks.parquet import ArchiveWriter
from tests.archives import N, STEP_S, T0, batch, gpu_rows, known_archive, simulated_archive, write_file
from tests.conftest import make_config

H100 = from_recording()


@pytest.fixture
def known(tmp_path: Path) -> Path:
    return known_archive(tmp_path)


def lost_to_cap(cap: float, draw: float) -> float:
    return 1.0 - float(H100.at(cap) / H100.at(draw))


def test_known_hour_splits_as_expected(known: Path) -> None:
    r = report(known / "archive", site_power_cap_w=400_000.0)
    assert (r.start, r.end) == (T0, T0 + timedelta(hours=1))
    assert r.gpus == 7 and r.sample_interval_s == STEP_S
    lost = 0.5 * lost_to_cap(500, 700)
    assert r.capped == pytest.approx(0.5)
    assert r.capped_lost == pytest.approx(lost)
    # the ECC alert; n02's two GPUs while failing; n02 g1's silence while alerted
    assert r.faulted == pytest.approx(10 / 60 + 2 * 15 / 60 + 5 / 60)
    assert r.idle == pytest.approx(1.0)
    assert r.not_reporting == pytest.approx(5 / 60)
    assert r.productive == pytest.approx(7.0 - lost - r.faulted - 1.0 - 5 / 60)
    assert r.total == pytest.approx(7.0)
    assert r.top_faulted == [{"site": "s1", "node": "n02", "gpu_hours": round(0.5 + 5 / 60, 3)},
                             {"site": "s1", "node": "n01", "gpu_hours": round(10 / 60, 3)}]

    s = r.site
    assert (s.sites, s.avg_kw, s.max_kw, s.max_reading_kw) == (1, pytest.approx(150.0), 200.0, 200.0)
    assert s.capacity_kw == 400.0 and s.capacity_factor_pct == pytest.approx(37.5)
    assert s.metered_hours == pytest.approx(1.0) and s.energy_mwh == pytest.approx(0.15)

    j = r.to_json()
    assert json.loads(json.dumps(j)) == j
    assert list(j) == ["from", "to", "hours", "gpus", "sample_interval_s", "gpu_hours", "shares_pct", "site",
                       "top_faulted", "missing", "archived"]
    assert set(j["gpu_hours"]) == {"total", "productive", "faulted", "capped_lost", "capped", "idle", "not_reporting"}
    assert set(j["shares_pct"]) == {"productive", "faulted", "capped_lost", "idle", "not_reporting"}
    assert sum(j["shares_pct"].values()) == pytest.approx(100.0, abs=0.05)
    assert set(j["site"]) >= {"avg_kw", "p95_kw", "max_kw", "capacity_kw", "capacity_factor_pct"}
    assert j["from"] == "2026-03-01T10:00:00.000Z" and j["missing"] == []
    assert "capacity factor 37.5%" in text(r)


def test_a_period_counts_only_its_samples(known: Path) -> None:
    r = report(known / "archive", T0 + timedelta(minutes=30), T0 + timedelta(minutes=45))
    assert r.hours == pytest.approx(0.25) and r.total == pytest.approx(7 * 0.25)
    assert r.faulted == pytest.approx(2 * 0.25)  # n02 failed for exactly this quarter
    assert r.capped == pytest.approx(0.25) and r.not_reporting == pytest.approx(0.0)
    assert r.site.avg_kw == pytest.approx(200.0)
    assert r.site.capacity_factor_pct is None  # no capacity given


def test_a_period_inside_a_long_cap_still_counts_it_capped(tmp_path: Path) -> None:
    """A node at its 700 W for an hour, then held at 400 W for the next (an event, or caps all
    day): a report of the second half hour only still finds it capped, its default limit read
    in the week before the period (its draw uncapped, not seen in the period: that limit); a
    node never above 600 W all that while is at its own."""
    w = ArchiveWriter(tmp_path / "archive", writer_id="t")
    for g in range(4):
        w.add("gpu_samples", batch(GPU_SAMPLE, gpu_rows("n01", g, range(N), 0.95, 690, 700)))
        w.add("gpu_samples", batch(GPU_SAMPLE, gpu_rows("n01", g, range(N, 2 * N), 0.95, 399, 400)))
        w.add("gpu_samples", batch(GPU_SAMPLE, gpu_rows("n02", g, range(2 * N), 0.95, 590, 600)))
    w.flush()
    r = report(tmp_path / "archive", T0 + timedelta(minutes=90), T0 + timedelta(minutes=120))
    assert r.capped == pytest.approx(4 * 0.5) and r.capped_lost == pytest.approx(4 * 0.5 * lost_to_cap(400, 700),
                                                                                 rel=1e-3)
    assert r.productive == pytest.approx(4 * 0.5 + 4 * 0.5 * (1 - lost_to_cap(400, 700)), rel=1e-3)  # n02 all


def test_fault_cover_is_the_union_of_a_gpus_and_its_nodes_faults() -> None:
    import polars as pl

    from pipeline.analytics.capacity import _fault_cover
    at = lambda m: T0 + timedelta(minutes=m)  # noqa: E731
    faults = pl.DataFrame({"site": ["s1"] * 5, "node": ["n1", "n1", "n1", "n1", "n2"],
                           "fgpu": [0, None, 1, 0, None], "fstart": [at(-5), at(5), at(20), at(50), at(0)],
                           "fend": [at(10), at(15), at(30), None, at(1)]},
                          schema_overrides={"fgpu": pl.Int16, "fstart": pl.Datetime("us", "UTC"),
                                            "fend": pl.Datetime("us", "UTC")})
    gpus = pl.DataFrame({"site": ["s1"] * 3, "node": ["n1", "n1", "n3"], "gpu": [0, 1, 0]},
                        schema_overrides={"gpu": pl.Int16})
    cover = dict(((n, g), h) for _, n, g, h in _fault_cover(faults, gpus, at(0), at(60)).iter_rows())
    # GPU 0: its own 0-10 (clipped at the start) joined with the node's 5-15, and 50 to the end
    # (still open); GPU 1: the node's 5-15 and its own 20-30; n3 had none.
    assert cover == {("n1", 0): pytest.approx(25 / 60), ("n1", 1): pytest.approx(20 / 60)}


def test_fault_alerts_come_from_the_catalog() -> None:
    assert {"GpuUncorrectableEcc", "GpuFellOffBus", "NodePowerBrake"} <= set(FAULT_ALERTS)
    assert not {"GpuStraggler", "PowerCapNotBinding", "CoolantLeak", "FleetwatchStalled"} & set(FAULT_ALERTS)


def test_empty_and_partial_archives(tmp_path: Path) -> None:
    r = report(tmp_path / "archive")  # nothing at all
    assert (r.gpus, r.total, r.site.sites) == (0, 0.0, 0)
    assert r.missing == ["gpu_samples", "facility_samples", "alerts", "node_health"]
    assert r.to_json()["site"]["capacity_factor_pct"] is None and "no GPU samples" in text(r)

    w = ArchiveWriter(tmp_path / "archive", writer_id="test")
    (tmp_path / "archive" / "alerts").mkdir()  # a dataset folder without files yet
    w.add("gpu_samples", batch(GPU_SAMPLE, gpu_rows("n01", 0, range(10), 0.9, 700, 700)))
    w.flush()
    r = report(tmp_path / "archive", site_power_cap_w=1e6)
    assert r.gpus == 1 and r.productive == pytest.approx(100 / 3600) and r.total == r.productive
    assert r.missing == ["facility_samples", "alerts", "node_health"]
    assert r.site.sites == 0 and r.site.capacity_kw == 1000.0 and r.site.capacity_factor_pct is None
    assert "no site meter readings" in text(r)
    # A period without samples says where the archive's are (a period of the wrong day had said nothing more)
    r = report(tmp_path / "archive", T0 + timedelta(days=1), T0 + timedelta(days=2))
    assert r.gpus == 0 and r.total == 0.0
    last = T0 + timedelta(seconds=9 * STEP_S)
    held = f"it holds GPU samples from {T0:%Y-%m-%d %H:%M:%S} to {last:%Y-%m-%d %H:%M:%S} UTC"
    assert held in text(r) and r.to_json()["archived"]["first"].startswith(f"{T0:%Y-%m-%dT%H:%M:%S}")


def test_an_archive_of_older_files_only(tmp_path: Path) -> None:
    """gpu_sample v3 files (no power_limit_w) and facility_sample v1 (no device_class)."""
    rows = gpu_rows("n01", 0, range(N), 0.9, 700, 0)
    del rows["power_limit_w"]
    write_file(tmp_path / "archive" / "gpu_samples", pa.Table.from_batches([batch(GPU_SAMPLE_V3, rows)]), "a.parquet")
    meter = {"ts": [T0, T0 + timedelta(minutes=1)], "site": ["s1"] * 2, "rack": ["", ""],
             "device": ["meter-main"] * 2, "metric": ["power_w"] * 2, "value": [1e5, 3e5], "quality": [1, 1]}
    write_file(tmp_path / "archive" / "facility_samples",
               pa.Table.from_batches([batch(FACILITY_SAMPLE_V1, meter)]), "b.parquet")
    r = report(tmp_path / "archive", site_power_cap_w=4e5)
    assert (r.gpus, r.productive, r.capped, r.total) == (1, pytest.approx(1.0), 0.0, pytest.approx(1.0))
    assert r.site.avg_kw == pytest.approx(200.0) and r.site.capacity_factor_pct == pytest.approx(50.0)


def test_a_renamed_node_and_a_replaced_gpu_are_the_gpus_they_were(tmp_path: Path) -> None:
    """A node renamed half-way (the same GPUs, their UUIDs, under a new name) and a GPU replaced in its
    slot (a new UUID where the old one was): each slot was counted a GPU, and each name's time without
    it as not reporting (4 GPUs for 2, half the hours not reporting). Positions, by the UUIDs they share."""
    half = N // 2
    first, second = gpu_rows("n04", 0, range(half), 0.9, 600, 700), gpu_rows("n04b", 0, range(half, N), 0.9, 600, 700)
    second["gpu_uuid"] = first["gpu_uuid"][:1] * len(second["ts"])  # (the same GPU under the node's new name)
    old, new = gpu_rows("n05", 0, range(half), 0.9, 600, 700), gpu_rows("n05", 0, range(half, N), 0.9, 600, 700)
    new["gpu_uuid"] = ["GPU-replacement"] * len(new["ts"])
    w = ArchiveWriter(tmp_path / "archive", writer_id="test")
    for rows in (first, second, old, new):
        w.add("gpu_samples", batch(GPU_SAMPLE, rows))
    w.flush()
    r = report(tmp_path / "archive")
    assert r.gpus == 2 and r.total == pytest.approx(2.0)
    assert r.not_reporting == pytest.approx(0.0, abs=1e-9) and r.productive == pytest.approx(2.0)


@pytest.mark.parametrize("shuffle", ["moved, both slots refilled", "swapped on a node"])
def test_slots_that_reported_at_once_are_two_gpus_whatever_passed_between_them(tmp_path: Path, shuffle) -> None:
    """A GPU moved to another node whose GPU left (an RMA shuffle), or two GPUs whose indices swapped: slots
    joined by a UUID they both held had been one position (the fleet a GPU short, each slot's hours halved)."""
    half = N // 2

    def held(node, gpu, ks, uuid):
        rows = gpu_rows(node, gpu, ks, 0.9, 600, 700)
        rows["gpu_uuid"] = [uuid] * len(rows["ts"])
        return rows
    first, second = (("n01", 0), ("n02", 0)) if shuffle.startswith("moved") else (("n01", 0), ("n01", 1))
    w = ArchiveWriter(tmp_path / "archive", writer_id="test")
    for rows in (held(*first, range(half), "X"), held(*first, range(half, N), "Z"),
                 held(*second, range(half), "W"), held(*second, range(half, N), "X")):
        w.add("gpu_samples", batch(GPU_SAMPLE, rows))
    w.flush()
    r = report(tmp_path / "archive")
    assert (r.gpus, r.total, r.productive) == (2, pytest.approx(2.0), pytest.approx(2.0))


def run_cli(*argv: str) -> int:
    p = argparse.ArgumentParser(prog="fleetwatch")
    add_parser(p.add_subparsers(dest="command", required=True))
    return cmd_capacity(p.parse_args(["capacity", *argv]))


def test_cli(known: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "fleetwatch.toml"
    config.write_text("[detect]\nsite_power_cap_w = 300000.0\n")
    assert run_cli("--data-dir", str(known), "--config", str(config), "--json") == 0
    j = json.loads(capsys.readouterr().out)
    assert j["gpus"] == 7 and j["site"]["capacity_kw"] == 300.0 and j["site"]["capacity_factor_pct"] == 50.0

    assert run_cli("--data-dir", str(known), "--to", "2026-03-01T10:45:00Z", "--since", "15m", "--json") == 0
    j = json.loads(capsys.readouterr().out)
    assert j["from"] == "2026-03-01T10:30:00.000Z" and j["gpu_hours"]["faulted"] == 0.5

    assert run_cli("--data-dir", str(known)) == 0
    out = capsys.readouterr().out
    assert "7 GPUs" in out and "lost to caps" in out and "connection capacity unknown" in out

    with pytest.raises(ConfigError, match="does not exist"):
        run_cli("--data-dir", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="--since"):
        run_cli("--data-dir", str(known), "--since", "soon")
    with pytest.raises(ConfigError, match="--from"):
        run_cli("--data-dir", str(known), "--from", "yesterday")
    with pytest.raises(ConfigError, match="after"):
        run_cli("--data-dir", str(known), "--from", "2026-03-01T11:00:00", "--to", "2026-03-01T10:00:00")


def test_the_real_simulator_and_detectors(tmp_path: Path) -> None:
    """The simulated fleet, detected by the real engine and archived by the real writer, with a
    node's GPUs capped half-way and an uncorrectable ECC error injected: every class shows,
    and the hours add up."""
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 4, "fault_interval_s": 0.0, "gpu_reset_interval_s": 0.0})
    steps = 600
    sim = simulated_archive(tmp_path / "archive", cfg, steps, {
        200: lambda sim: sim.inject("ecc_uncorrectable", gpu=3, duration_s=300),
        steps // 2: lambda sim: sim.set_caps(np.arange(8, 16), 450.0)})
    r = report(tmp_path / "archive", site_power_cap_w=1e6)
    hours = steps * cfg.fleet.sample_interval_s / 3600.0
    assert r.gpus == 32 and r.hours == pytest.approx(hours)
    assert r.total == pytest.approx(32 * hours)
    assert r.faulted > 0 and r.top_faulted[0]["node"] == sim.node_names[0]
    assert r.capped > 0 and 0 < r.capped_lost < r.capped * lost_to_cap(450, 700) + 1e-9
    assert r.productive > 0
    assert 0 < r.site.avg_kw <= r.site.p95_kw <= r.site.max_kw <= r.site.max_reading_kw
    assert r.site.capacity_factor_pct == pytest.approx(100 * r.site.avg_kw / 1000.0)
    # The same classes by another reader and another method: DuckDB SQL, an as-of join on the
    # node states and the fault alerts' episodes.
    faulted_h, idle_h = oracle(tmp_path / "archive")
    assert r.faulted == pytest.approx(faulted_h) and r.idle == pytest.approx(idle_h)


def oracle(archive: Path) -> tuple[float, float]:
    duckdb = pytest.importorskip("duckdb")
    names = ", ".join(f"'{n}'" for n in FAULT_ALERTS)
    read = lambda d: f"read_parquet('{archive}/{d}/*/*/*.parquet', union_by_name=true)"  # noqa: E731
    return duckdb.sql(f"""
        with h as (select ts, site, node, state from {read('node_health')}),
        a as (select site, node, try_cast(any_value(gpu) as smallint) as fgpu, starts_at, max(ends_at) as ends_at
              from {read('alerts')} where alertname in ({names}) group by fingerprint, site, node, starts_at),
        g as (select g.ts, g.site, g.node, g.gpu, g.util_gpu, coalesce(h.state, '') = 'failing' as failing
              from {read('gpu_samples')} g asof left join h on g.site = h.site and g.node = h.node and g.ts >= h.ts),
        f as (select *, failing or exists (select 1 from a where a.site = g.site and a.node = g.node
                        and (a.fgpu is null or a.fgpu = g.gpu) and g.ts >= a.starts_at
                        and (a.ends_at is null or g.ts < a.ends_at)) as faulted from g)
        select sum(faulted::int) / 3600.0, sum((not faulted and util_gpu < 0.05)::int) / 3600.0 from f
    """).fetchall()[0]
