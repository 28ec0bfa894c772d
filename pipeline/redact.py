"""The one redaction of URLs, for everything a person or a file gets to see: the config
output, logs, error messages and dead letters.

A URL may carry credentials (`user:password@`, sent as HTTP basic auth), tokens in its
query string, or a token as a path segment (Slack's `/services/T.../B.../<token>`, Discord's
`/api/webhooks/<id>/<token>`, a chat's or an incident tool's integration key). Shown
anywhere, it keeps its scheme, host, port and the path's words, and masks the user info,
every query value and each path segment that looks like a token (`is_token`: a run of 12
letters and digits or more that mixes both, or of 20 letters or more a quarter of them upper
case; a word, a CamelCase alert name or a route such as `alertmanager-webhook` or
`archive-2026` is kept, so that receivers and runbooks can still be told apart):
`https://***@hooks.example:8443/services/T0123/B0456/***?token=***`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

MASK = "***"
# Up to the next white space: a quote, < or > may be part of a password or a query value.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_MIN_SECRET = 3  # shorter pieces of a URL are masked inside the URL, but not hunted for in free text
_RUN = re.compile(r"[A-Za-z0-9]+")


def is_token(segment: str) -> bool:
    """A path segment that is a generated token (an integration key, a UUID, base64), not words."""
    for run in _RUN.findall(segment):
        if len(run) >= 12 and not run.isdigit() and not run.isalpha():
            return True
        # Mixed case, as base62 is: a quarter or more of its letters upper case (CamelCase names, such as
        # the runbooks' alert names, have one a word)
        if len(run) >= 20 and sum(c.isupper() for c in run) >= max(1, sum(c.islower() for c in run)) / 3:
            return True
    return False


def _token_segments(path: str) -> list[str]:
    return [seg for seg in path.split("/") if is_token(seg)]


def redact_url(url: str) -> str:
    """`url` with its user info, token-like path segments, query values and fragment masked."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced [ in the host: show nothing of it but the scheme
        return f"{url.partition('://')[0]}://{MASK}" if "://" in url else MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    path = "/".join(MASK if is_token(seg) else seg for seg in parts.path.split("/"))
    out = f"{parts.scheme}://{netloc}{path}" if parts.scheme or netloc else path
    if parts.query:
        out += "?" + "&".join(f"{k}={MASK}" if sep else MASK
                              for k, sep, _ in (item.partition("=") for item in parts.query.split("&")))
    if parts.fragment:
        out += "#" + MASK
    return out


def _secrets_of(url: str) -> list[str]:
    """The pieces of `url` that must not show, raw and percent-decoded, longest first."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    pieces = [parts.query, parts.fragment, *_token_segments(parts.path)]
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        pieces += [userinfo, *userinfo.split(":", 1)]
    pieces += [v for item in parts.query.split("&") for v in item.partition("=")[2:] if v]
    found = {p for piece in pieces for p in (piece, unquote(piece)) if len(p) >= _MIN_SECRET}
    return sorted(found, key=len, reverse=True)


_KNOWN_SECRETS: set[str] = set()  # secrets the process holds (a Kafka SASL password): masked in any text


def hide_secret(secret: str) -> None:
    """Mask `secret` wherever it would show in logs, errors and printed output from now on
    (a second guard: code that holds a secret never prints it)."""
    if len(secret) >= _MIN_SECRET:
        _KNOWN_SECRETS.add(secret)


def redact_text(text: str, *urls: str) -> str:
    """`text` with every URL in it redacted, and any secret piece of `urls` masked wherever it
    shows (an error may quote part of a URL: http.client's InvalidURL quotes the request
    target with its query), and every secret given to hide_secret."""
    for secret in _KNOWN_SECRETS:
        text = text.replace(secret, MASK)
    if "://" in text:
        text = _URL.sub(_redact_match, text)
    for url in urls:
        for secret in _secrets_of(url):
            text = text.replace(secret, MASK)
    return text


def _redact_match(m: re.Match) -> str:
    """A URL found in a text runs to the next white space; punctuation that closes the
    sentence or a quote around it (`'URL':`) is given back after the redaction."""
    url = m.group(0)
    tail = len(url) - len(url.rstrip(_CLOSING))
    return redact_url(url[:len(url) - tail]) + url[len(url) - tail:] if tail else redact_url(url)


_CLOSING = "'\")]}>.,;:!?"

