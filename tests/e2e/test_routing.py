"""End-to-end: a silence added by the `fleetwatch` command (moved from tests/test_routing.py)."""

from __future__ import annotations

import time

from pipeline.sinks.silences import silence_store
from tests.conftest import fleetwatch
from tests.test_routing import WAIT, alert, router, sent


def test_a_silence_added_by_the_cli_reaches_a_running_router(tmp_path):
    store = silence_store(tmp_path)
    r = router(store)
    hot = alert("GpuOverTemperature", "r03", "r03-n07")
    t0 = time.time()  # the CLI's silence starts at the real now
    r.add([hot], t0)
    p = fleetwatch("silence", "add", "-m", "alertname=~GpuOver.*", "-m", "node=r03-n07", "--duration", "2h",
                   "--comment", "fan swap", "--author", "ana", "--data-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    sid = p.stdout.split()[1]
    assert p.stdout.startswith(f"silence {sid} added: mutes alertname=~GpuOver.*, node=r03-n07 until ")
    assert store.refresh()  # (the notifier re-reads the file before each due(), off the event loop)
    assert r.due(t0 + WAIT) == []
    assert r.muted(hot, t0 + WAIT) == f"silenced by {sid}"
    p = fleetwatch("silence", "expire", sid[:8], "--data-dir", str(tmp_path))
    assert (p.returncode, p.stdout) == (0, f"silence {sid} expired\n"), p.stderr
    assert store.refresh()
    assert sent(r.due(time.time() + WAIT)) == [("firing", "r03-n07")]
