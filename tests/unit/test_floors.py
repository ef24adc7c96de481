"""pyproject's dependency floors are the versions scripts/check_floors.sh installs and tests (scripts/floors.txt)."""

from __future__ import annotations

import re

import tomllib
from packaging.version import Version

from tests.conftest import REPO


def test_every_floor_in_pyproject_is_the_tested_one() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for requirement in declared:
        match = re.match(r"^([\w-]+)(\[[\w,]+\])?>=([\w.]+)", requirement)
        assert match, f"{requirement}: every dependency needs a tested floor (>=)"
        floors[match.group(1).lower()] = match.group(3)
    tested = dict(
        line.lower().split("==")
        for line in (REPO / "scripts" / "floors.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {name: Version(v) for name, v in tested.items()} == {name: Version(v) for name, v in floors.items()}
