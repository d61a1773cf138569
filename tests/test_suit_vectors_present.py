"""The SUIT conformance vectors must be there: without ../shared every test in
test_suit_vectors.py is skipped, and under CI=true that is a failure, not a green run that
checked nothing."""

from __future__ import annotations

from tests.support import missing
from tests.test_suit_vectors import INDEX, VECTORS


def test_vectors_are_present() -> None:
    if not INDEX:
        missing(f"SUIT vectors ({VECTORS / 'index.json'})")
    assert len(INDEX) > 0
