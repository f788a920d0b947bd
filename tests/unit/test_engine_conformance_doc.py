"""The committed engine conformance table (``docs/engine_conformance.json``, `tooling.engine_conformance`) covers
every architecture of the conformance matrix (`tooling.model_matrix.ARCHS`) and says what it measured: a row
per architecture, ``match`` only within the stated bound, a reason for every engine that did not run. Re-run
``python -m tooling.engine_conformance docs/engine_conformance.json`` after adding an architecture."""

from __future__ import annotations

import json
from pathlib import Path

from tooling.model_matrix import ARCHS

DOC = Path(__file__).resolve().parents[2] / "docs" / "engine_conformance.json"


def test_every_matrix_architecture_has_one_row():
    rows = json.loads(DOC.read_text())["rows"]
    assert sorted(r["arch"] for r in rows) == sorted(ARCHS), "re-run python -m tooling.engine_conformance"


def test_rows_are_consistent_with_the_bound():
    doc = json.loads(DOC.read_text())
    for r in doc["rows"]:
        assert r["status"] in ("match", "mismatch", "engine failed"), r
        if r["status"] == "engine failed":
            assert r["error"], r
        else:
            assert r["tokens"] > 0 and (r["mean_abs_nats"] <= doc["match_nats"]) == (r["status"] == "match"), r
