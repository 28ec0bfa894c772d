"""The deployment artifacts (docs/operations.md, Deploy), checked as far as a machine without a
Docker engine or a cluster allows: each file against its tool or official schema (promtool,
amtool, systemd-analyze, the compose spec, Kubernetes' OpenAPI schemas, Grafana's dashboard
model), then the properties issue 13 asks of it. tests/e2e/test_deploy_runtime.py runs what
needs a process: the agent without numba and polars, the image's Numba warm-up."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.roles import ROLES
from tests.services import KAFKA_VERSION

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
AGENT_PORT, CENTRAL_PORT = 9400, 9410  # docs/operations.md, Endpoints
CENTRAL_ROLES = set(ROLES) - {"agent", "simulate"}  # simulate is a demo source: compose only
FULL_ONLY = {"numba", "polars"}


def tool(name: str) -> str:
    """A tool scripts/test installs (Debian packages prometheus, prometheus-alertmanager, systemd)."""
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/test installs it (apt-get, as root)"
    return path


# ---------------------------------------------------------------- helpers


def dockerfile_stages(path: Path = REPO / "Dockerfile") -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions per stage, continuation lines joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in path.read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        op, _, args = logical.strip().partition(" ")
        op = op.upper()
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, args.strip()))
        logical = ""
    return stages


@cache
def operations_metrics() -> dict[str, str]:
    """docs/operations.md's metric table: name -> type."""
    text = (REPO / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\| `(fleetwatch_[a-z_]+)` \| (\w+) \|", text, re.M)
    assert len(rows) >= 20, "docs/operations.md's metric table moved"
    return dict(rows)


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan", "le"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (promtool checks its syntax separately)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                   # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                                # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                               # range and subquery windows
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word, rest = m.group(), e[m.end():].lstrip()
        before = e[:m.start()]
        if rest.startswith("(") or word in PROMQL_WORDS or re.search(r"[0-9.]$", before):
            continue  # a function or aggregation, a keyword, or a unit of a number (5m)
        names.add(word)
    return names


def allowed_metric(name: str) -> bool:
    if name.startswith("DCGM_FI_"):  # the agent's dcgm-exporter names
        return True
    known = operations_metrics()
    if name in known:
        return True
    base, _, suffix = name.rpartition("_")
    return known.get(base) == "histogram" and suffix in ("bucket", "sum", "count")


def grafana_vars_to_promql(expr: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
            .replace("${site}", ".*").replace("$site", ".*").replace("${rack}", "r01").replace("$rack", "r01"))


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def mounts(service: dict) -> dict[str, str]:
    """A compose service's bind and volume mounts: target -> source."""
    out = {}
    for m in service.get("volumes", []):
        source, target = m.split(":")[:2]
        out[target] = source
    return out


def http_port(args: list[str]) -> int:
    i = args.index("--http")
    host, _, port = args[i + 1].rpartition(":")
    assert host == "0.0.0.0", f"{args}: serve on every interface, so probes and Prometheus reach it"
    return int(port)


def k8s_docs() -> list[dict]:
    return [d for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def units() -> dict[str, list[tuple[str, str, str]]]:
    """deploy/systemd/*.service as (section, key, value) lines; systemd allows repeated keys."""
    out = {}
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        section, lines = "", []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            lines.append((section, key.strip(), value.strip()))
        out[path.name] = lines
    return out


def artifact_commands() -> dict[str, list[str]]:
    """Every `fleetwatch ...` command line the artifacts run, without the program: where -> args."""
    out = {}
    for name, s in compose()["services"].items():
        if str(s.get("image", "")).startswith("fleetwatch"):
            out[f"docker-compose.yml: {name}"] = s["command"]
    for d in k8s_docs():
        if d["kind"] in ("Deployment", "DaemonSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                out[f"kubernetes: {d['metadata']['name']}"] = c["args"]
    for unit, lines in units().items():
        exec_start = next(v for s, k, v in lines if k == "ExecStart")
        out[f"systemd: {unit}"] = shlex.split(exec_start)[1:]
    final = dockerfile_stages()[-1]
    out["Dockerfile: CMD"] = json.loads(dict(final)["CMD"])
    return out


def test_every_command_the_artifacts_run_is_a_real_fleetwatch_command(capsys):
    """Parsed by the real command line (status 2 on an unknown subcommand or flag, e.g. --http
    before the endpoints exist)."""
    from pipeline.cli import _parser
    commands = artifact_commands()
    assert len(commands) >= len(ROLES) + 4
    wrong = {}
    for where, args in commands.items():
        try:
            parsed = _parser().parse_args(args)
            assert parsed.command == args[0]
        except SystemExit:
            wrong[where] = capsys.readouterr().err.strip().splitlines()[-1]
    assert not wrong, wrong


# ---------------------------------------------------------------- the image


def test_the_image_runs_as_a_user_installs_everything_at_build_and_warms_numba():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    ops = [op for op, _ in final]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.11" in requires and "3.11" in (REPO / "Dockerfile").read_text().split("PYTHON_IMAGE=")[1].split()[0]

    # a dedicated, unprivileged user, created in the image, runs everything after the install
    users = [(i, args) for i, (op, args) in enumerate(final) if op == "USER"]
    assert users and users[-1][1] not in ("root", "0", "0:0")
    user = users[-1][1].split(":")[0]
    assert any(op == "RUN" and re.search(rf"useradd .*\b{user}\b", args) for op, args in final)
    assert users[-1][0] < ops.index("ENTRYPOINT")

    # dependencies come from the wheels built in the first stage, never from an index, and
    # nothing is installed when a container starts
    installs = [args for op, args in final if op == "RUN" and "pip install" in args]
    assert installs and all("--no-index" in a and "--find-links" in a for a in installs)
    assert any("pip wheel" in args and ".[all]" in args for op, args in stages[0] if op == "RUN")
    entrypoint = json.loads(dict(final)["ENTRYPOINT"])
    assert entrypoint == ["tini", "--", "fleetwatch"]  # an init as PID 1: signals forwarded, orphans reaped
    assert any(op == "RUN" and "install" in args and " tini" in args for op, args in final)

    # NUMBA_CACHE_DIR is set, owned by that user, and filled by the warm-up, which runs as the user
    env = " ".join(args for op, args in final if op == "ENV")
    cache_dir = re.search(r"NUMBA_CACHE_DIR=(\S+)", env).group(1)
    assert any(op == "RUN" and f"-o {user}" in args and "$NUMBA_CACHE_DIR" in args for op, args in final)
    warm = [i for i, (op, args) in enumerate(final) if op == "RUN" and "kernels.warm_up()" in args]
    assert len(warm) == 1 and users[-1][0] < warm[0]
    assert cache_dir.startswith("/") and "NUMBA_CPU_NAME=generic" in env  # valid on any host's CPU

    # the build context holds what the package needs (pyproject's package-dir and readme)
    copied = {w for op, args in stages[0] if op == "COPY" for w in args.split()[:-1]}
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {"pyproject.toml", "README.md", "pipeline/", *(d + "/" for d in package_dirs.values())} <= copied
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "fleetwatch-data", ".git"} <= set(ignored)
    assert {f"{AGENT_PORT}", f"{CENTRAL_PORT}"} <= set(dict(final)["EXPOSE"].split())


def test_the_agent_only_install_leaves_out_numba_and_polars_and_the_full_one_is_one_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in reqs}
    base, extras = names(project["dependencies"]), project["optional-dependencies"]
    assert not base & FULL_ONLY and not names(extras["agent"]) & FULL_ONLY
    assert FULL_ONLY <= names(extras["all"])
    # the Quickstart's commands install the full one
    assert '-e ".[all,test]"' in (REPO / "scripts" / "test").read_text()
    assert '-e ".[all]"' in (REPO / "scripts" / "demo").read_text()
    # and the agent's artifacts the agent-only one
    assert compose()["services"]["agent"]["build"]["args"]["EXTRAS"] == "agent"
    assert 'fleetwatch[${EXTRAS}]' in (REPO / "Dockerfile").read_text()


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_follows_the_compose_spec():
    from importlib.resources import files

    import jsonschema
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    jsonschema.validate(compose(), schema)


def test_compose_kafka_is_the_tests_version_and_keeps_its_data():
    c = compose()
    kafka = c["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert mounts(kafka)[log_dirs] in c["volumes"]  # a named volume, not the container's layer
    assert "healthcheck" in kafka


def test_compose_runs_every_role_from_the_image_with_its_endpoints_and_start_order():
    c = compose()
    services = c["services"]
    roles = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("fleetwatch")}
    assert set(roles) == set(ROLES)
    for name, s in roles.items():
        command = s["command"]
        assert command[0] == name
        port = http_port(command)
        assert port == (AGENT_PORT if name == "agent" else CENTRAL_PORT)
        probe = " ".join(s["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/readyz" in probe
        assert s["restart"] == "unless-stopped" and s["stop_signal"] == "SIGTERM"
        assert s["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert "build" in s  # built here, so a container never installs anything
    # every dependency waits for a health check that exists
    for name, s in services.items():
        for dep, how in s.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy" and "healthcheck" in services[dep], (name, dep)

    def needs(name: str) -> set[str]:
        direct = set(services[name].get("depends_on", {}))
        return direct.union(*(needs(d) for d in direct)) if direct else set()
    # compose stops dependents first: the roles stop in data order (README, Command line)
    assert {"archive", "notify"} <= needs("detect")
    assert "detect" in needs("simulate") and "detect" in needs("facility") and "facility" in needs("simulate")
    assert services["notify"]["depends_on"]["alertmanager"]["condition"] == "service_healthy"


def test_compose_agent_names_its_node_after_the_host():
    agent = compose()["services"]["agent"]
    # the host's UTS namespace: agent.node (empty) falls back to the host's name, not the container id
    assert agent["uts"] == "host"
    assert not agent["environment"].get("FLEETWATCH_AGENT__NODE")
    assert agent["profiles"] == ["gpu"]
    assert agent["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # the power role's caps: root with CAP_SYS_ADMIN, as NVML wants in a container; no other role
    assert agent["user"] == "root" and agent["cap_add"] == ["SYS_ADMIN"]
    assert [name for name, svc in compose()["services"].items() if "cap_add" in svc or "user" in svc] == ["agent"]


def test_compose_wires_alertmanager_prometheus_and_grafana_to_the_files_in_deploy():
    services = compose()["services"]

    def config_flag(service: dict, flag: str) -> str:
        return next(a.split("=", 1)[1] for a in service["command"] if a.startswith(flag + "="))
    am, prom, graf = services["alertmanager"], services["prometheus"], services["grafana"]
    assert mounts(am)[config_flag(am, "--config.file")] == "./deploy/alertmanager/alertmanager.yml"
    assert mounts(prom)[config_flag(prom, "--config.file")] == "./deploy/prometheus/prometheus.yml"
    assert mounts(graf)["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/fleetwatch.yml").read_text())["providers"][0]
    assert mounts(graf)[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert [d["url"] for d in datasource["datasources"] if d["type"] == "prometheus"] == ["http://prometheus:9090"]
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana/dashboards" / Path(home).name).exists()
    for name in ("alertmanager", "prometheus", "grafana"):
        assert "healthcheck" in services[name]
    # notify's config is mounted where its command reads it, and names the stack's Alertmanager
    notify = services["notify"]
    config = notify["command"][notify["command"].index("--config") + 1]
    assert mounts(notify)[config] == "./deploy/notify.toml"


# ---------------------------------------------------------------- Prometheus and Alertmanager


def test_prometheus_config_is_valid_and_scrapes_every_role_on_its_port():
    path = DEPLOY / "prometheus" / "prometheus.yml"
    check = subprocess.run([tool("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load(path.read_text())
    scraped = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                scraped[name] = sd["port"]
    services = compose()["services"]
    for role in ROLES:
        assert scraped.get(role) == http_port(services[role]["command"]), role
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]


def test_the_rules_about_fleetwatch_are_loaded_by_the_stack_and_the_operators_prometheus_alike():
    """deploy/prometheus/rules.yml (its firing: tests/test_prometheus_rules.py) is valid, loaded by the compose
    stack's Prometheus where it mounts it, read only documented metrics, and the Prometheus Operator's
    PrometheusRule holds the same groups."""
    path = DEPLOY / "prometheus" / "rules.yml"
    check = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    groups = yaml.safe_load(path.read_text())["groups"]
    config_dir = "/etc/prometheus"
    prometheus = compose()["services"]["prometheus"]
    loaded = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["rule_files"]
    assert [mounts(prometheus).get(f"{config_dir}/{f}") for f in loaded] == ["./deploy/prometheus/rules.yml"]
    for rule in (r for g in groups for r in g["rules"]):
        unknown = {n for n in promql_metrics(rule["expr"]) if n != "up" and not allowed_metric(n)}
        assert not unknown, f"{rule['alert']}: {unknown} are not in docs/operations.md's metric table"
    operator = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus-operator" / "prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule" and operator["spec"]["groups"] == groups


def test_a_collector_s_stall_is_prometheus_s_to_raise_exactly_where_no_role_of_its_process_publishes_it():
    """FleetwatchCollectorStalled raises the stall of a process that keeps its FleetwatchStalled on its /metrics:
    sources without the alerts topic among their outputs, and none of the roles that have it (the role table)."""
    from pipeline.bus.base import Topic
    from pipeline.detect.catalog import ALERTS_BY_NAME
    from pipeline.roles import ROLE_TABLE
    expr = ALERTS_BY_NAME["FleetwatchCollectorStalled"].promql
    stalled_alone, publishing = (set(m.split("|")) for m in re.findall(r'fleetwatch_up\{role=~"([^"]+)"\}', expr))
    assert publishing == {r.name for r in ROLE_TABLE if Topic.ALERTS in r.outputs}
    assert stalled_alone == {r.name for r in ROLE_TABLE if r.outputs and Topic.ALERTS not in r.outputs}


def amtool_route(config: Path, *labels: str) -> str:
    r = subprocess.run([tool("amtool"), "config", "routes", "test", f"--config.file={config}", *labels],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_alertmanager_routes_alerts_to_receivers_and_the_watchdog_to_its_own():
    from pipeline.detect.catalog import ALERTS
    path = DEPLOY / "alertmanager" / "alertmanager.yml"
    check = subprocess.run([tool("amtool"), "check-config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    receivers = {r["name"] for r in yaml.safe_load(path.read_text())["receivers"]}
    watchdog = amtool_route(path, "alertname=FleetwatchWatchdog", "severity=none")
    some_alert = ALERTS[0].name
    ordinary = amtool_route(path, f"alertname={some_alert}", "severity=critical", "rack=r01")
    assert {watchdog, ordinary} <= receivers and watchdog != ordinary


# ---------------------------------------------------------------- Grafana dashboards


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels", [])  # a collapsed row holds its panels
    return out


def test_there_are_the_three_dashboards_with_unique_uids():
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(DASHBOARDS) == 3 and len(set(uids)) == 3


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_grafanas_dashboard_model(path):
    """Decoded into the Grafana Foundation SDK's dashboard model (generated from Grafana's schema)
    and encoded again, nothing is lost: no unknown or misplaced key."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard
    register_default_plugins()
    original = json.loads(path.read_text())
    again = json.loads(json.dumps(Dashboard.from_json(original), cls=JSONEncoder))

    def lost(a, b, where="") -> list[str]:
        if isinstance(a, dict):
            return [f"{where}.{k}" for k in a if not isinstance(b, dict) or k not in b] + \
                [x for k in a if isinstance(b, dict) and k in b for x in lost(a[k], b[k], f"{where}.{k}")]
        if isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                return [where]
            return [x for i, (u, v) in enumerate(zip(a, b)) for x in lost(u, v, f"{where}[{i}]")]
        return [] if a == b else [f"{where}: {a!r} became {b!r}"]
    assert lost(original, again) == []
    assert isinstance(original["schemaVersion"], int) and original["title"] and original["uid"]
    for p in all_panels(original):
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert all(isinstance(v, int) for v in p["gridPos"].values())


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_picks_prometheus_by_variable_and_has_unique_panel_ids(path):
    d = json.loads(path.read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": f"${{{ds[0]['name']}}}"}
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for p in all_panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"] == ref and p["targets"], p["title"]
        assert all(t["datasource"] == ref and t["expr"].strip() for t in p["targets"]), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        if p.get("repeat"):
            assert p["repeat"] in variables
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == ref


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_use_only_the_documented_metrics(path):
    d = json.loads(path.read_text())
    exprs = [t["expr"] for p in all_panels(d) for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    for expr in exprs:
        names = promql_metrics(re.sub(r"label_values\((.*),\s*\w+\)$", r"\1", expr))
        assert names, expr
        unknown = {n for n in names if not allowed_metric(n)}
        assert not unknown, f"{expr}: {unknown} are not in docs/operations.md's metric table"


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each panel's query (Grafana's variables replaced by values) as a rule."""
    rules = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        for p in all_panels(d):
            for t in p.get("targets", []):
                rules.append({"record": f"check:{d['uid'].replace('-', '_')}:{p['id']}:{t['refId']}",
                              "expr": grafana_vars_to_promql(t["expr"])})
    file = tmp_path / "rules.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run([tool("promtool"), "check", "rules", str(file)], capture_output=True, text=True)
    assert r.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout + r.stderr
    # and promtool does fail on a broken one: the check is not vacuous
    file.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x", "expr": "sum(rate(x[1m])"}]}]}))
    assert subprocess.run([tool("promtool"), "check", "rules", str(file)], capture_output=True).returncode != 0


def test_the_dashboards_show_what_the_issue_asks():
    def exprs(name: str) -> list[tuple[str, str]]:
        d = json.loads((DEPLOY / "grafana/dashboards" / name).read_text())
        return [(p["type"], t["expr"]) for p in all_panels(d) for t in p.get("targets", [])]

    def shows(name: str, metric: str, *, by: str = "", types: tuple[str, ...] = ()) -> bool:
        return any(metric in promql_metrics(e) and by in e and (not types or t in types) for t, e in exprs(name))
    # fleet overview: ingest, lag, alerts by name, node health
    assert shows("fleet-overview.json", "fleetwatch_samples_ingested_total")
    assert shows("fleet-overview.json", "fleetwatch_event_time_lag_seconds")
    assert shows("fleet-overview.json", "fleetwatch_consumer_lag_messages")
    assert shows("fleet-overview.json", "fleetwatch_alerts_firing", by="alertname")
    assert shows("fleet-overview.json", "fleetwatch_nodes", by="state")
    # rack x node heat maps of GPU temperature and of the margin to slowdown
    heat = ("status-history", "heatmap")
    assert shows("gpu-thermal.json", "fleetwatch_gpu_temperature_celsius", by="node", types=heat)
    assert shows("gpu-thermal.json", "fleetwatch_gpu_slowdown_margin_celsius", by="node", types=heat)
    thermal = json.loads((DEPLOY / "grafana/dashboards/gpu-thermal.json").read_text())
    assert any(p.get("repeat") == "rack" and p["type"] in heat for p in all_panels(thermal))
    # power per rack against the PDU rating, site power against the cap: in the same panel
    power = json.loads((DEPLOY / "grafana/dashboards/power.json").read_text())
    together = [set().union(*(promql_metrics(t["expr"]) for t in p["targets"])) for p in all_panels(power)
                if p.get("targets")]
    assert any({"fleetwatch_rack_power_watts", "fleetwatch_rack_power_rating_watts"} <= m for m in together)
    assert any({"fleetwatch_site_power_watts", "fleetwatch_site_power_cap_watts"} <= m for m in together)


def test_promql_metric_extraction():
    assert promql_metrics('sum by (role, dataset) (rate(fleetwatch_samples_ingested_total{role="x"}[5m]))') == \
        {"fleetwatch_samples_ingested_total"}
    assert promql_metrics("a / on (site) b > 0.9 and c offset 5m") == {"a", "b", "c"}
    assert promql_metrics('histogram_quantile(0.99, sum by (le) (rate(x_bucket[1m])))') == {"x_bucket"}
    assert allowed_metric("fleetwatch_detect_batch_duration_seconds_bucket")
    assert not allowed_metric("fleetwatch_up_bucket") and not allowed_metric("node_load1")
    assert allowed_metric("DCGM_FI_DEV_GPU_TEMP")


# ---------------------------------------------------------------- Kubernetes


def test_kubernetes_manifests_follow_kubernetes_schemas():
    import kubernetes_validate
    for doc in k8s_docs():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def pod_of(kind: str, name: str) -> dict:
    return next(d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name)["spec"]["template"]["spec"]


def check_probes_and_args(container: dict, port: int) -> None:
    assert http_port(container["args"]) == port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == port, probe


def test_kubernetes_agent_is_a_critical_daemonset_on_gpu_nodes_named_after_its_node():
    pod = pod_of("DaemonSet", "fleetwatch-agent")
    assert pod["priorityClassName"] == "system-node-critical"
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    # a node remediation quarantined (its taint) keeps its agent through a rollout: its telemetry matters most
    from pipeline.remediate.backends.kubernetes import TAINT_KEY
    assert any(t["key"] == TAINT_KEY and t["operator"] == "Exists" for t in pod["tolerations"])
    (container,) = pod["containers"]
    assert container["args"][0] == "agent" and "agent" in container["image"]
    env = {e["name"]: e for e in container["env"]}
    assert env["FLEETWATCH_AGENT__NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    check_probes_and_args(container, AGENT_PORT)
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the namespace admits pods of that priority class (outside kube-system many clusters need a quota)
    quota = next(d for d in k8s_docs() if d["kind"] == "ResourceQuota")
    expr = quota["spec"]["scopeSelector"]["matchExpressions"][0]
    assert expr["scopeName"] == "PriorityClass" and "system-node-critical" in expr["values"]


def test_kubernetes_central_roles_are_deployments_with_probes_on_their_endpoints():
    deployments = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "Deployment"}
    assert set(deployments) == {f"fleetwatch-{r}" for r in CENTRAL_ROLES}
    for name, d in deployments.items():
        role = name.removeprefix("fleetwatch-")
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] == role
        check_probes_and_args(container, CENTRAL_PORT)
        assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(CENTRAL_PORT)
    # detect's replicas are never all evicted at once, and keep their drain's time to stop
    budgets = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "PodDisruptionBudget"}
    detect = deployments["fleetwatch-detect"]
    assert budgets["fleetwatch-detect"]["spec"]["selector"] == detect["spec"]["selector"]
    assert budgets["fleetwatch-detect"]["spec"]["maxUnavailable"] == 1 < detect["spec"]["replicas"]
    assert detect["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    # notify runs once per data directory (README, Command line)
    assert deployments["fleetwatch-notify"]["spec"]["replicas"] == 1
    assert deployments["fleetwatch-notify"]["spec"]["strategy"]["type"] == "Recreate"


def test_kubernetes_applies_in_name_order_each_object_after_its_namespace_and_service_account():
    """`kubectl apply -f deploy/kubernetes/` creates the files' objects in name order, and the
    API refuses an object in a namespace not yet there (kubernetes/kubectl#1356)."""
    made: set[tuple[str, str]] = set()
    for d in k8s_docs():
        meta = d["metadata"]
        if ns := meta.get("namespace"):
            assert ("Namespace", ns) in made, f"{d['kind']} {meta['name']} before its namespace {ns}"
        if d["kind"] in ("Deployment", "DaemonSet"):
            account = d["spec"]["template"]["spec"]["serviceAccountName"]
            assert ("ServiceAccount", account) in made, f"{meta['name']} before its service account {account}"
        made.add((d["kind"], meta["name"]))


def test_only_the_roles_that_call_the_kubernetes_api_get_a_token_with_what_they_call():
    """power lists nodes (their labels: classes) and pods (jobs); remediate gets and patches
    nodes and their status and lists pods (pipeline/remediate/backends/kubernetes.py). Every
    other role runs without a token."""
    docs = k8s_docs()
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d["kind"] == "ClusterRole"}
    bound = {s["name"]: roles[d["roleRef"]["name"]] for d in docs if d["kind"] == "ClusterRoleBinding"
             for s in d["subjects"] if s["kind"] == "ServiceAccount" and s["namespace"] == "fleetwatch"}

    def rights(rules) -> set[tuple[str, str]]:
        assert all(r["apiGroups"] == [""] for r in rules)  # the core API only
        return {(res, verb) for r in rules for res in r["resources"] for verb in r["verbs"]}

    pods = {d["metadata"]["name"].removeprefix("fleetwatch-"): d["spec"]["template"]["spec"]
            for d in docs if d["kind"] in ("Deployment", "DaemonSet")}
    for role, pod in pods.items():
        account = pod["serviceAccountName"]
        if role in ("power", "remediate"):
            assert account == f"fleetwatch-{role}" and accounts[account]["automountServiceAccountToken"] is True
        else:
            assert accounts[account]["automountServiceAccountToken"] is False and account not in bound, role
    assert rights(bound["fleetwatch-power"]) == {("nodes", "list"), ("pods", "list")}
    assert rights(bound["fleetwatch-remediate"]) == {("nodes", "get"), ("nodes", "patch"), ("nodes/status", "get"),
                                                     ("nodes/status", "patch"), ("pods", "list")}


def _merge(base, patch):
    """A strategic merge patch as kubectl applies this one: maps merged, containers by name."""
    if isinstance(base, dict) and isinstance(patch, dict):  # (null deletes a key)
        merged = {**base, **{k: _merge(base.get(k), v) for k, v in patch.items()}}
        return {k: v for k, v in merged.items() if v is not None}
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(c, dict) and "name" in c for c in patch):
        named = {c["name"]: c for c in patch}
        return [_merge(c, named[c["name"]]) if c.get("name") in named else c for c in base]
    return patch


def test_the_power_caps_patch_lets_the_agent_cap_and_changes_nothing_else():
    """Setting a power limit in a container needs root with CAP_SYS_ADMIN (NVML refuses
    otherwise: NVIDIA/nvidia-docker#495); the shipped DaemonSet runs the agent unprivileged."""
    import kubernetes_validate
    daemonset = next(d for d in k8s_docs() if d["kind"] == "DaemonSet")
    patch = yaml.safe_load((DEPLOY / "kubernetes" / "power-caps" / "agent-patch.yaml").read_text())
    patched = _merge(daemonset, patch)
    kubernetes_validate.validate(patched, kubernetes_validate.latest_version(), strict=True)
    pod, shipped = patched["spec"]["template"]["spec"], daemonset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 0 and pod["securityContext"]["runAsNonRoot"] is False
    (container,) = pod["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False  # kept from the shipped one
    assert shipped["securityContext"]["runAsNonRoot"] is True  # as shipped: unprivileged
    assert {k: v for k, v in container.items() if k != "securityContext"} == \
        {k: v for k, v in shipped["containers"][0].items() if k != "securityContext"}
    # its data (the ledger of own limits) on the node: it outlives a replaced pod
    assert pod["volumes"] == [{"name": "data", "hostPath": {"path": "/var/lib/fleetwatch-agent",
                                                            "type": "DirectoryOrCreate"}}]


def test_kubernetes_settings_are_config_keys(tmp_path):
    docs = k8s_docs()
    env = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "fleetwatch-env")["data"]
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                plain = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
                # raises ConfigError naming any unknown key or bad value
                load_config(None, env={**env, **{k: v for k, v in plain.items() if k.startswith("FLEETWATCH_")}})
    notify_toml = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "fleetwatch-notify")
    notify_toml = notify_toml["data"]["notify.toml"]
    (tmp_path / "notify.toml").write_text(notify_toml)
    cfg = load_config(tmp_path / "notify.toml", env=env)
    # One receiver per Alertmanager replica (each must hear every alert), never the balanced service.
    assert [r.kind for r in cfg.alerts.receivers] == ["alertmanager"] * 3
    assert all("alertmanager-operated" in r.url for r in cfg.alerts.receivers)


# ---------------------------------------------------------------- systemd


def test_systemd_units_verify(tmp_path):
    """systemd-analyze verify, with ExecStart pointed at this checkout's installed command (it
    checks the binary exists); any message is a failure (it exits 0 on unknown keys)."""
    installed = Path(sys.executable).parent / "fleetwatch"
    for path in (DEPLOY / "systemd").glob("*.service"):
        (tmp_path / path.name).write_text(path.read_text().replace("/opt/fleetwatch/bin/fleetwatch", str(installed)))
    for dropin in (DEPLOY / "systemd").glob("*.service.d/*.conf"):  # the agent's power caps: as root
        (tmp_path / dropin.parent.name).mkdir(exist_ok=True)
        (tmp_path / dropin.parent.name / dropin.name).write_text(dropin.read_text())
    r = subprocess.run([tool("systemd-analyze"), "verify", *sorted(map(str, tmp_path.glob("*.service")))],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    sysusers = subprocess.run([tool("systemd-sysusers"), "--dry-run", str(DEPLOY / "systemd" / "fleetwatch.sysusers")],
                              capture_output=True, text=True)
    assert sysusers.returncode == 0 and "ignoring" not in sysusers.stderr, sysusers.stderr


def test_the_power_caps_drop_in_runs_the_agent_as_root_in_a_state_directory_of_its_own():
    """systemd hands a StateDirectory to the unit's user: shared with fleetwatch.service (user
    fleetwatch) on one host, a root agent would take /var/lib/fleetwatch from it at each start."""
    lines = [line.strip() for line in (DEPLOY / "systemd" / "fleetwatch-agent.service.d" / "power-caps.conf")
             .read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert {"User=root", "Group=root"} <= set(lines)
    assert lines.index("StateDirectory=") < lines.index("StateDirectory=fleetwatch-agent")  # reset, then its own
    assert "Environment=FLEETWATCH_DATA_DIR=%S/fleetwatch-agent" in lines
    central = dict(kv for _, *kv in units()["fleetwatch.service"] if len(kv) == 2)
    assert central.get("StateDirectory") == "fleetwatch"


def test_the_central_unit_runs_no_simulated_fleet_into_the_real_topics():
    """`fleetwatch run`'s default source is the simulator: the central unit had published 256 made-up GPUs,
    a fault a minute, onto the fleet's Kafka beside its agents (critical alerts, drains of nodes that do
    not exist). It runs every consumer and no source; the same without Kafka is refused, saying why."""
    from pipeline.config import ConfigError
    from pipeline.daemon import check_roles
    from pipeline.roles import SOURCE_ROLES, run_roles
    env = dict(v.split("=", 1) for s, k, v in units()["fleetwatch.service"] if s == "Service" and k == "Environment")
    env = {k: v for k, v in env.items() if k.startswith("FLEETWATCH_") and k != "FLEETWATCH_DATA_DIR"}
    cfg = load_config(None, env={**env, "FLEETWATCH_KAFKA__BOOTSTRAP": "kafka-1:9092"})
    roles = run_roles(cfg)
    assert {"archive", "detect", "notify", "power", "remediate"} <= roles and not roles & set(SOURCE_ROLES.values())
    check_roles(cfg, roles)
    alone = load_config(None, env=env)
    with pytest.raises(ConfigError, match="daemon.source = none.*--kafka"):
        check_roles(alone, run_roles(alone))


@pytest.mark.parametrize("unit,role,port", [("fleetwatch-agent.service", "agent", AGENT_PORT),
                                            ("fleetwatch.service", "run", CENTRAL_PORT)])
def test_systemd_unit_notifies_is_watched_restarts_and_runs_as_its_user(unit, role, port):
    lines = units()[unit]
    service = {k: v for s, k, v in lines if s == "Service"}
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] and service["Restart"] == "always"  # (exit 0 after a stray SIGHUP too)
    assert service["StateDirectory"] == "fleetwatch"
    envs = [v for s, k, v in lines if s == "Service" and k == "Environment"]
    assert "FLEETWATCH_DATA_DIR=%S/fleetwatch" in envs  # the StateDirectory
    user = (DEPLOY / "systemd" / "fleetwatch.sysusers").read_text().split("\nu ")[1].split()[0]
    assert service["User"] == user != "root"
    command = shlex.split(service["ExecStart"])
    assert command[0] == "/opt/fleetwatch/bin/fleetwatch" and command[1] == role
    assert http_port(command) == port
    assert ("WantedBy", "multi-user.target") in {(k, v) for s, k, v in lines if s == "Install"}


def test_the_prometheus_operators_podmonitor_scrapes_every_pod_and_notify_may_reach_alertmanager():
    """The Prometheus Operator ignores the prometheus.io/* annotations, and kube-prometheus's
    NetworkPolicy lets only Prometheus reach Alertmanager: nothing was scraped, and every alert
    stayed in notify's outbox."""
    import kubernetes_validate
    folder = DEPLOY / "kubernetes" / "prometheus-operator"
    docs = {d["kind"]: d for f in sorted(folder.rglob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d}
    monitor, policy = docs["PodMonitor"], docs["NetworkPolicy"]
    for kind in ("NetworkPolicy", "Role", "RoleBinding"):
        kubernetes_validate.validate(docs[kind], kubernetes_validate.latest_version(), strict=True)
    # `kubectl apply -f prometheus-operator/` takes no NetworkPolicy (alone it would isolate Alertmanager
    # where no other policy selects it): that one is in kube-prometheus/, for kube-prometheus only
    top = [d["kind"] for f in folder.glob("*.yaml") for d in yaml.safe_load_all(f.read_text()) if d]
    assert "NetworkPolicy" not in top and {"PodMonitor", "Role", "RoleBinding"} <= set(top)
    # the Prometheus that scrapes may list the pods of the namespace
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert {"pods"} <= set(docs["Role"]["rules"][0]["resources"]) and "list" in docs["Role"]["rules"][0]["verbs"]
    assert docs["Role"]["metadata"]["namespace"] == monitor["metadata"]["namespace"] == "fleetwatch"
    wanted = monitor["spec"]["selector"]["matchLabels"]
    pods = [d["spec"]["template"] for d in k8s_docs() if d["kind"] in ("Deployment", "DaemonSet")]
    assert pods and all(wanted.items() <= p["metadata"]["labels"].items() for p in pods)  # every pod selected
    ports = {p["name"] for pod in pods for c in pod["spec"]["containers"] for p in c["ports"]}
    endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert endpoints == ports == {"metrics", "http"}
    notify = pod_of("Deployment", "fleetwatch-notify")
    allowed = policy["spec"]["ingress"][0]["from"][0]
    notify_labels = next(d for d in k8s_docs() if d["kind"] == "Deployment"
                         and d["metadata"]["name"] == "fleetwatch-notify")["spec"]["template"]["metadata"]["labels"]
    assert allowed["podSelector"]["matchLabels"].items() <= notify_labels.items() and notify
    assert allowed["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "fleetwatch"}
    urls = re.findall(r"http://\S+?:(\d+)", (DEPLOY / "kubernetes" / "fleetwatch-config.yaml").read_text())
    assert urls and {int(u) for u in urls} == {p["port"] for p in policy["spec"]["ingress"][0]["ports"]}
