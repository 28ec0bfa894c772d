"""`fleetwatch report`'s page in a real headless Chromium (Debian's `chromium`), driven over
the DevTools protocol: it loads with no console message of level error and no exception, and
a screenshot of each section is non-blank."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from pipeline.cli import main
from tests.archives import simulated_archive
from tests.conftest import make_config
from tests.test_report import SECTIONS, non_blank

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None,
                                reason="needs Debian's chromium (scripts/test installs it as root)")


class DevTools:
    """One page of a headless Chromium, over its DevTools websocket."""

    def __init__(self, ws) -> None:
        self.ws, self.ids, self.events = ws, itertools.count(1), []

    async def call(self, method: str, **params):
        i = next(self.ids)
        await self.ws.send_json({"id": i, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 60)
            if msg.get("id") == i:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    async def until(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(await asyncio.wait_for(self.ws.receive_json(), 60))


async def look(url: str, profile: Path) -> tuple[list[dict], dict[str, bytes]]:
    """(the error-level console messages and exceptions, a screenshot per section id)."""
    proc = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1200,900",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m[1])
                break
        assert port, "chromium did not start its DevTools endpoint"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                page = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                dt = DevTools(ws)
                for domain in ("Page", "Runtime", "Log"):
                    await dt.call(f"{domain}.enable")
                await dt.call("Page.navigate", url=url)
                await dt.until("Page.loadEventFired")
                boxes = json.loads((await dt.call("Runtime.evaluate", returnByValue=True, expression="""
                    JSON.stringify([...document.querySelectorAll('section')].map(s => {
                        const r = s.getBoundingClientRect();
                        return {id: s.id, x: r.x, y: r.y + window.scrollY, width: r.width, height: r.height};
                    }))"""))["result"]["value"])
                shots = {}
                for b in boxes:
                    clip = {k: b[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
                    shot = await dt.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
                    shots[b["id"]] = base64.b64decode(shot["data"])
                errors = [e for e in dt.events
                          if e.get("method") == "Runtime.exceptionThrown"
                          or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
                          or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
                return errors, shots
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_the_report_in_a_real_browser(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    cfg = make_config(fleet={"racks": 1, "nodes_per_rack": 4, "fault_interval_s": 120.0, "gpu_reset_interval_s": 0.0})
    simulated_archive(data / "archive", cfg, 600)
    page = tmp_path / "report.html"
    assert main(["report", "--data-dir", str(data), "--out", str(page)]) == 0
    errors, shots = asyncio.run(look(page.as_uri(), tmp_path / "profile"))
    assert errors == []
    assert list(shots) == list(SECTIONS)
    for section, png in shots.items():
        assert non_blank(png), section
