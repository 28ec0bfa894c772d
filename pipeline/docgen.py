"""The generated parts of the docs, from the code that is their source of truth:

    alerts    docs/detection.md     the alert table, from the alert catalog (detect/catalog.py)
    runbooks  runbooks/README.md    the runbook index, from the alert catalog
    config    docs/configuration.md the table of every configuration key (config.reference())
    dcgm      docs/collectors.md    the DCGM counters table (sources/dcgm_fields.py)
    inhibit   deploy/alertmanager/alertmanager.yml
                                    the default inhibit rules, as Alertmanager's: the Alertmanager
                                    kind's alerts are inhibited there, not by Fleetwatch

Each sits between `<!-- BEGIN generated: NAME (scripts/update-docs) -->` and
`<!-- END generated: NAME -->` (in YAML, the same words as `#` comments); edit the source,
then run scripts/update-docs (tests run `--check`, which changes nothing and fails on a
stale table).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from pipeline.config import DetectConfig, reference
from pipeline.detect.catalog import ALERTS, INHIBIT_EQUAL, AlertSpec

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


GENERATED = {"alerts": ("docs/detection.md", alerts_table), "runbooks": ("runbooks/README.md", runbook_index),
             "config": ("docs/configuration.md", config_table), "dcgm": ("docs/collectors.md", dcgm_table),
             "inhibit": ("deploy/alertmanager/alertmanager.yml", alertmanager_inhibit_rules)}


def markers(name: str, path: str) -> tuple[str, str]:
    """The lines that open and close the block `name` in the file at `path` (YAML: comments)."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    if path.endswith(".yml"):
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
