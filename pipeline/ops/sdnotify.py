"""systemd's notification protocol (sd_notify(3)), without a dependency: one AF_UNIX datagram
of `KEY=VALUE` lines to the socket in $NOTIFY_SOCKET (a path, or `@name` in the abstract
namespace). deploy/systemd's units are Type=notify with WatchdogSec: the monitor sends
READY=1 once the process is ready, WATCHDOG=1 every `watchdog_interval_s` while it is live,
and STOPPING=1 when it starts to drain. Without $NOTIFY_SOCKET nothing is sent."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("fleetwatch")

WATCHDOG_MAX_S = 15.0  # at least this often, whatever WatchdogSec says (deploy/systemd: 30 s)


class SdNotify:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.enabled = bool(path)
        # systemd asks for a keep-alive twice per WatchdogSec (WATCHDOG_USEC), for this process only.
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval_s = min(WATCHDOG_MAX_S, int(usec) / 2e6) if usec.isdigit() and int(usec) and mine \
            else WATCHDOG_MAX_S
        self._failed = False

    def send(self, *fields: str) -> bool:
        """One notification (fields such as "READY=1"); False when it could not be sent."""
        if not self.enabled:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as e:
            if not self._failed:  # once: a socket that went away says so on every try
                self._failed = True
                log.warning("sd_notify to %s failed (%s); systemd's watchdog may restart this process",
                            self.address.replace("\0", "@"), e)
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")
