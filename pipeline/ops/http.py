"""The process's HTTP endpoints (docs/operations.md, Endpoints), served by aiohttp on the
daemon's event loop: a scrape collects between two steps of the roles, never beside them.

    /metrics   Prometheus text (or OpenMetrics, as the scraper asks), from the process's registry
    /healthz   200 while the process is live, 503 and why otherwise (ops/health.py)
    /readyz    200 once it is ready, 503 and why otherwise

and what the process's roles add (`routes`: (method, path) -> an async handler that takes
the request's body and returns (status, a JSON-able value)), e.g. the power role's
`POST /power/requests`. They are looked up when a request arrives: the server starts
before the roles are built.

A route a role adds (a power request caps GPUs; its listing names the site's load and jobs)
needs `Authorization: Bearer TOKEN` when daemon.http_token_env or daemon.http_token_file
names a token (401 otherwise); with none set it is taken only from this host (403 from
any other), since /metrics is commonly served on 0.0.0.0 for Prometheus.

A slow client holds nothing for long: a connection that has not sent a whole request's
headers within `idle_s` is closed (aiohttp >= 3.14.4 does so at its keep-alive timeout,
which is also how long an idle connection is kept: Prometheus keeps its own between
scrapes), and a body not read within BODY_DEADLINE_S is a 408.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from pipeline.config import ConfigError, host_port

log = logging.getLogger("fleetwatch")

BODY_DEADLINE_S = 10.0  # a route's body (a power request: a few hundred bytes) arrives well within it
IDLE_S = 75.0  # aiohttp's own default: over any scrape interval, so Prometheus's connections are kept
INDEX = "Fleetwatch: /metrics (Prometheus), /healthz (alive, loops turning), /readyz (ready)\n"
Route = Callable[[bytes], Awaitable[tuple[int, Any]]]  # body -> (status, JSON)


class HttpServer:
    """`live()` and `ready()` return what is wrong (an empty list: all is well)."""

    def __init__(self, address: str, registry: CollectorRegistry, live: Callable[[], list[str]],
                 ready: Callable[[], list[str]], token: bytes | None = None, idle_s: float = IDLE_S,
                 body_deadline_s: float = BODY_DEADLINE_S) -> None:
        self.address, self._token = address, token
        self._idle_s, self._body_deadline_s = idle_s, body_deadline_s
        self._refused_from: set[str] = set()  # peers whose refused change was logged (once each)
        self.host, self.port = host_port("daemon.http", address, 9410)
        self.registry, self.live, self.ready = registry, live, ready
        self.routes: dict[tuple[str, str], Route] = {}  # the roles' (ops/monitor.py attach: the context's)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_route("*", "/{path:.+}", self._routed)  # last: the fixed paths above come first
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=self._idle_s)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(f"config error: daemon.http = {self.address!r}: cannot listen there ({e.strerror or e}); "
                              f"give a free HOST:PORT with --http") from None
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _index(self, request: web.Request) -> web.Response:
        extra = sorted({path for _, path in self.routes})
        return web.Response(text=INDEX + "".join(f"{path}\n" for path in extra))

    async def _routed(self, request: web.Request) -> web.Response:
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            allowed = sorted(m for m, p in self.routes if p == request.path)
            if allowed:
                return web.json_response({"error": f"{request.method} {request.path}: use {', '.join(allowed)}"},
                                         status=405, headers={"Allow": ", ".join(allowed)})
            raise web.HTTPNotFound(text=f"{request.path}: not served here; see / for what is\n")
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            async with asyncio.timeout(self._body_deadline_s):
                body = await request.read()
        except TimeoutError:
            return web.json_response({"error": f"the body did not arrive within {self._body_deadline_s:g} s"},
                                     status=408, headers={"Connection": "close"})
        status, value = await handler(body)
        return web.json_response(value, status=status, dumps=lambda v: json.dumps(v, default=str))

    def _refused(self, request: web.Request) -> web.Response | None:
        """Why a role's route is not served to this request (None: it is)."""
        what, peer = f"{request.method} {request.path}", request.remote or "?"
        if self._token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
                return None
            status, why = 401, (f"{what} needs `Authorization: Bearer TOKEN`, the token in daemon.http_token_env or "
                                f"daemon.http_token_file" + ("; the one given is not it" if given else ""))
        else:
            try:
                if ipaddress.ip_address(peer.split("%")[0]).is_loopback:
                    return None
            except ValueError:
                pass  # (a Unix socket or an unknown peer: not this host's loopback)
            status, why = 403, (f"{what} from {peer}: refused; without a token (daemon.http_token_env or "
                                f"daemon.http_token_file) it is served only to this host")
        if peer not in self._refused_from and len(self._refused_from) < 1024:
            self._refused_from.add(peer)
            log.warning("http: %s", why)
        return web.json_response({"error": why}, status=status,
                                 headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _verdict(self.live(), "alive")

    async def _readyz(self, request: web.Request) -> web.Response:
        return _verdict(self.ready(), "ready")


def _verdict(problems: list[str], ok: str) -> web.Response:
    if not problems:
        return web.Response(text=f"{ok}\n")
    return web.Response(status=503, text="".join(f"{p}\n" for p in problems))
