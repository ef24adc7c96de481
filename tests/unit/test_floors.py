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


def test_the_docker_image_torch_meets_the_floor() -> None:
    """The Dockerfile's pinned torch meets the floor and its base holds no torch of its own (a pytorch/pytorch
    base held 2.7.1 under the floor, so every build installed a second torch)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    floors = dict(line.split("==") for line in (REPO / "scripts" / "floors.txt").read_text().splitlines()
                  if line and not line.startswith("#"))  # fmt: skip
    pinned = re.search(r"^ARG TORCH=torch==([\w.]+)$", dockerfile, re.M)
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert pinned and Version(pinned.group(1)) >= Version(floors["torch"])
    assert base and base.group(1).startswith("python:") and "torch" not in base.group(1)
