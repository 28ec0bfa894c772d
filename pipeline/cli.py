"""`fleetwatch ...`: the command line.

Exit status: 0 done, 1 failed while running, 2 bad usage or configuration, 75 a service it
needs out of reach at start (Kafka: a supervisor tries again), 141 when the reader of the
output went away (a pager or `head` that quit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.analytics import capacity, report
from pipeline.analytics.query import FORMATS as QUERY_FORMATS
from pipeline.config import Config, ConfigError, Unavailable, existing_data_dir, load_config, reference
from pipeline.detect.catalog import SEVERITIES
from pipeline.logs import FORMATS as LOG_FORMATS, configure as configure_logging
from pipeline.redact import redact_text

EX_TEMPFAIL = 75  # a service it needs is out of reach now (sysexits.h): a supervisor may try again
log = logging.getLogger("fleetwatch")
FULL_INSTALL_ONLY = ("numba", "polars", "duckdb", "matplotlib")  # the extra `all` of pyproject.toml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetwatch", description="Real-time telemetry and diagnostics for GPU fleets.")
    p.add_argument("--version", action="version", version=f"fleetwatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", metavar="FILE", help="TOML config file (see docs/configuration.md)")
        sp.add_argument("--seed", type=int, metavar="N", help="simulator seed (fleet.seed)")
        sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="daemon.log_level")
        sp.add_argument("--log-format", choices=LOG_FORMATS,
                        help="log lines on stderr as text or one JSON object per line (daemon.log_format)")

    from pipeline.roles import ROLE_TABLE
    role_help = {"run": "run the daemon, every role (embedded default: simulated fleet, in-process bus)"}
    role_help.update((spec.name, spec.help) for spec in ROLE_TABLE)
    options = {spec.name: spec.options for spec in ROLE_TABLE}
    options["run"] = role_options()
    for name, text in role_help.items():
        run = sub.add_parser(name, help=text)
        common(run)
        run.add_argument("--data-dir", metavar="DIR", help="archive and alerts.jsonl go here (data_dir)")
        run.add_argument("--duration", type=float, metavar="SECONDS", help="stop cleanly after this long")
        run.add_argument("--speed", type=float, metavar="X",
                         help="simulated seconds per second; 0 = flat out (fleet.speed)")
        run.add_argument("--kafka", metavar="BOOTSTRAP",
                         help="Kafka at host:port between the roles (kafka.bootstrap); required but for `run`")
        run.add_argument("--http", metavar="HOST:PORT",
                         help="serve /metrics, /healthz and /readyz here, e.g. 0.0.0.0:9410 (daemon.http; off by "
                              "default)")
        for opt in options[name]:  # each role's own (pipeline/roles: RoleOption)
            if opt.switch:
                run.add_argument(opt.flag, action="store_true", help=opt.help, dest=opt.dest)
            else:
                run.add_argument(opt.flag, metavar=opt.metavar, help=opt.help, dest=opt.dest)
        if name == "power":
            power_actions(run)
        if name == "archive":
            archive_actions(run)
        if name == "run":
            run.add_argument("--source", choices=(*(spec.run_source for spec in ROLE_TABLE if spec.run_source), "none"),
                             help="simulated fleet (default), this node's GPUs through NVML, dcgm-exporter "
                                  "endpoints, or none (the central daemon over Kafka: the agents publish) "
                                  "(daemon.source)")

    ev = sub.add_parser("eval", help="score the detectors against injected faults, faster than real time")
    common(ev)
    ev.add_argument("--duration", type=float, required=True, metavar="SECONDS", help="simulated time to run")
    ev.add_argument("--json", metavar="OUT", help="write the scores as JSON here")
    ev.add_argument("--fault-interval", type=float, default=300.0, metavar="SECONDS",
                    help="mean time between injected faults (default 300; the demo's 60 would overlap them)")
    ev.add_argument("--kafka", metavar="HOST:PORT", help="produce the scenario through this Kafka broker and detect "
                    "it with --detect-processes `fleetwatch detect` processes (same JSON keys)")
    ev.add_argument("--detect-processes", type=int, default=1, metavar="K",
                    help="with --kafka: detect processes to run (default 1)")
    ev.add_argument("--chaos", choices=("kill", "freeze"),
                    help="with --kafka: half-way, kill one detect process with SIGKILL, or freeze it (SIGSTOP) past "
                         "the group's session timeout and let it go on; the scores must not change")
    ev.add_argument("--normal", choices=("realistic", "simple"),
                    help="what the fleet does between faults (fleet.normal; default realistic): diurnal inference, "
                         "training power swings, checkpoints, rolling reboots, sensor noise and dropouts, skewed "
                         "clocks; or the steady, exact fleet of before")
    ev.add_argument("--power-requests", type=int, default=0, metavar="N",
                    help="N demand-response events (each sheds 10-40%% of the GPUs' power for up to 10 min); "
                         "the JSON gains demand_response")

    ev.add_argument("--rack-cooling-loss", action="store_true",
                    help="a quarter of the way in, rack r01 loses most of its cooling for up to 30 min: the "
                         "remediation breaker's scenario (it must trip; the rack is not drained node by node)")

    rp = sub.add_parser("replay", help="score a univariate series (CSV timestamp,value) for anomalies")
    rp.add_argument("series", metavar="SERIES.csv")
    rp.add_argument("--out", required=True, metavar="SCORES.csv", help="timestamp,value,anomaly_score")

    cf = sub.add_parser("config", help="check the configuration as `run` does and print it (URLs redacted), or "
                                       "the reference of every key")
    cf.add_argument("--config", metavar="FILE")
    cf.add_argument("--reference", action="store_true", help="the Markdown table of every key (docs/configuration.md)")
    # (the flags a unit passes to `run`, so that its own configuration can be checked)
    cf.add_argument("--data-dir", metavar="DIR", help="data_dir, as `run --data-dir`")
    cf.add_argument("--kafka", metavar="BOOTSTRAP", help="kafka.bootstrap, as `run --kafka`")
    cf.add_argument("--http", metavar="HOST:PORT", help="daemon.http, as `run --http`")
    cf.add_argument("--role", choices=[r.name for r in ROLE_TABLE],
                    help="check it as `fleetwatch ROLE` does (that role's own checks, e.g. an agent's NVML), not "
                         "as `run` does")

    def data_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", metavar="FILE", help="TOML config file (see docs/configuration.md)")
        sp.add_argument("--data-dir", metavar="DIR", help="the daemon's data_dir")

    tp = sub.add_parser("topics", help="Kafka topics: create or update every topic once (as a user with the Create "
                                       "right; the roles then need none)")
    tp_sub = tp.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    tc = tp_sub.add_parser("create", help="create the missing topics, set retention, cleanup and min.insync.replicas "
                                          "of the existing ones; prints what it did")
    tc.add_argument("--config", metavar="FILE", help="TOML config file (see docs/configuration.md)")
    tc.add_argument("--kafka", metavar="BOOTSTRAP", help="Kafka at host:port (kafka.bootstrap)")
    ta = tp_sub.add_parser("acls", help="print the kafka-acls.sh commands that give each role's user exactly the "
                                        "rights it needs (docs/kafka.md#users-and-acls)")
    ta.add_argument("roles", nargs="*", metavar="ROLE", help="the roles (default: every one)")
    ta.add_argument("--principal", default="User:fleetwatch-{role}", metavar="PRINCIPAL",
                    help="the user of each role; {role} is its name (default: User:fleetwatch-{role})")
    ta.add_argument("--config", metavar="FILE", help="TOML config file: its kafka.topic_prefix and kafka.bootstrap")
    ta.add_argument("--kafka", metavar="BOOTSTRAP", help="Kafka at host:port (kafka.bootstrap), for the commands")
    ta.add_argument("--json", action="store_true", help="the rights as JSON: role -> [{operation, resource, name, "
                                                        "pattern}]")

    si = sub.add_parser("silence", help="mute matching alerts for a while (add, list, expire)")
    si_sub = si.add_subparsers(dest="silence_command", required=True, metavar="ACTION")
    sa = si_sub.add_parser("add", help="add a silence; prints its id and when it ends")
    data_dir(sa)
    sa.add_argument("-m", "--matcher", action="append", default=[], metavar="MATCHER", required=True,
                    help="LABEL=VALUE, LABEL!=VALUE, LABEL=~REGEX or LABEL!~REGEX; repeat: all must match")
    sa.add_argument("--duration", default="2h", metavar="DURATION", help="90s, 30m, 2h, 1d or seconds (default 2h)")
    sa.add_argument("--author", metavar="NAME", help="who silences (default $USER)")
    sa.add_argument("--comment", required=True, metavar="TEXT", help="why, e.g. a ticket number")
    sl = si_sub.add_parser("list", help="the active silences (--all: expired ones too)")
    data_dir(sl)
    sl.add_argument("--all", action="store_true", help="include expired silences")
    se = si_sub.add_parser("expire", help="end a silence now")
    data_dir(se)
    se.add_argument("id", metavar="ID", help="the silence's id, or a unique prefix of it")

    al = sub.add_parser("alerts", help="the alerts firing now and those resolved lately")
    data_dir(al)
    al.add_argument("--status", choices=("active", "resolved", "all"), default="all", help="default all")
    al.add_argument("--site", metavar="S")
    al.add_argument("--rack", metavar="R")
    al.add_argument("--node", metavar="N")
    al.add_argument("--severity", choices=SEVERITIES)
    al.add_argument("--since", default="24h", metavar="DURATION",
                    help="leave out alerts resolved longer ago than this (default 24h; 0 = no limit)")
    al.add_argument("--limit", type=int, default=50, metavar="N", help="show at most N alerts (default 50)")
    al.add_argument("--json", action="store_true", help="a JSON array of Alertmanager alert objects")
    capacity.add_parser(sub)
    report.add_parser(sub)

    rm = sub.add_parser("remediation", help="the remediation role's cases: `remediation status` (the role itself "
                                           "is `fleetwatch remediate`)")
    rm_acts = rm.add_subparsers(dest="remediation_command", metavar="ACTION", required=True)
    rs = rm_acts.add_parser("status", help="open cases and their states, the circuit breaker, what the guardrails "
                                           "refused (as of the role's last round)")
    data_dir(rs)
    rs.add_argument("--json", action="store_true", help="as JSON")

    qu = sub.add_parser("query", help="SQL over the archive with DuckDB: a view per dataset (gpu_samples, alerts, "
                                      "...); docs/queries.md has ready ones")
    data_dir(qu)
    qu.add_argument("sql", metavar="SQL", help="the query, e.g. \"select alertname, count(*) from alerts group by 1\"; "
                                              "- reads it from standard input")
    qu.add_argument("--format", choices=QUERY_FORMATS, default="table", help="default table")
    qu.add_argument("--out", metavar="FILE", help="write the result here (parquet needs it); default standard output")
    return p


def _action_data_dir(sp: argparse.ArgumentParser) -> None:
    """A role action's --config and --data-dir (SUPPRESS: an action's absent flag keeps the role's)."""
    sp.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML config file")
    sp.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS, help="the daemon's data_dir")


def archive_actions(ar: argparse.ArgumentParser) -> None:
    """`fleetwatch archive ACTION`: the archive's upkeep. Without an action, `fleetwatch archive`
    runs the role itself."""
    acts = ar.add_subparsers(dest="archive_command", metavar="ACTION", required=False,
                             help="without one: run the archive role")
    cp = acts.add_parser("compact", help="merge each closed hour's small files into one per source partition, "
                                         "while the daemon runs (docs/data.md#compaction-and-retention)")
    _action_data_dir(cp)
    cp.add_argument("--after", metavar="DURATION", help="only hours that ended this long ago (default "
                                                         "archive.compact_after_s; 0: every hour, a late file is "
                                                         "merged at the next pass)")
    pr = acts.add_parser("prune", help="delete the hours past their dataset's retention (archive.retention_days_*)")
    _action_data_dir(pr)
    pr.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    st = acts.add_parser("stats", help="files, rows and bytes per dataset and day, bytes per metric value")
    _action_data_dir(st)
    st.add_argument("--json", action="store_true", help="one object per dataset and day")


def power_actions(pw: argparse.ArgumentParser) -> None:
    """`fleetwatch power ACTION`: the power role's requests. Without an action, `fleetwatch power`
    runs the role itself."""
    acts = pw.add_subparsers(dest="power_command", metavar="ACTION", required=False,
                             help="without one: run the power role")
    rq = acts.add_parser("request", help="ask the site to shed power for a while; prints the id and what happens")
    _action_data_dir(rq)
    rq.add_argument("--site", metavar="S", help="the site (default fleet.site)")
    rq.add_argument("--racks", metavar="R[,R...]", help="only these racks (default the whole site)")
    goal = rq.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-kw", type=float, metavar="KW", help="hold the covered power at or under this")
    goal.add_argument("--reduction-kw", type=float, metavar="KW", help="shed this much from the baseline")
    goal.add_argument("--reduction-pct", type=float, metavar="PCT", help="shed this share of the baseline")
    rq.add_argument("--start", default="now", metavar="WHEN", help="now (default), +5m (from now) or an RFC 3339 "
                    "time (2026-12-01T18:00:00Z)")
    rq.add_argument("--duration", required=True, metavar="DURATION", help="how long it holds: 90s, 10m, 1h")
    rq.add_argument("--ramp", default="30s", metavar="DURATION", help="deadline to reach the target (default 30s)")
    rq.add_argument("--id", metavar="ID", help="the request's id (default: made up)")
    st = acts.add_parser("status", help="every request, its state (rejected: why) and its live numbers")
    _action_data_dir(st)
    st.add_argument("--json", action="store_true", help="as JSON")
    ca = acts.add_parser("cancel", help="end a request now: its caps are restored in steps")
    _action_data_dir(ca)
    ca.add_argument("id", metavar="ID", help="the request's id, or a unique prefix of it")
    rp = acts.add_parser("report", help="each request that is over, from the archive (power_requests)")
    _action_data_dir(rp)
    rp.add_argument("--json", action="store_true", help="a JSON array of the rows")


def _overrides(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if getattr(args, "seed", None) is not None:
        o.setdefault("fleet", {})["seed"] = args.seed
    if getattr(args, "log_level", None):
        o.setdefault("daemon", {})["log_level"] = args.log_level
    if getattr(args, "log_format", None):
        o.setdefault("daemon", {})["log_format"] = args.log_format
    if getattr(args, "data_dir", None) is not None:  # --data-dir "" is a mistake to report, not the default
        o["data_dir"] = args.data_dir
    if getattr(args, "kafka", None):
        o.setdefault("kafka", {})["bootstrap"] = args.kafka
    if getattr(args, "http", None) is not None:
        o.setdefault("daemon", {})["http"] = args.http
    if getattr(args, "speed", None) is not None:
        o.setdefault("fleet", {})["speed"] = args.speed
    for opt in role_options():  # e.g. --replay sets agent.replay and, with `run`, means the NVML agent
        if getattr(args, opt.dest, None):
            section, key = opt.key.split(".")
            o.setdefault(section, {})[key] = opt.value(getattr(args, opt.dest))
            if opt.implies_source and args.command == "run":
                if getattr(args, "source", None) and args.source != opt.implies_source:
                    raise ConfigError(f"{opt.flag} is read by --source {opt.implies_source} only; with --source "
                                      f"{args.source} it would be ignored: drop one of them")
                o.setdefault("daemon", {})["source"] = opt.implies_source
    if getattr(args, "source", None):
        o.setdefault("daemon", {})["source"] = args.source
    for key, value in extra.items():
        section, name = key.split(".")
        o.setdefault(section, {})[name] = value
    return o


def role_options() -> tuple:
    """Every role's command-line options, once each (`run` takes them all)."""
    from pipeline.roles import ROLE_TABLE
    return tuple(dict.fromkeys(o for spec in ROLE_TABLE for o in spec.options))


def _logging(cfg: Config, console: Any = None) -> None:
    """Log lines on stderr, text or JSON, any URL in them redacted; above the console's status line
    (pipeline/logs.py)."""
    configure_logging(cfg.daemon, console)


def _output_file(flag: str, path: str) -> Path:
    """Where a command will write its result: checked before the work starts."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name, e.g. {p / 'out'}")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {path}: the directory {str(p.parent)!r} does not exist; create it first "
                          f"(mkdir -p {p.parent}) or give another path")
    if not os.access(p.parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"{flag} {path}: cannot write there (permission denied); give another path")
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.daemon import run_daemon
    from pipeline.roles import run_roles
    from pipeline.preflight import validate
    cfg = load_config(args.config, overrides=_overrides(args))
    roles = run_roles(cfg) if args.command == "run" else frozenset([args.command])
    validate(cfg, roles, warn=False)  # the roles warn when they start, with logging set up
    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration {args.duration}: must be > 0 seconds")
    try:
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cfg.data_dir):  # nameless: several roles may share the folder
            pass
    except OSError as e:
        raise ConfigError(f"config error: data_dir = {cfg.data_dir!r}: cannot create or write there ({e.strerror}); "
                          f"choose another with --data-dir or FLEETWATCH_DATA_DIR") from None
    from pipeline.sinks.console import Console
    console = Console()  # one terminal owner: the status line and the log handler share it
    _logging(cfg, console)
    try:
        asyncio.run(run_daemon(cfg, args.duration, console=console, roles=roles))
    except Exception as e:
        if cfg.daemon.log_format != "json" or isinstance(e, (BrokenPipeError, ModuleNotFoundError)):
            raise  # main() handles these (a missing module of the agent-only install: status 2)
        # JSON logs stay JSON to the end: the failure as one record (redacted), not bare text
        if isinstance(e, (ConfigError, Unavailable)):
            log.error("%s", e)
            return 2 if isinstance(e, ConfigError) else EX_TEMPFAIL
        log.critical("failed: %r", e, exc_info=True)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.analytics.evaluate import rack_cooling_loss, score, simulate, table
    from pipeline.analytics.remediation_eval import score as remediation_score
    if args.duration <= 0:
        raise ConfigError(f"--duration {args.duration}: must be > 0 seconds")
    extra = {"fleet.speed": 0.0, "fleet.fault_interval_s": args.fault_interval}
    if args.normal:
        extra["fleet.normal"] = args.normal
    cfg = load_config(args.config, overrides=_overrides(args, **extra))
    out = _output_file("--json", args.json) if args.json else None
    _logging(cfg)
    if args.power_requests < 0:
        raise ConfigError(f"--power-requests {args.power_requests}: must be 0 or more")
    if cfg.kafka.bootstrap and (args.power_requests or args.rack_cooling_loss):
        raise ConfigError("--power-requests and --rack-cooling-loss run in-process: leave out --kafka")
    if not cfg.kafka.bootstrap and (args.detect_processes != 1 or args.chaos):
        raise ConfigError("--detect-processes and --chaos need --kafka HOST:PORT (detect processes over Kafka)")
    t0 = time.perf_counter()
    processes = None
    rack_loss = rack_cooling_loss(args.duration) if args.rack_cooling_loss else None
    if cfg.kafka.bootstrap:
        from pipeline.analytics.eval_kafka import simulate_kafka
        run, processes = simulate_kafka(cfg, args.duration, args.detect_processes, args.config, args.chaos)
    else:
        run = simulate(cfg, args.duration, args.power_requests, (rack_loss,) if rack_loss else ())
    wall = time.perf_counter() - t0
    result = score(run)
    result["remediation"] = remediation_score(run, cfg, rack_loss)
    result["seed"] = cfg.fleet.seed
    result["duration_s"] = args.duration
    result["wall_s"] = round(wall, 2)
    print(table(result))
    print("remediation (dry-run): " + ", ".join(f"{k} {v}" for k, v in result["remediation"].items()))
    if "demand_response" in result:
        print("demand response: " + ", ".join(f"{k} {v}" for k, v in result["demand_response"].items()))
    if processes is not None:  # the JSON keeps the in-process run's keys: this goes to the terminal
        struck = {"kill": "killed with SIGKILL", "freeze": "frozen (SIGSTOP, then SIGCONT)"}.get(processes["chaos"])
        print(f"over Kafka at {cfg.kafka.bootstrap}: {processes['detect_processes']} detect processes"
              + (f"; pid {processes['victim']} {struck} half-way: {processes['fenced']} partitions fenced, "
                 f"{processes['restored']} restored from a checkpoint" if processes["victim"] else ""))
    print(f"simulated {args.duration:.0f} s of {run.node_hours * 3600 / args.duration:.0f} nodes in {wall:.1f} s "
          f"({run.gpu_samples / wall:,.0f} GPU samples/s)")
    if out is not None:
        try:
            out.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            print(f"fleetwatch: --json {args.json}: cannot write it ({e.strerror})", file=sys.stderr)
            return 1
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.analytics.replay import replay_csv
    out = _output_file("--out", args.out)
    try:
        n, not_numbers = replay_csv(Path(args.series), out)
    except OSError as e:
        print(f"fleetwatch: --out {args.out}: cannot write it ({e.strerror})", file=sys.stderr)
        return 1
    print(f"scored {n} rows -> {args.out}")
    if not_numbers:
        print(f"{not_numbers.total} of {n} values were not numbers ({not_numbers}); they score 0 and do not "
              f"change the baseline")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for key, typ, default, doc in reference():
            cell = json.dumps(default).replace("|", "\\|")  # a regex's | would end the Markdown cell
            print(f"| `{key}` | {typ} | `{cell}` | {doc} |")
        return 0
    import dataclasses

    from pipeline.preflight import validate
    from pipeline.roles import run_roles
    cfg = load_config(args.config, overrides=_overrides(args))
    # What `fleetwatch run` (or `fleetwatch ROLE`) would refuse, this refuses too: an agent node's config
    # had been checked for run's roles, not the agent's own
    validate(cfg, frozenset([args.role]) if args.role else run_roles(cfg))
    print(json.dumps(_redacted(dataclasses.asdict(cfg)), indent=2))
    return 0


def _redacted(value: Any) -> Any:
    """The config as printed: URLs without credentials and query values."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value


def cmd_topics(args: argparse.Namespace) -> int:
    """`fleetwatch topics create`: every topic, created or brought to the configured settings."""
    if args.topics_command == "acls":
        return _topics_acls(args)
    from pipeline.bus.kafka import KafkaBus
    from pipeline.config import host_port
    cfg = load_config(args.config, overrides=_overrides(args))
    if not cfg.kafka.bootstrap:
        raise ConfigError("fleetwatch topics create: no Kafka given: pass --kafka HOST:PORT or set kafka.bootstrap")
    for address in filter(None, (a.strip() for a in cfg.kafka.bootstrap.split(","))):
        host_port("kafka.bootstrap", address, 9092)
    _logging(cfg)

    async def create() -> list[str]:
        bus = KafkaBus.from_config(cfg.kafka, client_id="fleetwatch-topics")  # TLS files, SASL user and password
        try:
            return await bus.connect(lambda: bus.ensure_topics(update=True))
        finally:
            await bus.producer.stop()  # never started: closes its client
    lines = asyncio.run(create())
    for line in lines:
        print(line)
    refused = [line for line in lines if line.startswith("not created")]
    if refused:
        print(f"fleetwatch: {len(refused)} topics not created: this user may not create topics on {cfg.kafka.bootstrap}",
              file=sys.stderr)
        return 1
    return 0


def _topics_acls(args: argparse.Namespace) -> int:
    """`fleetwatch topics acls`: each role's rights, from the role table (bus/acls.py)."""
    from pipeline.bus.acls import commands, role_acls
    from pipeline.roles import ROLE_SPECS
    cfg = load_config(args.config, overrides=_overrides(args))
    unknown = [r for r in args.roles if r not in ROLE_SPECS]
    if unknown:
        raise ConfigError(f"fleetwatch topics acls: no role {', '.join(map(repr, unknown))}; the roles are "
                          f"{', '.join(ROLE_SPECS)}")
    if "{role}" not in args.principal and len(args.roles) != 1:
        raise ConfigError(f"fleetwatch topics acls: --principal {args.principal!r} would give every role the same "
                          f"user, and so every role's rights; put {{role}} in it, or name one role")
    specs = [ROLE_SPECS[r] for r in (args.roles or ROLE_SPECS)]
    prefix = cfg.kafka.topic_prefix
    if args.json:
        print(json.dumps({s.name: {"principal": args.principal.format(role=s.name),
                                   "acls": [{"operation": a.operation, "resource": a.resource, "name": a.name,
                                             "pattern": "prefixed" if a.prefixed else "literal"}
                                            for a in role_acls(s, prefix)]} for s in specs}, indent=2))
        return 0
    print("# Each role's user: exactly what it needs (docs/kafka.md#users-and-acls). Create the topics once as an "
          "admin\n# (`fleetwatch topics create`) and run the roles with kafka.create_topics = false.")
    for line in commands(specs, args.principal, prefix, cfg.kafka.bootstrap or "BOOTSTRAP"):
        print(line)
    return 0


def _existing_data_dir(args: argparse.Namespace) -> Path:
    """The configured data_dir, which a daemon must have created: a typo should not go unnoticed."""
    return Path(_existing_config(args).data_dir)


def _existing_config(args: argparse.Namespace) -> Config:
    """The configuration, its data_dir one a daemon has created."""
    return existing_data_dir(load_config(args.config, overrides=_overrides(args)))


def cmd_silence(args: argparse.Namespace) -> int:
    import getpass
    from pipeline.sinks.silences import parse_duration, silence_store, silences_table
    store = silence_store(_existing_data_dir(args))
    now = time.time()
    if args.silence_command == "add":
        author = args.author or os.environ.get("USER") or getpass.getuser()
        s = store.add(args.matcher, parse_duration(args.duration, "--duration"), author, args.comment, now=now)
        ends = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(s.ends_at))
        print(f"silence {s.id} added: mutes {', '.join(map(str, s.matchers))} until {ends}")
    elif args.silence_command == "expire":
        s = store.expire(args.id, now=now)
        print(f"silence {s.id} {'expired' if s.ends_at == now else 'had already expired'}")
    else:
        print(silences_table(store.all() if args.all else store.active(now), now, store.path,
                             expired_too=args.all))
    return 0


def cmd_power(args: argparse.Namespace) -> int:
    """`fleetwatch power request|status|cancel|report`."""
    from pipeline.power.request import MAX_AHEAD_S, Rejected
    from pipeline.power.store import request_store
    from pipeline.power.report import status_doc
    from pipeline.sinks.silences import parse_duration
    if args.power_command == "report":
        return power_report(args)
    store = request_store(_existing_data_dir(args))
    now = datetime.now(timezone.utc)
    if args.power_command == "request":
        cfg = load_config(getattr(args, "config", None), overrides=_overrides(args))
        start: str = args.start.strip()
        if start.startswith("+"):
            try:
                start = (now + timedelta(seconds=parse_duration(start[1:], "--start +"))).isoformat()
            except OverflowError:  # past year 9999: refused as any start too far ahead is (power/request.py)
                raise ConfigError(f"power request rejected: --start {start}: too far ahead; at most "
                                  f"{MAX_AHEAD_S / 86400:g} days ahead are taken") from None
        data = {"site": args.site or cfg.fleet.site, "racks": args.racks or "", "target_kw": args.target_kw,
                "reduction_kw": args.reduction_kw, "reduction_pct": args.reduction_pct, "start": start,
                "duration_s": parse_duration(args.duration, "--duration"), "ramp_s": parse_duration(args.ramp, "--ramp")}
        if args.id:
            data["id"] = args.id
        try:
            entry, req = store.add({k: v for k, v in data.items() if v is not None}, "cli", now)
        except Rejected as why:
            raise ConfigError(f"power request rejected: {why}") from None
        when = "now" if entry.request["start"] == "now" else req.start.strftime("%Y-%m-%d %H:%M:%S UTC")
        print(f"power request {entry.id} stored (pending): {req.goal()} of {req.where()} from {when} for "
              f"{req.duration_s:g} s, reaching it within {req.ramp_s:g} s. The power role judges it against the "
              f"fleet's live state: `fleetwatch power status` shows its verdict and numbers")
    elif args.power_command == "cancel":
        e = store.cancel(args.id, now)
        print(f"power request {e.id}: " + ("cancel asked; the power role restores its caps in steps"
                                           if e.state in ("active", "restoring") else
                                           "cancelled" if e.state == "cancelled" else f"already {e.state}"))
    else:
        doc = status_doc(store)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print(power_table(doc, store.path))
    return 0


def power_table(doc: dict[str, Any], path: Path) -> str:
    """`fleetwatch power status`: one line per request, then the role's view of the site."""
    def kw(x: Any) -> str:
        return "-" if x is None else f"{x:.1f}"
    head = ["ID", "STATE", "WHERE", "GOAL", "START", "HOLD", "BASELINE kW", "ASKED kW", "ACHIEVED kW", "GPUS"]
    rows = []
    for r in doc["requests"]:
        goal = (f"<= {r['target_kw']:g} kW" if r.get("target_kw") is not None else f"-{r['reduction_kw']:g} kW"
                if r.get("reduction_kw") is not None else f"-{r.get('reduction_pct'):g}%")
        where = r["site"] + (f" {r['racks']}" if r.get("racks") else "")
        rows.append([r["id"], r["state"], where, goal, str(r["start"])[:19], f"{r['duration_s']:g}s",
                     kw(r.get("baseline_kw")), kw(r.get("requested_kw")), kw(r.get("achieved_kw")),
                     str(r.get("gpus_capped", "-")), r.get("reason") or r.get("missed") or ""])
    if not rows:
        lines = [f"no power requests (in {path})"]
    else:
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip()
                 + ("  " + x[-1] if len(x) > len(head) and x[-1] else "") for x in [head, *rows]]
        lines.append(f"power requests: {len(rows)} (in {path})")
    role = doc.get("role")
    if role:
        lines.append(f"power role (as of {role['updated']}): site {role['site']} {kw(role.get('site_kw'))} kW, "
                     f"{role['gpus']} GPUs, flexible {kw(role.get('flexible_kw'))} kW"
                     + _firm_line(role.get("firm_kw"), role.get("largest_job"), role.get("jobs"))
                     + f", {role['phase']}"
                     + (", dry run" if role.get("dry_run") else "")
                     + (f"; grid-signal requests rejected: {role['grid_signal_rejected']} (last: "
                        f"{role['grid_signal_last_rejection']})" if role.get("grid_signal_rejected") else "")
                     + _labels_line(role.get("node_labels"))
                     + (f"; {role['slow_readings']}" if role.get("slow_readings") else ""))
    else:
        lines.append("the power role has not run on this data directory yet: requests stay pending until it does")
    return "\n".join(lines)


def _firm_line(firm_kw: float | None, largest: dict | None, jobs: dict | None) -> str:
    """What the site can promise: the flexible capacity without the job that holds the most."""
    if firm_kw is None or largest is None:
        return ""
    unread = jobs is not None and not jobs["reads"]
    return (f" (firm {firm_kw:.1f} kW if {largest['job']} ends or pauses: {largest['gpus']} GPUs, "
            f"{largest['kw']:.1f} kW" + ("; jobs not read yet: each node counts alone" if unread else "") + ")")


def _labels_line(labels: dict | None) -> str:
    """The classes' node labels, where a source is configured: read, or why not."""
    if not labels:
        return ""
    if not labels["read"]:
        return (f"; node labels from {labels['source']} not read yet ({labels['failing'] or 'reading'}): every GPU "
                f"is class 0")
    return (f"; node labels from {labels['source']}: {labels['nodes']} nodes"
            + (f" (the last read failed: {labels['failing']}; the labels before stand)" if labels["failing"] else ""))


def power_report(args: argparse.Namespace) -> int:
    """`fleetwatch power report`: the archived power_requests rows, oldest first."""
    from pipeline.analytics.archive import dataset, place, reading, shown
    from pipeline.model import POWER_REQUEST_REPORT, iso_utc
    from pipeline.power.report import summary
    cfg = load_config(getattr(args, "config", None), overrides=_overrides(args))
    where = place(cfg)
    with reading("power report", where):
        frame = dataset(where, "power_requests")
        # By column name (a later version's files may add columns), without the hive partition columns.
        rows = frame.select(POWER_REQUEST_REPORT.names).sort("ts").collect().to_dicts() if frame is not None else []
    if args.json:
        print(json.dumps(rows, indent=2, default=lambda t: iso_utc(t) if isinstance(t, datetime) else str(t)))
        return 0
    if not rows:
        print(f"no power request archived yet (in {shown(where)}/power_requests): a request is reported when it "
              f"is over")
        return 0
    for r in rows:
        print(f"{r['id']}  {r['state']}{' (dry run)' if r['dry_run'] else ''}  {r['site']}"
              f"{' ' + r['racks'] if r['racks'] else ''}  {str(r['start'])[:19]} -> {str(r['end'])[:19]}: {summary(r)}")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from pipeline.analytics.alerts_table import AlertQuery, query, table
    from pipeline.sinks.silences import parse_duration
    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1")
    since = None if args.since.strip() == "0" else parse_duration(args.since, "--since")
    listing = query(_existing_data_dir(args), AlertQuery(args.status, args.site, args.rack, args.node,
                                                         args.severity, since, args.limit))
    if args.json:
        print(json.dumps(listing.alerts, indent=2))
        if listing.source is None:
            print(table(listing), file=sys.stderr)
    else:
        print(table(listing, shutil.get_terminal_size().columns if sys.stdout.isatty() else None))
    return 0


def cmd_remediation(args: argparse.Namespace) -> int:
    """`fleetwatch remediation status`: from the state the role saved (remediate/status.py)."""
    from pipeline.remediate.status import read, text
    cfg = _existing_config(args)
    status = read(cfg)
    if status is None:
        raise ConfigError(f"no remediation state under {cfg.state_dir}: the remediation role (`fleetwatch run` or "
                          f"`fleetwatch remediate`) has not run with data_dir {cfg.data_dir}")
    print(json.dumps(status, indent=2) if args.json else text(status))
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    """`fleetwatch archive compact|prune|stats`: the archive's upkeep by hand (docs/data.md),
    on local disk or on object storage (archive.url: no data_dir needed there)."""
    from pipeline.analytics.archive import place, reading, shown
    cfg = load_config(args.config, overrides=_overrides(args))
    where = place(cfg)
    if args.archive_command == "stats":
        from pipeline.analytics.archive_stats import stats, text
        with reading("archive stats", where):
            days = stats(where)
        print(json.dumps([d.to_json() for d in days], indent=2) if args.json else text(days))
        return 0
    failed: list[str] = []  # hours a local compaction left as they are
    if cfg.archive.url:
        from pipeline.sinks import delta
        with reading(f"archive {args.archive_command}", where):
            if args.archive_command == "prune":
                line = delta.prune(where, cfg.archive, dry_run=args.dry_run).line(args.dry_run)
            else:
                line = delta.compact(where, after_s=_compact_after(args, cfg)).line()
    elif args.archive_command == "prune":
        from pipeline.sinks.retention import prune
        line = prune(where, cfg.archive, dry_run=args.dry_run).line(args.dry_run)
    else:
        from pipeline.sinks.compaction import compact
        done = compact(where, after_s=_compact_after(args, cfg), min_free_mb=cfg.archive.min_free_mb)
        line, failed = done.line(), done.failed
    print(f"{shown(where)}: {line}")
    for why in failed:
        print(f"fleetwatch archive compact: {why}: that hour is left as it is; move the file away (or restore "
              f"it) and run again", file=sys.stderr)
    return 1 if failed else 0


def _compact_after(args: argparse.Namespace, cfg) -> float:
    from pipeline.sinks.silences import parse_duration
    return (cfg.archive.compact_after_s if args.after is None else 0.0 if args.after.strip() == "0"
            else parse_duration(args.after, "--after"))


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline.analytics.archive import place, reading
    from pipeline.analytics.query import Archive, QueryError, write
    if args.format == "parquet" and not args.out:
        raise ConfigError("--format parquet writes a binary file: give --out FILE")
    out = _output_file("--out", args.out) if args.out else None
    cfg = load_config(args.config, overrides=_overrides(args))
    where = place(cfg)  # (on local disk: the data_dir a daemon made)
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if not sql.strip():
        raise ConfigError("query: no SQL given (an empty string, or nothing on standard input)")
    try:
        with reading("query", where):
            table = Archive.at(where).run(sql)
    except QueryError as e:
        raise ConfigError(f"query: {e}") from None
    write(table, args.format, path=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"eval": cmd_eval, "replay": cmd_replay, "config": cmd_config, "silence": cmd_silence,
               "alerts": cmd_alerts, "topics": cmd_topics,
               "capacity": capacity.cmd_capacity, "query": cmd_query,
               "report": report.cmd_report, "remediation": cmd_remediation}.get(args.command, cmd_run)
    if getattr(args, "power_command", None):
        handler = cmd_power
    if getattr(args, "archive_command", None):
        handler = cmd_archive
    try:
        status = handler(args)
        sys.stdout.flush()  # a reader that went away shows here, not as a message at exit
        return status
    except ConfigError as e:
        _say_failure(args, e)
        return 2
    except Unavailable as e:
        _say_failure(args, e)
        return EX_TEMPFAIL
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in FULL_INSTALL_ONLY:
            return _failed()
        # The agent-only install (pyproject.toml) lacks what detection and the analytics need.
        print(f"fleetwatch: {args.command} needs {e.name}, which the agent-only install leaves out: "
              "pip install 'fleetwatch[all]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if handler is cmd_run:  # the daemon's own failure, not a pager that quit
            return _failed()
        # The reader of the output went away (`fleetwatch alerts | head -1`): stop quietly, with the
        # status of a Unix tool ended by SIGPIPE. Nothing more may reach the closed pipe, not even
        # the interpreter's last flush (Python's docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:
        return _failed()


def _say_failure(args: argparse.Namespace, error: Exception) -> None:
    """What ended the command, on stderr: one JSON object where JSON logs were asked for (a log shipper
    parses every line; --log-format json or FLEETWATCH_DAEMON__LOG_FORMAT), else a line of text."""
    if (getattr(args, "log_format", None) or os.environ.get("FLEETWATCH_DAEMON__LOG_FORMAT", "")) == "json":
        from pipeline.logs import JsonFormatter
        record = logging.LogRecord("fleetwatch", logging.ERROR, __file__, 0, "%s", (error,), None)
        print(JsonFormatter().format(record), file=sys.stderr)
    else:
        print(f"fleetwatch: {redact_text(str(error))}", file=sys.stderr)


def _failed() -> int:
    """A failure while running (status 1): its traceback, with any URL in it redacted."""
    import traceback
    print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
    return 1
