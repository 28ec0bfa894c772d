"""End-to-end tests: they start `fleetwatch` processes, brokers (Kafka, Mosquitto, Alertmanager
from tests/services.py) or mount a tmpfs. Everything collected under tests/e2e/ is marked `slow`,
so `pytest -m "not slow"` runs the unit tier alone."""

from __future__ import annotations

from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection
def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def broker():
    """A Kafka broker for the module's tests (a module that needs its own settings defines its own)."""
    from tests.services import KafkaBroker
    b = KafkaBroker().start()
    yield b
    b.close()
