"""Secrets stay secret: receiver URLs' credentials and tokens never show in the config
output, logs, errors or dead letters; other FLEETWATCH_* variables are not configuration;
URLs are checked strictly at start.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_secrets.py."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.redact import redact_text, redact_url
from pipeline.sinks.webhook import Client, Receiver

PASSWORD, TOKEN, OTHER = "pw-Qz7-s3cr3t", "tok-Hk4-s3cr3t", "sig-Lm2-s3cr3t"


def test_only_sections_keys_and_top_level_names_are_configuration():
    cfg = load_config(env={"FLEETWATCH_ONCALL_SECRET": OTHER, "FLEETWATCH_HOME": "/x", "FLEETWATCH_ONCALL__TOKEN": "t",
                           "FLEETWATCH_FLEET__RACKS": "2", "FLEETWATCH_DATA_DIR": "/srv/fw"})
    assert cfg.fleet.racks == 2 and cfg.data_dir == "/srv/fw"
    with pytest.raises(ConfigError, match=r"environment variable FLEETWATCH_FLEET__RACKZ: unknown key "
                                          r"'fleet.rackz'; known keys of \[fleet\]: .*racks"):
        load_config(env={"FLEETWATCH_FLEET__RACKZ": "2"})


def test_redaction_masks_user_info_query_values_and_fragments():
    url = f"https://hookuser:{PASSWORD}@hooks.example:8443/fw/x?token={TOKEN}&team=gpu#frag"
    assert redact_url(url) == "https://***@hooks.example:8443/fw/x?token=***&team=***#***"
    assert redact_url("http://[::1]:9/x?k=v") == "http://[::1]:9/x?k=***"
    assert redact_url("http://[broken/x?k=v") == "http://***"
    assert redact_url("https://hooks.example/plain") == "https://hooks.example/plain"
    # An error quoting only the request target (http.client's InvalidURL does) loses the
    # secret pieces of the URL it came from; URLs anywhere in a text are redacted.
    said = f"InvalidURL: URL can't contain control characters. '/fw/x?token={TOKEN}&team=gpu' (found ' ')"
    assert TOKEN not in redact_text(said, url) and PASSWORD not in redact_text(said, url)
    assert redact_text(f"posting to {url} failed") == \
        "posting to https://***@hooks.example:8443/fw/x?token=***&team=***#*** failed"


class _Echo(BaseHTTPRequestHandler):
    """A receiver that refuses each request, quoting the URL it was sent (some do), or with a 401
    the credentials it was sent (some do that too)."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        body = f"no such hook: http://{self.headers['Host']}{self.path}".encode()
        status = 404
        if self.path == "/auth":
            body, status = f"invalid credentials: {self.headers['Authorization']}".encode(), 401
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def echo():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_failure_reasons_for_logs_and_dead_letters_hold_no_secret(echo):
    """What a failed try says (logged, and written to the dead letter) keeps the URL's secrets
    out: a receiver's answer quoting the URL, and http.client refusing a URL it cannot send."""
    url = f"http://hookuser:{PASSWORD}@{echo}/hook?token={TOKEN}"
    answer = Client(Receiver("oncall", "webhook", url, redact_url(url)), 5).post(b"{}", "k1", 0)
    assert not answer.ok and answer.permanent and "HTTP 404" in answer.reason
    assert "/hook?token=***" in answer.reason and TOKEN not in answer.reason
    spaced = f"http://{echo}/hook?token={TOKEN} x"  # a URL no start would accept, sent anyway
    refused = Client(Receiver("oncall", "webhook", spaced, redact_url(spaced)), 5).post(b"{}", "k2", 0)
    assert not refused.ok and "InvalidURL" in refused.reason and TOKEN not in refused.reason


def test_a_bearer_token_or_signing_secret_a_receiver_quotes_back_is_masked(echo, tmp_path):
    from pipeline.sinks.webhook import load_receivers
    from tests.conftest import make_config
    bearer, signing = "tok-Bq9-s3cr3t", "sig-Wx5-s3cr3t"
    (tmp_path / "token").write_text(bearer)
    [r] = load_receivers(make_config(alerts={"receivers": [
        {"name": "oncall", "url": f"http://{echo}/auth", "bearer_token_file": str(tmp_path / "token"),
         "secret_env": "FW_SIGNING"}]}).alerts, {"FW_SIGNING": signing})
    refused = Client(r, 5).post(signing.encode(), "k1", 0)
    assert not refused.ok and "HTTP 401" in refused.reason and "invalid credentials: Bearer ***" in refused.reason
    assert bearer not in refused.reason and redact_text(f"quoted {signing}") == "quoted ***"
    url = f"http://hookuser:{PASSWORD}@{echo}/auth"  # basic auth: its header is the user and password in base64
    basic = Client(Receiver("oncall", "webhook", url, redact_url(url)), 5).post(b"{}", "k2", 0)
    assert "invalid credentials: Basic ***" in basic.reason


def test_a_token_in_a_webhook_urls_path_is_masked_and_its_words_are_kept():
    """Slack's, Discord's, Teams' and PagerDuty's webhook URLs carry their secret in the path:
    it had been shown in the config output, the logs and every error quoting the URL."""
    slack = "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/abcdEFGH1234ijklMNOP5678"
    assert redact_url(slack) == "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/***"
    assert redact_url("https://discord.com/api/webhooks/123456789012345678/Xy-Zt_Ab9c8D7e6F5g4H3i2J1k0LmNoPqRs") == \
        "https://discord.com/api/webhooks/123456789012345678/***"
    assert redact_url("https://events.example/integration/0123456789abcdef0123456789abcdef/enqueue") == \
        "https://events.example/integration/***/enqueue"
    assert redact_url("https://hooks.example/t/AbcDefGhiJklMnoPqrStuVwx") == "https://hooks.example/t/***"
    for kept in ("http://alertmanager-0.alertmanager:9093/api/v2/alerts", "s3://fleetwatch-archive-2026/site-a",
                 "https://x.example/fleetwatch-alertmanager-webhook-receiver/v1",
                 "https://runbooks.example/runbooks/FleetwatchArchiveFailing.md"):  # a runbook: an alert's name
        assert redact_url(kept) == kept
    said = "404 for /services/T0123ABCD/B0456EFGH/abcdEFGH1234ijklMNOP5678: no_team"
    assert "abcdEFGH1234ijklMNOP5678" not in redact_text(said, slack)
    assert redact_text(f"posting to {slack} failed") == \
        "posting to https://hooks.slack.com/services/T0123ABCD/B0456EFGH/*** failed"
