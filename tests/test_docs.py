"""The docs hold together: every relative link and #anchor in the Markdown pages resolves
(the file exists; the anchor is a heading of that file, slugged as GitHub does), and the
README, the front page, links every page of docs/ and stays short."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import REPO

PAGES = sorted({REPO / "README.md", REPO / "RELIABILITY.md", REPO / "BENCHMARKS.md", REPO / "schemas" / "README.md",
                REPO / "pipeline" / "sources" / "recordings" / "h100" / "README.md",
                *(REPO / "docs").glob("*.md"), *(REPO / "runbooks").glob("*.md")})

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (headings and links inside them are code)."""
    out, fence = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = None if fence else m.group(1)
            continue
        if fence is None:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text, lower-cased, without punctuation
    other than '-' and '_', spaces made '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link (or image) reads as its text
    text = _CODE_SPAN.sub(lambda m: m.group(2).strip(), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis markers, not snake_case
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page has: its headings' slugs (a repeated one gets -1, -2, ...) and
    explicit <a id|name="...">."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in _prose_lines(page.read_text()):
        if m := _HEADING.match(line):
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return found


def links(page: Path) -> list[str]:
    """The targets of every inline link and image of a page, outside code."""
    out = []
    for line in _prose_lines(page.read_text()):
        out += _LINK.findall(_CODE_SPAN.sub("", line))
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in links(page):
        if _SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto, file: not checked here
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        where = f"{page.relative_to(REPO)}: ({target})"
        if REPO not in dest.parents and dest != REPO:
            bad.append(f"{where} leaves the repository")
        elif not dest.exists():
            bad.append(f"{where}: {dest.relative_to(REPO)} does not exist")
        elif anchor:
            if dest.suffix != ".md":
                bad.append(f"{where}: an anchor into something that is not a Markdown file")
            elif unquote(anchor) not in anchors(dest):
                bad.append(f"{where}: no heading of {dest.relative_to(REPO)} has the anchor #{anchor}")
    return bad


def test_github_slugs():
    assert slug("Detection quality (`fleetwatch eval`)") == "detection-quality-fleetwatch-eval"
    assert slug("Never lost: outbox, retries, dead letters") == "never-lost-outbox-retries-dead-letters"
    assert slug("Alert delivery through a 10-minute receiver outage (`bench/alert_outage.py`)") == \
        "alert-delivery-through-a-10-minute-receiver-outage-benchalert_outagepy"
    assert slug("`fleetwatch alerts`") == "fleetwatch-alerts"
    assert slug("Routing: grouping, inhibition, silences") == "routing-grouping-inhibition-silences"
    assert slug("**Bold** and [a link](x.md)") == "bold-and-a-link"


def test_the_checker_finds_what_is_broken(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "a.md").write_text("# A\n\n## Same\n\n## Same\n\n```\n# not a heading\n[x](gone.md)\n```\n"
                                   "[ok](b.md#b-title) [ok](#same-1) [`code`](b.md) [web](https://x/y#z)\n"
                                   "[bad](b.md#nope) [bad](gone.md) [bad](#not-a-heading) `[code](gone.md)`\n")
    (tmp_path / "b.md").write_text("# B title\n")
    assert [b.split(": (")[1].split(")")[0] for b in broken_links(tmp_path / "a.md")] == \
        ["b.md#nope", "gone.md", "#not-a-heading"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    assert page.exists()
    assert broken_links(page) == []


def test_the_readme_is_a_front_page_that_links_every_doc():
    readme = REPO / "README.md"
    targets = {(REPO / t.partition("#")[0]).resolve() for t in links(readme) if not _SCHEME.match(t)}
    docs = sorted((REPO / "docs").glob("*.md"))
    assert len(docs) >= 8
    for page in [*docs, REPO / "RELIABILITY.md", REPO / "BENCHMARKS.md"]:
        assert page.resolve() in targets, f"README's 'Where things are' does not link {page.relative_to(REPO)}"
    size = len(readme.read_bytes())
    assert size < 13_000, f"README.md is {size} bytes: it is the front page, move reference material to docs/"


def test_the_metrics_labels_name_every_role_and_dataset():
    """docs/operations.md's lists of the `role` and `dataset` label values: every role and dataset there is
    (it had missed power, remediate and the power and remediation datasets)."""
    from pipeline.model import SCHEMAS
    from pipeline.roles import ROLES
    text = (REPO / "docs" / "operations.md").read_text()
    roles, datasets = (re.search(rf"`{label}` (?:is|an) [^(]*\(([^)]*)\)", text)[1] for label in ("role", "dataset"))
    assert re.findall(r"`(\w+)`", roles) == list(ROLES)
    assert re.findall(r"`(\w+)`", datasets) == list(SCHEMAS)
