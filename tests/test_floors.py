"""pyproject.toml's floors are exactly the versions of constraints-floor.txt (which .ci/floors tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
_REQ = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(>=|==)\s*([^;\s,]+)\s*(?:;\s*(.*?))?\s*$")


def _parse(lines: list[str], op: str) -> dict[tuple[str, str], str]:
    out = {}
    for line in lines:
        m = _REQ.match(line)
        assert m and m.group(2) == op, f"not one {op} bound: {line!r}"
        out[(m.group(1).lower(), (m.group(4) or "").replace('"', "'"))] = m.group(3)
    return out


def test_pyproject_floors_are_the_floor_constraints() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]
    declared = _parse([*project["dependencies"], *project["optional-dependencies"]["test"]], ">=")
    lines = (_ROOT / "constraints-floor.txt").read_text().splitlines()
    pinned = _parse([ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")], "==")
    assert declared == pinned
