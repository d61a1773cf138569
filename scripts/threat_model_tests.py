"""Print the test node ids docs/threat-model.md cites, one per line (to run them all):

    .venv/bin/pytest -q -n 2 $(.venv/bin/python scripts/threat_model_tests.py)

A cited id is `test_file.py::name`; an id that starts with `::` continues the file named
before it. Parameters (`name[case]`) are dropped: every case of the test runs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "threat-model.md"


def cited(text: str) -> list[str]:
    ids: set[str] = set()
    current: str | None = None
    for m in re.finditer(r"`(test_[a-z0-9_]+\.py)?(::[A-Za-z0-9_\[\]-]+)?`", text):
        file, name = m.group(1), m.group(2)
        if file:
            current = file
        if name and current:
            ids.add(f"tests/{current}{name.split('[')[0]}")
    return sorted(ids)


if __name__ == "__main__":
    ids = cited(DOC.read_text())
    print("\n".join(ids))
    print(f"{len(ids)} test nodes cited", file=sys.stderr)
