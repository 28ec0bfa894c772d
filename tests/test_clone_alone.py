"""A clone with nothing beside it works: the recording, the runbooks and the schemas
ship in the repository and in the installed package, and nothing reads the folder the
developers' checkout happens to have beside it.

The end-to-end tests (processes, brokers, tmpfs) are in tests/e2e/test_clone_alone.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


from tests.conftest import REPO

# Where a run or a test could reach outside the repository for the data it was built with.
_SIBLING = "sha" + "red"  # spelled apart: this file names the folder only to look for it
_OUTSIDE = re.compile(rf"""\.\./{_SIBLING}|parent\s*/\s*["']{_SIBLING}["']|["']{_SIBLING}["']\s*[,/]\s*["']data""")


def _tracked(*folders: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *folders], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in out if (REPO / f).is_file()]


def test_nothing_reads_shared():
    files = _tracked("pipeline", "tests", "scripts", ".ci", "bench")
    assert len(files) > 50
    offenders = [f"{f.relative_to(REPO)}: {line.strip()}" for f in files if f.suffix != ".md"
                 for line in f.read_text(errors="replace").splitlines()
                 if _OUTSIDE.search(line)]  # this file too: it spells the name apart
    assert offenders == []
