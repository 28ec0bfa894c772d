"""End-to-end: secrets as the `fleetwatch` command handles them (moved from tests/test_secrets.py)."""

from __future__ import annotations

import re

import pytest

from pipeline.redact import redact_text
from tests.conftest import REPO, fleetwatch
from tests.test_secrets import OTHER, PASSWORD, TOKEN


def readme_receiver_example() -> str:
    """The [[alerts.receivers]] example of docs/alerting.md (once the README's), as a user copies it."""
    blocks = re.findall(r"```toml\n(.*?)```", (REPO / "docs" / "alerting.md").read_text(), re.S)
    return next(b for b in blocks if "[[alerts.receivers]]" in b and "secret_env" in b)


def test_the_readmes_receiver_example_starts_with_its_secret_in_the_environment(tmp_path):
    example = readme_receiver_example()
    var = re.search(r'secret_env = "([A-Z0-9_]+)"', example).group(1)
    assert var.startswith("FLEETWATCH_")  # the name that clashed with the FLEETWATCH_* overrides
    (tmp_path / "fw.toml").write_text(example)
    r = fleetwatch("config", "--config", str(tmp_path / "fw.toml"), env={var: OTHER}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"secret_env": "' + var in r.stdout
    assert OTHER not in r.stdout + r.stderr
    r = fleetwatch("config", "--config", str(tmp_path / "fw.toml"), timeout=60)  # the secret not set
    assert r.returncode == 2 and f"secret_env = '{var}': that environment variable is not set" in r.stderr


def test_config_output_redacts_every_url(tmp_path):
    (tmp_path / "fw.toml").write_text(f"""
[alerts]
webhooks = ["https://hooks.example/a?token={TOKEN}"]
external_url = "https://fleetwatch.example/?auth={TOKEN}"
[[alerts.receivers]]
name = "oncall"
url = "https://hookuser:{PASSWORD}@hooks.example:8443/fw/x?token={TOKEN}"
""")
    r = fleetwatch("config", "--config", str(tmp_path / "fw.toml"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr and TOKEN not in r.stdout + r.stderr
    assert '"url": "https://***@hooks.example:8443/fw/x?token=***"' in r.stdout
    assert '"https://hooks.example/a?token=***"' in r.stdout


@pytest.mark.parametrize("url, what", [
    (f"https://hooks.example/x?token={TOKEN[:4]} {TOKEN[4:]}", "a space"),
    (f"https://hooks.example/x?token={TOKEN}\t", "a tab"),
    (f"https://hooks.example/x\u00e9?token={TOKEN}", "a non-ASCII character"),
    (f"https://hooks.example:99999/x?token={TOKEN}", "the port is not a number"),
    (f"https://[hooks.example/x?token={TOKEN}", "not a valid URL"),
], ids=["space", "tab", "non-ascii", "port", "bracket"])
def test_a_bad_url_is_status_2_at_start_and_its_secrets_stay_out_of_the_message(tmp_path, url, what):
    (tmp_path / "fw.toml").write_text(f'[[alerts.receivers]]\nname = "oncall"\nurl = "{url}"\n')
    for command in (["config"], ["run", "--duration", "30", "--data-dir", "data"]):
        r = fleetwatch(*command, "--config", str(tmp_path / "fw.toml"), cwd=tmp_path, timeout=60)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.startswith("fleetwatch: config error: alerts.receivers[0].url = ") and what in r.stderr
        assert TOKEN[4:] not in r.stderr and TOKEN not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("url", [f"https://bob:pa'ss{PASSWORD}@hooks.example/x",
                                 f"https://hooks.example/x?token=ab'{TOKEN}", f"https://hooks.example/x?token=<{TOKEN}>"])
def test_quotes_and_angle_brackets_in_a_secret_do_not_end_the_redaction(url):
    """A quote or < > is legal in a password or a query value: the URL runs to white space."""
    for text in (url, f"posting to {url} failed", repr(url)):
        assert PASSWORD not in redact_text(text) and TOKEN not in redact_text(text), redact_text(text)
    r = fleetwatch("config", env={"FLEETWATCH_ALERTS__WEBHOOKS": url}, timeout=60)
    assert r.returncode == 0 and PASSWORD not in r.stdout and TOKEN not in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("flag, value", [("--mqtt", "bms example:1883"),
                                         ("--mqtt", f"mqtt://u:{PASSWORD}@bms.invalid:1883"),
                                         ("--kafka", f"user:{PASSWORD}@broker:9092")])
def test_a_broker_address_is_host_port_and_nothing_else(tmp_path, flag, value):
    """No scheme, no user info, no space: status 2 at once (not a connect-and-retry loop),
    and a password in the value stays out of the message."""
    r = fleetwatch("run", flag, value, "--duration", "30", "--data-dir", "data", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "expected HOST:PORT" in r.stderr, r.stderr[-2000:]
    assert PASSWORD not in r.stderr and "Traceback" not in r.stderr
