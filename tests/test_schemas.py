"""schemas/ holds every record type, machine-readable and versioned, equal to the code."""

from __future__ import annotations

import json

from pipeline.model import SCHEMAS, schema_files, schema_name, schema_version
from tests.conftest import REPO


def test_schema_files_match_code():
    expected = schema_files(REPO / "schemas")
    on_disk = {str(p): json.loads(p.read_text()) for p in (REPO / "schemas").glob("*.json")}
    assert set(on_disk) == set(expected), "schemas/ has extra or missing files: run scripts/update-schemas"
    for path, doc in expected.items():
        assert on_disk[path] == doc, f"{path} differs from pipeline/model.py: run scripts/update-schemas"


def test_every_schema_is_named_and_versioned():
    for dataset, schema in SCHEMAS.items():
        assert schema_name(schema) and schema_version(schema) >= 1
        for field in schema:
            assert field.metadata and field.metadata[b"doc"], f"{dataset}.{field.name} has no doc"
