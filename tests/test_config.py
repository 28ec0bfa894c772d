"""Configuration: one typed config; bad values are named with what is allowed, exit 2.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_config.py."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config


def test_defaults_are_the_embedded_fleet():
    cfg = load_config(env={})
    assert (cfg.fleet.racks, cfg.fleet.nodes_per_rack, cfg.fleet.gpus_per_node) == (4, 8, 8)
    assert cfg.data_dir == "./fleetwatch-data"
    assert cfg.alerts.webhooks == []


def test_file_then_env_then_overrides(tmp_path):
    f = tmp_path / "fw.toml"
    f.write_text('data_dir = "/srv/fw"\n[fleet]\nracks = 2\nseed = 5\n[alerts]\nwebhooks = ["http://a/x"]\n')
    cfg = load_config(f, env={"FLEETWATCH_FLEET__RACKS": "3", "FLEETWATCH_ALERTS__WEBHOOKS": "http://b/1,http://c/2"},
                      overrides={"fleet": {"seed": 9}})
    assert cfg.data_dir == "/srv/fw"
    assert cfg.fleet.racks == 3
    assert cfg.fleet.seed == 9
    assert cfg.alerts.webhooks == ["http://b/1", "http://c/2"]


@pytest.mark.parametrize("toml, words", [
    ("[fleet]\nracks = -1\n", ["fleet.racks", "-1", ">= 1"]),
    ("[fleet]\nracks = \"four\"\n", ["fleet.racks", "'four'", "integer"]),
    ("[fleet]\nfaults = [\"meteor_strike\"]\n", ["fleet.faults", "meteor_strike", "allowed", "coolant_leak"]),
    ("[fleet]\nrackz = 4\n", ["unknown key", "fleet.rackz", "racks"]),
    ("[archive]\ncompression = \"brotli9\"\n", ["archive.compression", "brotli9", "zstd"]),
    ("[detect]\nz_threshold = nan\n", ["detect.z_threshold", "finite"]),
    ("fleet = 3\n", ["fleet", "table"]),
])
def test_bad_config_names_key_value_and_allowed(tmp_path, toml, words):
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    for w in [*words, f"(set in {f})"]:
        assert w in str(e.value)


def test_a_bad_value_says_where_it_was_set(tmp_path):
    """The file, an environment variable or the command line: a unit's Environment= line can hide
    what its config file shows, and the error had not said which of them to fix."""
    f = tmp_path / "fw.toml"
    f.write_text("[detect]\nlateness_s = 2\n[archive]\nurl = \"s3://bucket\"\n")
    origins = [({"FLEETWATCH_DETECT__LATENESS_S": "-1"}, {}, "(set by the environment variable FLEETWATCH_DETECT__LATENESS_S)"),
               ({}, {"detect": {"lateness_s": -1.0}}, "(set on the command line)"),
               ({"FLEETWATCH_ARCHIVE__URL": "ftp://x"}, {}, "(set by the environment variable FLEETWATCH_ARCHIVE__URL)")]
    for env, overrides, said in origins:
        with pytest.raises(ConfigError) as e:
            load_config(f, env=env, overrides=overrides)
        assert str(e.value).endswith(said) and str(e.value).count("(set ") == 1, str(e.value)


def test_bad_env_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"fleet.speed = 'fast': must be a number"):
        load_config(env={"FLEETWATCH_FLEET__SPEED": "fast"})


def test_docker_compose_parses_and_sets_only_keys_the_code_reads():
    import yaml

    from pipeline.roles import ROLES
    from tests.conftest import REPO
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "mosquitto", "alertmanager"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    # each role runs from Fleetwatch's image, whose entrypoint is `fleetwatch`: command = ROLE [options]
    roles = {name: svc for name, svc in services.items() if str(svc.get("image", "")).startswith("fleetwatch")}
    assert set(roles) == set(ROLES)
    for name, svc in roles.items():
        command = svc["command"]
        assert command[0] == name, command
        config = None
        if "--config" in command:  # a file of the repository, mounted into the container
            target = command[command.index("--config") + 1]
            config = REPO / next(m.split(":")[0] for m in svc["volumes"] if m.split(":")[1] == target)
            assert config == REPO / "deploy" / "notify.toml", command
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert env and all(k.startswith("FLEETWATCH_") for k in env)
        # raises ConfigError naming any unknown key or bad value
        cfg = load_config(config, env=env)
        assert cfg.kafka.bootstrap == "kafka:9092"
        if config:
            assert [(r.kind, r.url) for r in cfg.alerts.receivers] == [("alertmanager", "http://alertmanager:9093")]


def test_config_checks_one_role_s_configuration_as_that_role_does(tmp_path, capsys, monkeypatch):
    """`fleetwatch config` had checked run's roles only: a DCGM source's node, checked before its unit started,
    passed without the targets `fleetwatch dcgm` then refused to start without."""
    from pipeline.cli import main
    for key in [k for k in __import__("os").environ if k.startswith("FLEETWATCH_")]:
        monkeypatch.delenv(key)
    args = ["config", "--data-dir", str(tmp_path), "--kafka", "broker-1:9092"]
    assert main(args) == 0  # run's roles: the simulator, detect... need no DCGM targets
    capsys.readouterr()
    assert main([*args, "--role", "dcgm"]) == 2
    assert "the dcgm role scrapes dcgm-exporter endpoints: give --dcgm-targets" in capsys.readouterr().err
    monkeypatch.setenv("FLEETWATCH_DCGM__TARGETS", "http://gpu-017:9400/metrics")
    assert main([*args, "--role", "dcgm"]) == 0
