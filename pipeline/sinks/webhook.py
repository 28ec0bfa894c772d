"""Receivers over HTTP: who they are (validated at start), how a request is signed,
and one POST with its outcome: what every receiver kind shares. What each kind sends
is in pipeline/sinks/receivers/ (the webhook kind, Alertmanager's v4 payload; the
alertmanager kind, API v2 pushes).

A receiver's URL may carry credentials (user:password@, sent as HTTP basic auth) or
a token in its query string: neither is ever logged or written anywhere. Logs show
`Receiver.shown` (pipeline/redact.py): scheme://***@host[:port]/path/***?key=***. A bearer token
(`bearer_token_env`, or `bearer_token_file` read at every request) and a client certificate
for mutual TLS (`cert_file`, `key_file`, read again when they change) are the other ways in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import SplitResult, unquote, urlsplit

from pipeline import __version__
from pipeline.config import AlertsConfig, ConfigError, ReceiverConfig, read_secret
from pipeline.redact import hide_secret, redact_text, redact_url
from pipeline.sinks.receivers import receiver_kind
from pipeline.tls import ClientCert, ca_context

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Fleetwatch-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_NAME = re.compile(r"[a-z0-9_-]+")
_RESPONSE_LIMIT = 1 << 16  # bytes of a response body read (the rest is not wanted)


@dataclass(frozen=True)
class Bearer:
    """A bearer token: the environment's (read at start), or a file's, read at every request as
    Prometheus reads its credentials_file, so that a rotated token (a Kubernetes projected
    service-account token lives an hour) is taken without a restart."""
    token: bytes | None = field(default=None, repr=False)
    file: str = ""

    def header(self) -> str:
        """The Authorization value; OSError where the file cannot give a token now."""
        token = self.token if self.token is not None else Path(self.file).read_bytes().strip()
        if not token:
            raise OSError("the file is empty")
        if not _TOKEN.fullmatch(token):
            raise OSError("the token holds a space, a control or a non-ASCII character")
        hide_secret(token.decode())  # a receiver's answer may quote it back: never in a log or dead letter
        return "Bearer " + token.decode()


_TOKEN = re.compile(rb"[\x21-\x7e]+")  # what an HTTP header can carry as one token


@dataclass(frozen=True)
class Receiver:
    """A validated receiver: everything delivery needs, secrets kept out of repr."""
    name: str
    kind: str                 # a key of RECEIVER_KINDS (pipeline/sinks/receivers): webhook | alertmanager
    url: str = field(repr=False)  # as configured (may hold credentials)
    shown: str                # redacted, for logs
    secret: bytes | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    bearer: Bearer | None = field(default=None, repr=False)
    client_cert: ClientCert | None = None

    @property
    def post_url(self) -> str:
        """Where its requests go: the url, or where its kind says (alertmanager: <url>/api/v2/alerts)."""
        return receiver_kind(self.kind).post_url(self.url)


def load_receivers(cfg: AlertsConfig, env: Mapping[str, str] | None = None, warn: bool = True) -> list[Receiver]:
    """[[alerts.receivers]] plus the alerts.webhooks shorthand, checked; ConfigError says
    which key is wrong and what to do. warn=False: no warnings (a check before the start)."""
    env = os.environ if env is None else env
    configs = [(f"alerts.receivers[{i}]", r) for i, r in enumerate(cfg.receivers)]
    configs += [(f"alerts.webhooks[{i}]", ReceiverConfig(name=f"webhook-{i + 1}", url=u))
                for i, u in enumerate(cfg.webhooks)]
    seen: dict[str, str] = {}
    out = []
    for where, rc in configs:
        shorthand = where.startswith("alerts.webhooks")
        if not shorthand and not _NAME.fullmatch(rc.name):
            raise ConfigError(f"config error: {where}.name = {rc.name!r}: must match [a-z0-9_-]+ (it names the "
                              f"receiver's outbox folder), e.g. name = \"oncall\"")
        if rc.name in seen:
            raise ConfigError(f"config error: {where}.name = {rc.name!r}: {seen[rc.name]} has that name already; "
                              f"give each receiver its own name (alerts.webhooks entries are webhook-1, webhook-2, "
                              f"...)")
        seen[rc.name] = where
        parts = check_url(where if shorthand else f"{where}.url", rc.url)
        secret = _secret(where, rc, env)
        if secret is not None:  # (a receiver may quote what it was sent: masked wherever it would show)
            hide_secret(secret.decode(errors="replace"))
        bearer = _bearer(where, rc, parts, env)
        if bearer is not None and parts.scheme == "http" and warn:
            log.warning("receiver %s (%s): its bearer token goes over plain http: anyone on the path can read it",
                        rc.name, redact_url(rc.url))
        if rc.ca_file and not Path(rc.ca_file).is_file():
            raise ConfigError(f"config error: {where}.ca_file = {rc.ca_file!r}: no such file; give the path of a "
                              f"PEM CA bundle, or leave it empty for the system's")
        if (rc.cert_file or rc.key_file) and parts.scheme != "https":
            raise ConfigError(f"config error: {where}.cert_file: a client certificate is for mutual TLS, and "
                              f"{where}.url is not https://; give an https:// URL, or remove cert_file and key_file")
        if rc.key_file and not rc.cert_file:
            raise ConfigError(f"config error: {where}.key_file = {rc.key_file!r} without cert_file; give the client "
                              f"certificate in cert_file")
        context = client_cert = None
        if parts.scheme == "https":
            def tls_context(rc: ReceiverConfig = rc, key: str = f"{where}.ca_file") -> ssl.SSLContext:
                made = ca_context(key, rc.ca_file)
                if not rc.tls_verify:
                    made.check_hostname = False
                    made.verify_mode = ssl.CERT_NONE
                return made
            context = tls_context()
            if rc.cert_file:
                client_cert = ClientCert(rc.cert_file, rc.key_file, tls_context)
                try:
                    client_cert.load()
                except (ssl.SSLError, OSError, ValueError) as e:
                    raise ConfigError(f"config error: {where}.cert_file = {rc.cert_file!r}, key_file = "
                                      f"{rc.key_file!r}: not a usable client certificate and key "
                                      f"({getattr(e, 'strerror', None) or e}); give PEM files (the key in "
                                      f"key_file, or in cert_file after the certificate)") from None
                context = None  # (the certificate's own context, made again when it is renewed)
            if not rc.tls_verify:
                if warn:
                    log.warning("receiver %s (%s): TLS certificate verification is off (tls_verify = false): "
                                "anyone on the path can read and change its alerts", rc.name, redact_url(rc.url))
        out.append(Receiver(rc.name, rc.kind, rc.url, redact_url(rc.url), secret, context, bearer, client_cert))
    return out


_NOT_IN_URL = re.compile(r"[\x00-\x20\x7f]|[^\x00-\x7f]")  # what http.client refuses to send, at start instead


def check_url(key: str, url: str) -> SplitResult:
    """An http(s) URL with a host, a valid port and nothing that must be percent-encoded;
    ConfigError naming the key and the redacted URL otherwise."""
    shown = redact_url(url)
    bad = _NOT_IN_URL.search(url)
    if bad:
        what = {" ": "a space", "\t": "a tab", "\n": "a line break", "\r": "a line break"}.get(
            bad.group(), "a control character" if bad.group() < "\x80" else "a non-ASCII character")
        raise ConfigError(f"config error: {key} = {shown!r}: has {what} at character {bad.start() + 1}; "
                          f"percent-encode it (a space is %20), or remove it if it came with a copy and paste")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced [ of an IPv6 host
        raise ConfigError(f"config error: {key} = {shown!r}: not a valid URL") from None
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"config error: {key} = {shown!r}: the port is not a number from 1 to 65535")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"config error: {key} = {shown!r}: must be an http:// or https:// URL "
                          f"with a host, e.g. https://hooks.example.com/fleetwatch")
    return parts


def _bearer(where: str, rc: ReceiverConfig, parts: SplitResult, env: Mapping[str, str]) -> Bearer | None:
    token = read_secret(f"{where}.bearer_token", rc.bearer_token_env, rc.bearer_token_file, "the bearer token",
                        "remove bearer_token_env to send none", env)
    if token is None:
        return None
    if parts.username is not None:
        raise ConfigError(f"config error: {where}: both a bearer token and a user in the URL (basic auth): a request "
                          f"carries one Authorization header; keep one of them")
    bearer = Bearer(token if rc.bearer_token_env else None, "" if rc.bearer_token_env else rc.bearer_token_file)
    try:
        bearer.header()
    except OSError as e:
        key = "bearer_token_env" if rc.bearer_token_env else "bearer_token_file"
        raise ConfigError(f"config error: {where}.{key}: {e}; give the token alone") from None
    return bearer


def _secret(where: str, rc: ReceiverConfig, env: Mapping[str, str]) -> bytes | None:
    return read_secret(f"{where}.secret", rc.secret_env, rc.secret_file, "the signing secret",
                       "remove secret_env to send unsigned", env)


# ---- signing --------------------------------------------------------------------------

def sign(secret: bytes, body: bytes, t: int) -> str:
    """The X-Fleetwatch-Signature value: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>."""
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(secret: bytes, header: str, body: bytes, now: float, tolerance_s: float = 300) -> bool:
    """For receivers: the body is what Fleetwatch signed with `secret`, within tolerance_s
    of `now` (an old request replayed fails). Any one v1 may match (several during a
    secret rotation)."""
    t, macs = None, []
    for item in header.split(","):
        k, _, v = item.strip().partition("=")
        if k == "t" and v.isdigit():
            t = int(v)
        elif k == "v1":
            macs.append(v)
    if t is None or not macs or abs(now - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, m) for m in macs)


# ---- one request ------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""            # what went wrong, for logs and dead letters (never the URL's secrets)
    permanent: bool = False     # retrying cannot help (a 4xx other than 408 and 429)
    maybe_delivered: bool = False  # the receiver may have the request (a timeout after sending it)
    retry_after_s: float | None = None  # the receiver's Retry-After


class Client:
    """POSTs to one receiver over one kept-alive connection; used by one thread at a time,
    while abort() may come from another (shutdown)."""

    def __init__(self, receiver: Receiver, timeout_s: float) -> None:
        self.receiver = receiver
        self.timeout_s = timeout_s
        parts = urlsplit(receiver.post_url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._auth = None
        if parts.username is not None:
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._auth = "Basic " + base64.b64encode(cred).decode()
            hide_secret(self._auth.removeprefix("Basic "))  # (a receiver may quote the header back)
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._aborted = False
        self._try: threading.Event | None = None  # the try in flight's deadline event, and its socket
        self._sock: socket.socket | None = None

    def post(self, body: bytes, key: str, now: float) -> Outcome:
        headers = {"Content-Type": "application/json", "User-Agent": f"fleetwatch/{__version__}",
                   IDEMPOTENCY_HEADER: key}
        if self.receiver.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.receiver.secret, body, int(now))  # fresh t on every try
        if self._auth is not None:
            headers["Authorization"] = self._auth
        if self.receiver.bearer is not None:
            try:
                headers["Authorization"] = self.receiver.bearer.header()
            except OSError as e:  # a token file rotated away for a moment: the next try reads it again
                return Outcome(False, f"cannot read the bearer token file {self.receiver.bearer.file!r} "
                                      f"({getattr(e, 'strerror', None) or e}); check bearer_token_file")
        return self._send(body, headers, stale_retry=True)

    def _send(self, body: bytes, headers: dict[str, str], stale_retry: bool) -> Outcome:
        if self._aborted:
            return Outcome(False, "stopped (shutdown)")
        conn, reused = self._connection()
        # alerts.timeout_s bounds the whole request: the socket's timeout bounds each read only, and a proxy
        # that trickles its answer a byte a second had held the receiver's queue for as long as it liked.
        cut = threading.Event()
        with self._lock:
            self._try, self._sock = cut, None  # (this try's: a late timer of the last try cuts nothing of it)
        deadline = threading.Timer(self.timeout_s, self._cut, args=(conn, cut))
        deadline.daemon = True
        deadline.start()
        try:
            outcome = self._exchange(conn, reused, body, headers, stale_retry, cut)
        finally:
            deadline.cancel()
        if cut.is_set():  # cut at the deadline, whatever the read then raised
            self.close()
            return Outcome(False, f"no whole response within {self.timeout_s:g} s (alerts.timeout_s)",
                           maybe_delivered=True)
        return outcome

    def _cut(self, conn: http.client.HTTPConnection, cut: threading.Event) -> None:
        """(The deadline's thread) the request on `conn` is over time: its socket is shut, if it is still the
        one in use (a stale connection given up for a new one has nothing to cut)."""
        with self._lock:
            # (the socket the request went out on: an answer with `Connection: close` takes it from the
            # connection, whose own is None by then)
            sock = self._sock or conn.sock if conn is self._conn and cut is self._try else None
            if sock is None:
                return
            cut.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _exchange(self, conn: http.client.HTTPConnection, reused: bool, body: bytes, headers: dict[str, str],
                  stale_retry: bool, cut: threading.Event) -> Outcome:
        try:
            conn.request("POST", self._target, body, headers)
            with self._lock:
                self._sock = conn.sock
            resp = conn.getresponse()
            text = resp.read(_RESPONSE_LIMIT)
            if not resp.isclosed():  # more than we read: this connection cannot be reused
                self.close()
            outcome = _outcome(resp, text)  # the receiver's answer may quote the URL it was sent to
            return replace(outcome, reason=redact_text(outcome.reason, self.receiver.url))
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
            self.close()
            if reused and stale_retry and not cut.is_set():  # a kept-alive connection the receiver had closed:
                return self._send(body, headers, stale_retry=False)     # once more, on a new one
            return Outcome(False, f"connection closed by the receiver ({type(e).__name__})", maybe_delivered=True)
        except TimeoutError:
            self.close()
            return Outcome(False, f"no response within {self.timeout_s:g} s (alerts.timeout_s)", maybe_delivered=True)
        except ssl.SSLCertVerificationError as e:
            self.close()
            return Outcome(False, f"TLS certificate not trusted ({e.verify_message}); give its CA in ca_file")
        except ssl.SSLError as e:
            self.close()
            if reused and stale_retry and not cut.is_set():  # a kept-alive connection the receiver had closed:
                return self._send(body, headers, stale_retry=False)     # once more, on a new one
            said = f"TLS failed ({type(e).__name__}: {e.reason or e})"
            # TLS 1.3: a server that refuses the client's certificate says so after the handshake, or
            # only cuts the connection (Go's: an EOF); either way it took no request.
            if isinstance(e, ssl.SSLEOFError) or any(a in str(e.reason) for a in _CERTIFICATE_ALERTS):
                mine = "the client certificate in cert_file is" if self.receiver.client_cert else \
                    "no client certificate is"
                return Outcome(False, f"{said}; {mine} sent: where the receiver asks for one, give one that its CA "
                                      f"signed in cert_file and key_file")
            return Outcome(False, said, maybe_delivered=True)
        except ConnectionRefusedError:
            self.close()
            return Outcome(False, "connection refused")
        except socket.gaierror as e:
            self.close()
            return Outcome(False, f"cannot resolve {self._host} ({e.strerror})")
        except (OSError, http.client.HTTPException) as e:
            self.close()  # the message may quote the URL (InvalidURL does): it goes to logs and dead letters
            return Outcome(False, redact_text(f"{type(e).__name__}: {e}", self.receiver.url), maybe_delivered=True)

    def abort(self) -> None:
        """Break off a request in flight (from another thread), so shutdown need not wait for it."""
        with self._lock:
            self._aborted = True
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._conn is not None and self._conn.sock is not None:
                return self._conn, True
            if self._https:
                context, cert = self.receiver.ssl_context, self.receiver.client_cert
                if cert is not None:
                    cert.refresh(f"receiver {self.receiver.name}")
                    context = cert.context
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s,
                                                         context=context)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
            return self._conn, False


_CERTIFICATE_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN",
                       "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED", "ACCESS_DENIED")


def _outcome(resp: http.client.HTTPResponse, text: bytes) -> Outcome:
    status = resp.status
    if 200 <= status < 300:
        return Outcome(True)
    said = text[:200].decode("utf-8", "replace").strip()
    reason = f"HTTP {status} {resp.reason}" + (f": {said}" if said else "")
    if status in (401, 403):  # credentials an operator fixes: kept and retried until alerts.max_age_s
        return Outcome(False, f"{reason}; check the receiver's credentials (the URL's user, bearer_token_env or "
                              f"_file, cert_file)")
    if status in (408, 429) or status >= 500:
        retry_after = resp.headers.get("Retry-After", "")
        return Outcome(False, reason, retry_after_s=float(retry_after) if retry_after.isdigit() else None)
    if 300 <= status < 400:
        return Outcome(False, f"HTTP {status}: redirects are not followed; set the receiver's url to where it "
                              f"points", permanent=True)
    return Outcome(False, reason, permanent=True)


# ---- shared by the receiver kinds' payloads -----------------------------------------

def generator_url(external_url: str, fp: str) -> str:
    """Where the alert comes from: <alerts.external_url>/alerts/<fingerprint>, or ''."""
    return f"{external_url.rstrip('/')}/alerts/{fp}" if external_url else ""


def body_of(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()
