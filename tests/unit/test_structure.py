"""The code's shape: one-way imports between layers, README's layout tree matching the files, small modules."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

HEAVY = ("pytorch_lightning", "lightning", "wandb", "webdataset")


def loaded_after(module: str) -> set[str]:
    """Which of the heavy packages a fresh interpreter has imported after ``import module``."""
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    cmd = [sys.executable, "-c", code]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["capsdist.model", "capsdist.routing", "capsdist.losses", "capsdist.checkpoint"])
def test_model_layer_imports_no_lightning_wandb_or_webdataset(module: str) -> None:
    assert loaded_after(module) == set()


@pytest.mark.parametrize("module", ["data_prep.multimnist", "data_prep.mnist"])
def test_data_tools_import_no_lightning_or_wandb(module: str) -> None:
    assert not loaded_after(module) & {"pytorch_lightning", "lightning", "wandb"}


def test_the_documented_import_check_passes() -> None:
    """The issue's one-liner, verbatim, for the model and the shard tool."""
    for module in ("capsdist.model", "data_prep.multimnist"):
        code = f"import {module}, sys; assert 'pytorch_lightning' not in sys.modules and 'wandb' not in sys.modules"
        subprocess.run([sys.executable, "-c", code], env=subprocess_env(), check=True, timeout=120)


def test_training_cli_loads_without_wandb() -> None:
    """`--wandb_mode disabled` never needs wandb: the CLI modules import without it."""
    assert "wandb" not in loaded_after("capsdist.train")


def test_capsdist_never_imports_data_prep() -> None:
    """One direction: the command-line data tools (capsdist.prep, data_prep) import capsdist, never the reverse."""
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "capsdist").rglob("*.py")
        if re.search(r"^\s*(from|import) data_prep\b", path.read_text(), re.M)
        or ("prep" not in path.parts and re.search(r"^\s*(from|import) capsdist\.prep\b", path.read_text(), re.M))
    ]
    assert offenders == []


def test_no_source_file_over_400_lines() -> None:
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines())
        for folder in ("capsdist", "data_prep", "tests", "scripts")
        for p in (REPO / folder).rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_readme_layout_lists_every_module() -> None:
    """README's Layout tree names every .py file under capsdist/ and data_prep/, and no file that does not exist."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    tree = section.split("```text\n", 1)[1].split("```", 1)[0]
    listed, stack = set(), []
    for line in tree.splitlines():
        match = re.match(r"^([│├└─ ]*)([\w./-]+)", line)
        if not match or not match.group(2):
            continue
        depth = len(match.group(1)) // 4
        name = match.group(2)
        stack[depth:] = [name.rstrip("/")]
        if name.endswith(".py"):
            listed.add("/".join(stack))
    actual = {str(p.relative_to(REPO)) for folder in ("capsdist", "data_prep") for p in (REPO / folder).rglob("*.py")}
    assert sorted(actual - listed) == [], "add these files to README's Layout tree"
    assert sorted(name for name in listed if not (REPO / name).is_file()) == [], "README's tree names missing files"
