"""Every alert the code can raise has a runbook page, and every XID the catalog maps is in its table."""

from __future__ import annotations

import re

import pytest

from pipeline.detect.catalog import ALERTS, XID_ALERTS, runbook_url
from tests.conftest import REPO


def test_every_alertname_has_a_runbook_with_the_sections_on_call_needs():
    for spec in ALERTS:
        page = REPO / "runbooks" / f"{spec.name}.md"
        assert page.exists(), f"alert {spec.name} has no runbook: write runbooks/{spec.name}.md"
        text = page.read_text()
        assert text.startswith(f"# {spec.name}\n")
        for section in ("## What it means", "## Likely causes", "## How to confirm", "## What to do",
                        "## When to escalate"):
            assert section in text, f"runbooks/{spec.name}.md lacks '{section}'"
        assert spec.severity in text.split("\n", 3)[2]


def test_no_runbook_without_an_alert():
    names = {s.name for s in ALERTS}
    pages = {p.stem for p in (REPO / "runbooks").glob("*.md")} - {"README"}
    assert pages == names


def test_xid_table_agrees_with_the_catalog():
    index = (REPO / "runbooks" / "README.md").read_text()
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \|[^|]*\| (\w+) \|", index, re.M)}
    for xid, alert in XID_ALERTS.items():
        assert rows.get(xid) == alert, f"XID {xid}: runbooks/README.md says {rows.get(xid)}, code says {alert}"
    for xid, alert in rows.items():
        assert alert == XID_ALERTS.get(xid, "GpuXid"), f"XID {xid} row names {alert}"


def test_the_readme_explains_every_alert():
    detection = (REPO / "docs" / "detection.md").read_text()  # the README's Detection section, moved to docs/
    missing = [spec.name for spec in ALERTS if f"`{spec.name}`" not in detection]
    assert missing == [], f"docs/detection.md's table does not explain {missing}"


@pytest.mark.parametrize("base, url", [
    ("https://wiki.example/fleetwatch/runbooks/", "https://wiki.example/fleetwatch/runbooks/GpuXid.md"),
    ("https://wiki.example/fleetwatch/runbooks", "https://wiki.example/fleetwatch/runbooks/GpuXid.md"),  # (had
    # been .../runbooksGpuXid.md: every page's link dead)
    ("https://wiki.example/view?page=", "https://wiki.example/view?page=GpuXid.md"),
])
def test_a_runbook_link_is_the_base_url_s_page_whether_or_not_it_ends_in_a_slash(base, url):
    assert runbook_url(base, "GpuXid") == url
