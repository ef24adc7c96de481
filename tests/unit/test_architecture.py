"""The code's shape as a checked contract: import-linter's layers, no cycles, pure lower layers (pyproject's
[tool.importlinter]); the model imports no heavy package at run time either; an import inside a function says why."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

HEAVY = ("pytorch_lightning", "lightning", "wandb", "webdataset")


def test_import_contracts_hold() -> None:
    """`lint-imports` (the contracts in pyproject.toml), as CI runs it: every contract kept."""
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"  # = the lint-imports script
    out = subprocess.run([sys.executable, "-c", command], cwd=REPO, env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", out.stdout), out.stdout[-2000:]


def loaded_after(module: str) -> set[str]:
    """Which of the heavy packages a fresh interpreter has imported after ``import module``."""
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


PURE = ["capsdist.model", "capsdist.routing", "capsdist.checkpoint.sharded", "capsdist.parallel.capsule_parallel"]


@pytest.mark.parametrize("module", PURE)
def test_pure_layers_import_no_lightning_wandb_or_webdataset(module: str) -> None:
    assert loaded_after(module) == set()


@pytest.mark.parametrize("module", ["data_prep.multimnist", "data_prep.mnist"])
def test_data_tools_import_no_lightning_or_wandb(module: str) -> None:
    assert not loaded_after(module) & {"pytorch_lightning", "lightning", "wandb"}


def test_training_cli_loads_without_wandb() -> None:
    """`--wandb_mode disabled` never needs wandb: the CLI modules import without it."""
    assert "wandb" not in loaded_after("capsdist.train")


def test_capsdist_never_imports_data_prep() -> None:
    """One direction: the checkout's data_prep aliases import capsdist, never the reverse."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "capsdist").rglob("*.py")
                 if re.search(r"^\s*(from|import) data_prep\b", p.read_text(), re.M)]  # fmt: skip
    assert offenders == []


def test_an_import_inside_a_function_says_why() -> None:
    """No import inside a function unless it defers a heavy optional dependency, with a comment saying so (on its
    line or the line above): imports inside functions once hid a 10-file circle."""
    silent = []
    for path in (REPO / "capsdist").rglob("*.py"):
        lines = path.read_text().splitlines()
        for func in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2]
                    if "#" not in here and not above.strip().startswith("#"):
                        silent.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert silent == []


def test_private_apis_only_in_their_seam() -> None:
    """Private attributes of Lightning objects and private modules of Lightning, W&B, DCP and jsonargparse appear in
    capsdist/compat/ only."""
    patterns = [
        r"\b(trainer|fit_loop|epoch_loop|strategy|logger)\._[a-z]",
        r"_logger_connector|_checkpoint_connector|_log_hyperparams|\._experiment\b|\._ddp_kwargs",
        r"\bdef _setup_model\b|\bdef _update\b|\bdef _parse_ckpt_path\b",
        r"jsonargparse\._|wandb\.sdk|torch\.distributed\._shard|_StorageInfo|_MEM_FORMAT_ENCODING|_get_layout",
    ]
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in (REPO / "capsdist").rglob("*.py") if "compat" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if not line.lstrip().startswith("#") and any(re.search(p, line.split("#")[0]) for p in patterns)
    ]  # fmt: skip
    assert offenders == []
