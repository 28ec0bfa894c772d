"""Watching the watcher: how one Fleetwatch process shows its own state (docs/operations.md).

    progress.py    what each role produced and read, counted at the emit and the intake gate
    health.py      live, ready, stalled: judged on an injected clock
    metrics.py     the Prometheus metrics, collected at scrape time from what the roles count
    http.py        /metrics, /healthz, /readyz (aiohttp, on the daemon's event loop)
    selfalerts.py  FleetwatchWatchdog and FleetwatchStalled, as alert state changes
    sdnotify.py    systemd's READY=1, WATCHDOG=1, STOPPING=1
    monitor.py     `Operations`: ties them to the daemon, one check a second

Importing this package is cheap (roles/context.py imports progress.py): the HTTP server and
prometheus_client are imported by the modules that use them.
"""
