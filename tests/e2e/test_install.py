"""`pip install -e .` gives a `fleetwatch` command and `python -m pipeline`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline import __version__
from tests.conftest import fleetwatch


def test_console_script_and_module_entry_point():
    script = Path(sys.executable).parent / "fleetwatch"
    assert script.exists(), "the fleetwatch command is not installed next to this interpreter"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"fleetwatch {__version__}"
    r = fleetwatch("--help")
    assert r.returncode == 0
    for command in ("run", "eval", "replay", "config"):
        assert command in r.stdout


def test_usage_errors_exit_2():
    r = fleetwatch("run", "--duration", "soon")
    assert r.returncode == 2 and "invalid float value" in r.stderr
    r = fleetwatch("eval")
    assert r.returncode == 2 and "--duration" in r.stderr
