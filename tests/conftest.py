"""Shared fixtures: small configs, the CLI as a user runs it, a real HTTP webhook receiver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import settings

from pipeline.config import Config, load_config

# Property tests draw the same examples on every run (a test that fails now and then is a failed CI);
# HYPOTHESIS_PROFILE=explore draws new ones, to look for cases the fixed ones miss.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

REPO = Path(__file__).resolve().parents[1]
H100 = REPO / "pipeline" / "sources" / "recordings" / "h100"  # the recordings that ship with the package
H200 = REPO / "pipeline" / "sources" / "recordings" / "h200"


def make_config(**sections) -> Config:
    """Defaults with overrides, e.g. make_config(fleet={"racks": 1}); ignores FLEETWATCH_* env.
    The simulated fleet is the simple normal's (steady jobs, exact readings, one clock) unless a
    test asks for fleet={"normal": "realistic"} (tests/test_simulate_normal.py): a test of
    something else wants a fleet whose numbers it can predict."""
    return load_config(env={}, overrides={**sections, "fleet": {"normal": "simple", **sections.get("fleet", {})}})


def fleetwatch(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
               **kw) -> subprocess.CompletedProcess:
    """Run the `fleetwatch` command as a user would (same interpreter as the tests)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env, timeout=timeout,
                          capture_output=True, text=True, **kw)


class Receiver:
    """A real HTTP server on a free loopback port that records webhook POSTs."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.payloads.append(json.loads(body))
                outer.headers.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()
