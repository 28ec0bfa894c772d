"""`fleetwatch query` (analytics/query.py): the ready queries of docs/queries.md on a simulated
archive, each answer checked against polars reading the same Parquet; older files, an
empty archive, the output formats and the refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from pipeline.analytics.archive import scan
from pipeline.cli import main
from pipeline.model import SCHEMAS
from tests.archives import N, known_archive, simulated_archive
from tests.conftest import make_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "queries.md"
ECC_GPU = 3  # the GPU the simulated archive's uncorrectable ECC error is on (node r01-n01)


def ready_queries() -> dict[str, list[str]]:
    """docs/queries.md's SQL blocks, by their section's title."""
    out: dict[str, list[str]] = {}
    for section in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        out[title] = re.findall(r"```sql\n(.*?)```", section, re.S)
    return out


def query(capsys, data: Path, sql: str, *more: str) -> tuple[int, str, str]:
    status = main(["query", "--data-dir", str(data), sql, *more])
    out = capsys.readouterr()
    return status, out.out, out.err


def rows(capsys, data: Path, sql: str) -> list[dict]:
    status, out, err = query(capsys, data, sql, "--format", "json")
    assert status == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """Ten minutes of a 32-GPU fleet detected and archived, an uncorrectable ECC error at 100 s."""
    data = tmp_path_factory.mktemp("query") / "data"
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 4, "fault_interval_s": 0.0, "gpu_reset_interval_s": 0.0})
    simulated_archive(data / "archive", cfg, 600,
                      {100: lambda sim: sim.inject("ecc_uncorrectable", gpu=ECC_GPU, duration_s=300)})
    return data


def test_the_docs_ready_queries_answer_what_polars_reads(simulated: Path, capsys) -> None:
    qs = ready_queries()
    assert len(qs) == 5 and all(qs.values())
    archive = simulated / "archive"
    gpu = scan(archive / "gpu_samples").collect()

    timeline, per_minute = (rows(capsys, simulated, sql) for sql in qs["A node's timeline around its latest critical alert"])
    details = [r["detail"] for r in timeline]
    assert "GpuUncorrectableEcc firing" in details
    assert any(d.startswith("XID 48: ") for d in details)  # the DBE that raised it
    assert any(d.startswith("healthy -> ") for d in details)
    assert [r["ts"] for r in timeline] == sorted(r["ts"] for r in timeline)
    node3 = gpu.filter(pl.col("node") == "r01-n03")
    minutes = node3.group_by(pl.col("ts").dt.truncate("1m"), "gpu").agg(pl.col("power_w").mean().round())
    assert len(per_minute) == len(minutes) == 8 * minutes["ts"].n_unique()
    first = minutes.sort("ts", "gpu").row(0, named=True)
    assert (per_minute[0]["gpu"], per_minute[0]["power_w"]) == (first["gpu"], first["power_w"])

    [slowdown] = (rows(capsys, simulated, sql) for sql in qs["The GPUs closest to thermal slowdown this week"])
    margins = (gpu.group_by("node", "gpu").agg((pl.col("slowdown_temp_c") - pl.col("gpu_temp_c")).min().alias("m"))
               .sort("m", "node", "gpu").head(20))
    assert [(r["node"], r["gpu"], r["margin_c"]) for r in slowdown] == list(margins.iter_rows())

    [xids] = (rows(capsys, simulated, sql) for sql in qs["XIDs by code and node"])
    events = scan(archive / "events").collect().filter(pl.col("kind") == "xid")
    assert sorted((r["code"], r["node"], r["xids"]) for r in xids) == sorted(
        events.group_by("code", "node").len().iter_rows())
    assert {r["node"] for r in xids} == {"r01-n01"} and 48 in {r["code"] for r in xids}

    [energy] = (rows(capsys, simulated, sql) for sql in qs["Energy per rack per day"])
    pdu = scan(archive / "facility_samples").collect().filter(
        (pl.col("device_class") == "rack") & (pl.col("metric") == "energy_j"))
    assert [(r["rack"], r["kwh"]) for r in energy] == [("r01", round((pdu["value"].max() - pdu["value"].min()) / 3.6e6, 3))]
    power = scan(archive / "facility_samples").collect().filter(
        (pl.col("device_class") == "rack") & (pl.col("metric") == "power_w"))
    hours = (power["ts"].max() - power["ts"].min()).total_seconds() / 3600.0
    assert energy[0]["kwh"] == pytest.approx(power["value"].mean() / 1000.0 * hours, rel=0.02)

    [top] = (rows(capsys, simulated, sql) for sql in qs["The nodes with the most alerts this week"])
    alerts = scan(archive / "alerts").collect().filter((pl.col("status") == "firing") & pl.col("node").is_not_null())
    assert top and {r["node"]: r["alerts"] for r in top} == dict(alerts.group_by("node").len().iter_rows())


def test_older_files_read_by_column_name(tmp_path: Path, capsys) -> None:
    """gpu_sample v3 files lack power_limit_w; facility_sample v1 files lack device_class,
    which is derived from the device id as the bus derives it."""
    data = known_archive(tmp_path)
    [r] = rows(capsys, data, "select count(*) filter (where power_limit_w is null) as old, count(*) as n "
                             "from gpu_samples")
    assert r["old"] == N and r["n"] > N
    classes = rows(capsys, data, "select device_class, count(*) as n from facility_samples "
                                 "where device = 'meter-main' group by 1")
    assert classes == [{"device_class": "meter", "n": N + 1}]  # v2's half and the bad reading, v1's half


def test_an_empty_archive_has_every_view(tmp_path: Path, capsys) -> None:
    for name, schema in SCHEMAS.items():
        status, out, err = query(capsys, tmp_path, f"select * from {name}", "--format", "csv")
        assert status == 0, err
        assert out.strip().split(",") == [f'"{c}"' for c in [*schema.names, "date", "hour"]]
    status, out, _ = query(capsys, tmp_path, "select count(*) as n from alerts")
    assert status == 0 and out.split() == ["n", "0"]


def test_formats_and_refusals(simulated: Path, tmp_path: Path, capsys) -> None:
    sql = "select node, gpu, max(gpu_temp_c) as hottest from gpu_samples group by all order by node, gpu"
    status, table, _ = query(capsys, simulated, sql)
    assert status == 0 and table.splitlines()[0].split() == ["node", "gpu", "hottest"] and len(table.splitlines()) == 33
    out = tmp_path / "hot.parquet"
    assert query(capsys, simulated, sql, "--format", "parquet", "--out", str(out))[0] == 0
    assert pl.read_parquet(out).to_dicts() == rows(capsys, simulated, sql)
    status, csv, _ = query(capsys, simulated, sql, "--format", "csv")
    assert csv.splitlines()[0] == '"node","gpu","hottest"' and len(csv.splitlines()) == 33

    status, _, err = query(capsys, simulated, "select gpu_temperature from gpu_samples")
    assert status == 2 and "gpu_temperature" in err and "views: gpu_samples, facility_samples" in err
    status, _, err = query(capsys, simulated, "select * from gpus")
    assert status == 2 and "gpus" in err
    status, _, err = query(capsys, simulated, sql, "--format", "parquet")
    assert status == 2 and "give --out FILE" in err
    status, _, err = query(capsys, simulated, sql, "--out", str(tmp_path / "nowhere" / "x.csv"))
    assert status == 2 and "does not exist" in err
    status, _, err = query(capsys, simulated, " ")
    assert status == 2 and "no SQL" in err
    status, _, err = query(capsys, tmp_path / "missing", sql)
    assert status == 2 and "does not exist" in err
