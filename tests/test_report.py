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
