"""A stand-in for dcgm-exporter: a real HTTP server on a free loopback port that serves
dcgm-exporter's text (a fixture of tests/data/dcgm/, as the exporter writes it), as a node's
GPUs would vary between scrapes: power jitters, energy counts up. Tests and bench/ script what
goes wrong: a new XID, a GPU the exporter stops listing, a slow answer, garbage, an HTTP error,
or the server going away."""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "dcgm"
H100_8GPU = DATA / "h100-8gpu.txt"  # 8 H100s of one HGX node, dcgm-exporter 4.x default counters
A100_ODD = DATA / "a100-k8s-odd.txt"  # an older exporter with pod mapping, escapes, NaN, missing fields

_SAMPLE = re.compile(r'^(?P<name>[A-Z_]+)\{gpu="(?P<gpu>\d+)",(?P<labels>.*)\} (?P<value>\S+)$')
_UUID = re.compile(r'UUID="(GPU-[0-9a-f-]+)"')
_HOST = re.compile(r'Hostname="[^"]*"')


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a scraper that gave up and hung up: fine
        pass


class DcgmExporter:
    """Serves `fixture` under `hostname`, its GPUs' UUIDs made unique by `tag`. `mode`: ok,
    slow (answers after `delay_s`), garbage (an HTML error page with status 200), error (HTTP
    500). `xid[gpu] = code` sets a GPU's last XID, `xid_total[gpu, code]` and `xid_count[gpu, code]`
    serve dcgm-exporter's own XID counters; `hidden` GPUs are left out. `reads_every`: the exporter
    reads the GPUs anew every that many requests (scraped faster than its -c, it serves a reading again)."""

    def __init__(self, fixture: Path = H100_8GPU, hostname: str = "gpu-node-017", tag: int = 0,
                 mode: str = "ok", delay_s: float = 0.0, static: bool = False, reads_every: int = 1) -> None:
        self.mode, self.delay_s, self.static, self.reads_every = mode, delay_s, static, reads_every
        self.xid: dict[int, int] = {}
        self.xid_total: dict[tuple[int, int], int] = {}
        self.xid_count: dict[tuple[int, int], int] = {}
        self.hidden: set[int] = set()
        self.requests = 0
        self.closed = False
        self.connections: set = set()  # open keep-alive connections: closing the server closes them too
        text = fixture.read_text()
        text = _UUID.sub(lambda m: f'UUID="{m.group(1)[:-4]}{tag:04x}"', text)
        text = _HOST.sub(f'Hostname="{hostname}"', text)
        self.uuids = list(dict.fromkeys(_UUID.findall(text)))
        self.lines: list[tuple[str, int, str, str]] = []  # (name, gpu, "NAME{labels}", value); gpu -1: not a sample
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m:
                self.lines.append((m["name"], int(m["gpu"]), line[:line.rindex("}") + 1], m["value"]))
            else:
                self.lines.append(("", -1, line, ""))
        self._body = self.render().encode()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as dcgm-exporter's Go server

            def setup(self) -> None:
                super().setup()
                outer.connections.add(self.connection)

            def finish(self) -> None:
                outer.connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if outer.closed:
                    self.close_connection = True
                    return
                outer.requests += 1
                if outer.mode == "slow":
                    time.sleep(outer.delay_s)
                status, body = 200, outer._body if outer.static else outer.render().encode()
                if outer.mode == "garbage":
                    body = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n"
                elif outer.mode == "error":
                    status, body = 500, b"An error has occurred while serving metrics:\n\nDCGM is not running\n"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def render(self) -> str:
        """The exposition now: power within +-1 W of the fixture's, energy up by 700 J a read."""
        k = (self.requests - 1) // self.reads_every if self.requests else 0
        out = []
        for name, gpu, head, value in self.lines:
            if gpu < 0:
                out.append(head)
                continue
            if gpu in self.hidden:
                continue
            if name == "DCGM_FI_DEV_POWER_USAGE" and value != "NaN":
                value = f"{float(value) + ((k * 7 + gpu * 3) % 20 - 10) / 10:f}"
            elif name == "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION":
                value = str(int(float(value)) + k * 700_000)
            elif name == "DCGM_FI_DEV_XID_ERRORS" and gpu in self.xid:
                value = str(self.xid[gpu])
            out.append(f"{head} {value}")
        labels = {gpu: head[head.index("{"):-1] for name, gpu, head, _ in self.lines if gpu >= 0}
        for name, typ, help_, series in (
                ("DCGM_EXP_XID_ERRORS_TOTAL", "counter", "Total XID errors observed since exporter start.",
                 self.xid_total),
                ("DCGM_EXP_XID_ERRORS_COUNT", "gauge", "XID errors observed during the configured time window.",
                 self.xid_count)):
            if series:
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {typ}"]
                out += [f'{name}{labels[gpu]},xid="{code}"}} {n}' for (gpu, code), n in series.items()
                        if gpu not in self.hidden]
        return "\n".join(out) + "\n"

    def close(self) -> None:
        """Stop serving, as a node that went down: the port refuses connections from now on,
        and open connections are cut."""
        import socket
        self.closed = True
        self.server.shutdown()
        self.server.server_close()
        for c in list(self.connections):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
