"""End-to-end: a clone, a wheel and scripts/kafka-local on their own (moved from
tests/test_clone_alone.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from pipeline.detect.catalog import ALERTS
from tests.conftest import H100, REPO, fleetwatch
from tests.test_clone_alone import _tracked


@pytest.mark.slow
def test_a_clone_with_nothing_beside_it_replays_the_shipped_h100_and_collects_its_tests(tmp_path):
    """The repository's files alone, in a folder with nothing beside it: the README's
    replay command runs, and pytest collects every test (no file outside is read)."""
    clone = tmp_path / "lonely" / "fleetwatch"
    for f in _tracked("."):
        if ".git" not in f.parts:
            (clone / f.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, clone / f.relative_to(REPO))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}, "PYTHONPATH": str(clone),
           "FLEETWATCH_AGENT__INTERVAL_S": "0.25"}
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", "--replay", "h100", "--duration", "3",
                        "--data-dir", "data"], cwd=clone, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replaying h100" in r.stderr
    assert list((clone / "data" / "archive" / "gpu_samples").rglob("*.parquet"))
    c = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=clone,
                       env=env, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-2000:]
    assert re.search(r"^\d+ tests collected", c.stdout, re.M), c.stdout[-500:]


def test_replay_by_directory_still_works_and_a_wrong_one_is_a_config_error(tmp_path):
    r = fleetwatch("run", "--replay", str(tmp_path / "nowhere"), "--duration", "1", "--data-dir", "d", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "agent.replay" in r.stderr and "h100" in r.stderr and "h100_inventory.json" in r.stderr
    copy = tmp_path / "my-recording"
    shutil.copytree(H100, copy)
    r = fleetwatch("run", "--replay", str(copy), "--duration", "1.5", "--data-dir", "d", cwd=tmp_path,
                   env={"FLEETWATCH_AGENT__INTERVAL_S": "0.25"}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "d" / "archive" / "gpu_samples").rglob("*.parquet"))


@pytest.mark.slow
def test_the_wheel_carries_every_module_the_recording_the_runbooks_and_the_schemas(tmp_path):
    """Built as pip builds it; installed into a bare folder, its runbook URLs open."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("fleetwatch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {str(p.relative_to(REPO)) for p in (REPO / "pipeline").rglob("*.py")}
    want |= {f"pipeline/runbooks/{p.name}" for p in (REPO / "runbooks").glob("*.md")}
    want |= {f"pipeline/schemas/{p.name}" for p in (REPO / "schemas").iterdir()}
    want |= {str(p.relative_to(REPO)) for p in H100.parent.glob("*/*")  # every shipped recording (h100, h200)
             if "__pycache__" not in p.parts}
    assert want - names == set()
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from pipeline.detect.catalog import ALERTS, runbook_url; from pipeline.resources import schemas_dir; "
            "print(runbook_url('', ALERTS[0].name)); print(len(list(schemas_dir().glob('*.json'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(site.as_uri() + "/pipeline/runbooks/")
    assert urllib.request.urlopen(out[0]).read().startswith(b"# " + ALERTS[0].name.encode())
    assert int(out[1]) == len(list((REPO / "schemas").glob("*.json")))


def test_kafka_local_works_before_the_venv_exists(tmp_path):
    """`scripts/kafka-local fetch` in a checkout where `.venv` does not exist yet: it
    runs on the system's python3 (the standard library is all it needs)."""
    for folder in ("scripts", "tests", "pipeline"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    python3 = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    assert python3 is not None
    env = {"PATH": f"{Path(python3).parent}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", str(tmp_path))}
    r = subprocess.run(["bash", "scripts/kafka-local", "fetch"], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "kafka jars in" in r.stdout
