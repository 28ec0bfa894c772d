"""`fleetwatch report` (analytics/report.py): one page that loads nothing from anywhere, every
section there with what the archive says, every chart a real non-blank PNG; the PNG folder;
an empty archive."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from tests.archives import simulated_archive
from tests.conftest import make_config

SECTIONS = ("summary", "timeline", "heat", "power", "coolant", "capacity", "offenders")


def non_blank(png: bytes) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    return pixels.size > 10_000 and float(pixels.std()) > 5.0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Ten minutes of a 32-GPU fleet, an uncorrectable ECC error at 100 s (archives.simulated_archive)."""
    data = tmp_path_factory.mktemp("report") / "data"
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 4, "fault_interval_s": 0.0, "gpu_reset_interval_s": 0.0})
    simulated_archive(data / "archive", cfg, 600, {100: lambda sim: sim.inject("ecc_uncorrectable", gpu=3,
                                                                                duration_s=300)})
    return data


def test_the_page_is_whole_and_says_what_the_archive_says(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.html"
    assert main(["report", "--data-dir", str(data), "--out", str(out)]) == 0
    assert f"{out}" in capsys.readouterr().out
    page = out.read_text()
    assert not re.search(r"(?:src|href)=['\"](?!data:|#)", page)  # nothing loaded from anywhere
    assert "<script" not in page and "http://" not in page and "https://" not in page
    for section in SECTIONS:
        assert f"<section id='{section}'>" in page
    assert "<b>32</b> GPUs on <b>4</b> nodes" in page
    assert "GpuUncorrectableEcc" in page and "r01-n01" in page  # the alert, its node among the failed and offenders
    assert re.search(r"Of <b>1</b> labelled faults, <b>1</b> were alerted on, in \d+ s \(p50\)", page)
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 7 and all(non_blank(base64.b64decode(i)) for i in images)


def test_png_folder(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "charts"
    assert main(["report", "--data-dir", str(data), "--format", "png", "--out", str(out), "--since", "1h"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"{n}.png" for n in ("timeline", "hottest", "margin", "rack_power", "site_power",
                                                  "coolant", "capacity"))
    assert all(non_blank((out / f).read_bytes()) for f in files)


def test_an_empty_archive_gives_a_page_that_says_so(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.html"
    assert main(["report", "--data-dir", str(tmp_path), "--out", str(out)]) == 0
    page = out.read_text()
    assert "no GPU samples in the period" in page and "no PDU or meter readings" in page
    assert "data:image/png" not in page
    assert main(["report", "--data-dir", str(tmp_path), "--out", str(tmp_path / "no" / "r.html")]) == 2
    assert "folder that exists" in capsys.readouterr().err


def test_the_summary_the_timeline_and_the_power_say_what_happened_in_the_period(tmp_path: Path) -> None:
    """Node-hours as reported: a node silent for half the hour had been counted for the whole of it (its
    first and last sample spanned the silence). The timeline: a node that failed and recovered before the
    period had its own empty row. Power: a rack's A and B PDUs and a site's two meters are summed (their
    means had been averaged: the rack at half its power)."""
    from datetime import timedelta

    from pipeline.analytics.query import Archive
    from pipeline.analytics.report import Period, _minutes, _power, _summary, _timeline
    from tests.conftest import make_config
    from pipeline.model import FACILITY_SAMPLE, GPU_SAMPLE, NODE_HEALTH
    from pipeline.sinks.parquet import ArchiveWriter
    from tests.archives import N, T0, batch, gpu_rows
    w = ArchiveWriter(tmp_path / "archive", writer_id="test")
    w.add("gpu_samples", batch(GPU_SAMPLE, gpu_rows("n01", 0, range(N), 0.9, 600, 700)))
    late = gpu_rows("n01", 1, range(N), 0.9, 600, 700)  # (the agent stamps each GPU at its own read: ms apart)
    late["ts"] = [t + timedelta(milliseconds=3) for t in late["ts"]]
    w.add("gpu_samples", batch(GPU_SAMPLE, late))
    w.add("gpu_samples", batch(GPU_SAMPLE, gpu_rows("n02", 0, [*range(90), *range(270, N)], 0.9, 600, 700)))
    w.add("node_health", batch(NODE_HEALTH, {
        "ts": [T0 - timedelta(hours=5), T0 - timedelta(hours=4)], "site": ["s1"] * 2, "rack": ["r01"] * 2,
        "node": ["n09"] * 2, "state": ["failing", "healthy"], "previous": ["healthy", "failing"],
        "reasons": ["GpuFellOffBus", ""]}))
    devices = [("r01", "pdu-r01-a", "rack", 20e3), ("r01", "pdu-r01-b", "rack", 20e3),
               ("", "meter-1", "meter", 100e3), ("", "meter-2", "meter", 50e3)]
    ts = [T0 + timedelta(seconds=10 * k) for k in range(N)]
    w.add("facility_samples", batch(FACILITY_SAMPLE, {
        "ts": ts * len(devices), "site": ["s1"] * N * len(devices),
        "rack": [d[0] for d in devices for _ in ts], "device": [d[1] for d in devices for _ in ts],
        "metric": ["power_w"] * N * len(devices), "value": [d[3] for d in devices for _ in ts],
        "quality": [1] * N * len(devices), "device_class": [d[2] for d in devices for _ in ts]}))
    w.flush()
    con = Archive(tmp_path / "archive").connect()
    p = Period(T0, T0 + timedelta(hours=1))
    try:
        assert "<b>1.5</b> node-hours reported" in _summary(con, p).html
        assert "no alerts and no node health changes in the period" in _timeline(con, p).html
        assert {(m["who"], m["value"]) for m in _minutes(con, p, "rack", "power_w")} == {("r01", 40e3)}
        assert {(m["who"], m["value"]) for m in _minutes(con, p, "meter", "power_w")} == {("s1", 150e3)}
        # the sum against one PDU's rating: what one feed carries when the other fails, said as such
        said = _power(con, p, make_config(fleet={"pdu_rating_w": 50e3})).html
        assert "<b>r01</b> at 40.0 kW (its PDUs summed), 80% of one PDU's 50 kW rating, what one feed carries " \
               "if the other fails." in said
    finally:
        con.close()


def test_a_report_reads_only_what_it_shows_and_scores_a_fault_whose_window_runs_past_its_period(tmp_path, monkeypatch):
    """The report binds the views it reads (a damaged file in `events`, which it never reads, had failed it)
    and the samples of its period's days and of the score window after it (a fault labelled in its last
    minutes, whose window the data after the period covers, had been left out on a period that ends at night)."""
    from datetime import datetime, timezone

    import tests.archives as archives
    from pipeline.analytics.report import build
    monkeypatch.setattr(archives, "T0", datetime(2026, 3, 1, 23, 50, tzinfo=timezone.utc))
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 2, "fault_interval_s": 0.0, "gpu_reset_interval_s": 0.0})
    archives.simulated_archive(tmp_path / "archive", cfg, 1200, {
        420: lambda sim: sim.inject("ecc_uncorrectable", gpu=3, duration_s=120),
        500: lambda sim: sim.inject("hw_power_brake", node=1, duration_s=300)})  # (23:58:20, a 2-minute window)
    cut = tmp_path / "archive" / "events" / "date=2026-03-01" / "hour=23" / "part-cut-000001.parquet"
    cut.parent.mkdir(parents=True, exist_ok=True)
    cut.write_bytes(b"PAR1" + b"x" * 100)
    sections = build(tmp_path / "archive", archives.T0, datetime(2026, 3, 1, 23, 59, 30, tzinfo=timezone.utc), cfg)
    summary = next(s for s in sections if s.id == "summary").html
    assert "Of <b>2</b> labelled faults" in summary, summary
