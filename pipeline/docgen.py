"""The generated parts of the docs, from the code that is their source of truth:

    alerts    docs/detection.md     the alert table, from the alert catalog (detect/catalog.py)
    runbooks  runbooks/README.md    the runbook index, from the alert catalog
    config    docs/configuration.md the table of every configuration key (config.reference())
    dcgm      docs/collectors.md    the DCGM counters table (sources/dcgm_fields.py)
    inhibit   deploy/alertmanager/alertmanager.yml
                                    the default inhibit rules, as Alertmanager's: the Alertmanager
                                    kind's alerts are inhibited there, not by Fleetwatch
    prometheus docs/operations.md   the table of Prometheus's rules about Fleetwatch, from the catalog
    rules     deploy/prometheus/rules.yml, and as a PrometheusRule in
              deploy/kubernetes/prometheus-operator/prometheusrule.yaml
                                    Prometheus's alerting rules on Fleetwatch's /metrics, from the
                                    catalog's alerts of family "prometheus"

Each sits between `<!-- BEGIN generated: NAME (scripts/update-docs) -->` and
`<!-- END generated: NAME -->` (in YAML, the same words as `#` comments); edit the source,
then run scripts/update-docs (tests run `--check`, which changes nothing and fails on a
stale table).
"""

from __future__ import annotations

import json
import re
import string
import sys
from pathlib import Path

from pipeline.config import DetectConfig, reference
from pipeline.detect.catalog import ALERTS, INHIBIT_EQUAL, RULE_ALERTS, AlertSpec

BEGIN = "<!-- BEGIN generated: {name} (scripts/update-docs) -->"
END = "<!-- END generated: {name} -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def fire_after(spec: AlertSpec) -> str:
    if spec.fire_after is None:
        return "-"
    if isinstance(spec.fire_after, int):
        return "1 (at once)" if spec.fire_after == 1 else str(spec.fire_after)
    return f"`detect.{spec.fire_after}` ({getattr(DetectConfig(), spec.fire_after)})"


def explains(spec: AlertSpec) -> str:
    parts = []
    if spec.suppresses:
        parts.append(f"suppresses {_names(spec.suppresses)}")
    if spec.inhibits:
        parts.append(f"inhibits {_names(spec.inhibits)} (same {', '.join(INHIBIT_EQUAL[spec.scope])})")
    return "; ".join(parts) or "-"


def alerts_table() -> str:
    rows = ["| alert | severity | scope | detector | fires after | explains | how it is detected |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in ALERTS:
        rows.append(f"| `{a.name}` | {a.severity} | {a.scope} | {_cell(a.method)} (`{a.detector}`) | "
                    f"{fire_after(a)} | {explains(a)} | {_cell(a.detection)} |")
    return "\n".join(rows)


def runbook_index() -> str:
    rows = ["| alertname | severity | scope | remediation | meaning | runbook |", "| --- | --- | --- | --- | --- | --- |"]
    for a in ALERTS:
        rows.append(f"| {a.name} | {a.severity} | {a.scope} | {a.remediation} | {_cell(a.meaning)} "
                    f"| [{a.name}.md]({a.name}.md) |")
    return "\n".join(rows)


def prometheus_table() -> str:
    rows = ["| alert | severity | fires when | rule |", "| --- | --- | --- | --- |"]
    for a in RULE_ALERTS:
        pending = f" for {a.pending_for}" if a.pending_for != "0s" else ""
        rows.append(f"| `{a.name}` | {a.severity} | {_cell(a.meaning)} | `{_cell(a.promql)}`{pending} |")
    return "\n".join(rows)


def config_table() -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, typ, default, doc in reference():
        rows.append(f"| `{key}` | {typ} | `{_cell(json.dumps(default))}` | {doc} |")  # a regex's | ends a cell
    return "\n".join(rows)


def dcgm_table() -> str:
    from pipeline.sources.dcgm_fields import counters_table
    return counters_table()


def alertmanager_inhibit_rules() -> str:
    """The default alerts.inhibit_rules (config.DEFAULT_INHIBIT_RULES, from the catalog) in
    Alertmanager's words; its regex matchers are anchored, as Fleetwatch's full matches are."""
    from pipeline.config import DEFAULT_INHIBIT_RULES
    lines = ["inhibit_rules:"]
    for r in DEFAULT_INHIBIT_RULES:
        lines += [f"  - source_matchers: [{json.dumps(f'alertname =~ {json.dumps(r.source)}')}]",
                  f"    target_matchers: [{json.dumps(f'alertname =~ {json.dumps(r.target)}')}]",
                  f"    equal: [{', '.join(r.equal)}]"]
    return "\n".join(lines)


# Where the Prometheus rules point an alert's runbook: this repository's runbooks/, relative, as the rules file
# ships; replace it with where the runbooks are published (alerts.runbook_base_url), as their comment says.
RULES_RUNBOOK_BASE = "runbooks/"


def _go_template(summary: str) -> str:
    """A catalog summary (a format string over labels and `value`) in Prometheus's template language."""
    out = []
    for text, name, _, _ in string.Formatter().parse(summary):
        out.append(text)
        if name is not None:
            out.append("{{ $value }}" if name == "value" else f"{{{{ $labels.{name} }}}}")
    return "".join(out)


def prometheus_rules(indent: int = 0) -> str:
    """The catalog's Prometheus alerts as one rule group, each with the annotations Fleetwatch's own alerts
    carry (summary, description, runbook_url, remediation)."""
    lines = ["groups:", "  - name: fleetwatch", "    rules:"]
    for a in RULE_ALERTS:
        lines += [f"      - alert: {a.name}", f"        expr: {json.dumps(a.promql)}"]
        if a.pending_for != "0s":
            lines.append(f"        for: {a.pending_for}")
        lines += ["        labels:", f"          severity: {a.severity}", "        annotations:",
                  f"          summary: {json.dumps(_go_template(a.summary))}",
                  f"          description: {json.dumps(a.action)}",
                  f"          runbook_url: {json.dumps(RULES_RUNBOOK_BASE + a.name + '.md')}",
                  f"          remediation: {a.remediation}"]
    return "\n".join(" " * indent + line for line in lines)


GENERATED = {"alerts": ("docs/detection.md", alerts_table), "runbooks": ("runbooks/README.md", runbook_index),
             "config": ("docs/configuration.md", config_table), "dcgm": ("docs/collectors.md", dcgm_table),
             "inhibit": ("deploy/alertmanager/alertmanager.yml", alertmanager_inhibit_rules),
             "prometheus": ("docs/operations.md", prometheus_table),
             "rules": ("deploy/prometheus/rules.yml", prometheus_rules),
             "prometheusrule": ("deploy/kubernetes/prometheus-operator/prometheusrule.yaml",
                                lambda: prometheus_rules(indent=2))}


def markers(name: str, path: str) -> tuple[str, str]:
    """The lines that open and close the block `name` in the file at `path` (YAML: comments)."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    if path.endswith((".yml", ".yaml")):
        begin, end = (f"# {m.removeprefix('<!-- ').removesuffix(' -->')}" for m in (begin, end))
    return begin, end


def render(text: str, name: str, content: str, path: str = ".md") -> str:
    """`text` with the block `name` holding `content`; ValueError if its markers are missing."""
    begin, end = markers(name, path)
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"no single '{begin}' ... '{end}' block")
    return pattern.sub(lambda _: f"{begin}\n{content}\n{end}", text)


def update(root: Path, check: bool = False) -> list[str]:
    """Regenerate every block under `root` (only compare, with check); the files that were
    (or, with check, would be) changed."""
    changed = []
    for name, (path, make) in GENERATED.items():
        file = root / path
        text = file.read_text()
        try:
            new = render(text, name, make(), path)
        except ValueError as e:
            raise SystemExit(f"{path}: {e}") from None
        if new != text:
            changed.append(path)
            if not check:
                file.write_text(new)
    return changed


def main(argv: list[str]) -> int:
    check = "--check" in argv
    root = Path(__file__).resolve().parents[1]
    changed = update(root, check)
    if check:
        if changed:
            print(f"stale: {', '.join(changed)}; run scripts/update-docs")
            return 1
        return 0
    print(f"updated: {', '.join(changed)}" if changed else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
