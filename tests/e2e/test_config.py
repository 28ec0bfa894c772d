"""End-to-end: configuration errors and the reference as the `fleetwatch` command reports them (moved
from tests/test_config.py)."""

from __future__ import annotations

from tests.conftest import fleetwatch


def test_cli_exits_2_on_bad_config(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[fleet]\ngpus_per_node = 0\n")
    r = fleetwatch("run", "--config", str(f), "--duration", "1", cwd=tmp_path)
    assert r.returncode == 2
    assert "fleet.gpus_per_node = 0: must be >= 1" in r.stderr
    assert not (tmp_path / "fleetwatch-data").exists()


def test_cli_exits_2_on_missing_file_and_bad_webhook(tmp_path):
    r = fleetwatch("run", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = fleetwatch("run", "--duration", "1", cwd=tmp_path, env={"FLEETWATCH_ALERTS__WEBHOOKS": "ftp://x"})
    assert r.returncode == 2 and "ftp://x" in r.stderr and "http" in r.stderr


def test_readme_config_reference_matches_code():
    from tests.conftest import REPO
    table = fleetwatch("config", "--reference").stdout.strip()
    assert table in (REPO / "docs" / "configuration.md").read_text(), \
        "docs/configuration.md's table of every key is stale: run scripts/update-docs"


def test_unusable_data_dir_exits_2_and_says_what_to_do(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    r = fleetwatch("run", "--duration", "1", "--data-dir", str(tmp_path / "a-file" / "data"), cwd=tmp_path)
    assert r.returncode == 2
    assert "data_dir" in r.stderr and "cannot create or write" in r.stderr and "--data-dir" in r.stderr
