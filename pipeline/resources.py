"""Files that ship inside the package, found the same way in a source checkout and
in an installed wheel: the runbooks, the schemas and the recorded GPUs.

In the repository `runbooks/` and `schemas/` sit at the top (where readers look for
them); the wheel carries them as `pipeline/runbooks` and `pipeline/schemas`
(pyproject.toml maps them). Nothing here reads anything outside the package or the
checkout it came from.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
RECORDINGS = _PACKAGE / "sources" / "recordings"


def _shipped(name: str) -> Path:
    installed = _PACKAGE / name  # inside an installed wheel
    return installed if installed.is_dir() else _PACKAGE.parent / name  # a checkout (editable install)


def runbooks_dir() -> Path:
    return _shipped("runbooks")


def schemas_dir() -> Path:
    return _shipped("schemas")


def recordings() -> list[str]:
    """Names of the shipped NVML recordings (`fleetwatch run --replay NAME`)."""
    return sorted(p.name for p in RECORDINGS.iterdir() if recording_name(p))


def recording_name(folder: Path) -> str | None:
    """The prefix of a recording's files (`h100` for h100_inventory.json, ...; scripts/gpu-check
    --record NAME writes NAME_*); None where the folder holds no inventory or several."""
    found = sorted(folder.glob("*_inventory.json")) if folder.is_dir() else []
    return found[0].name.removesuffix("_inventory.json") if len(found) == 1 else None
