"""The programs' start (capsdist.core.startup): the entry points import nothing heavy until they run, and then
import with the cyclic garbage collector paused and freeze what the imports made."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from capsdist.core.startup import program
from tests.unit.test_public_api import modules_loaded_after

ENTRY_POINTS = ["capsdist.train", "capsdist.evaluate", "capsdist.figures", "capsdist.report", "capsdist.pretrained",
                "capsdist.bench.__main__"]  # fmt: skip


@pytest.fixture
def fake_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module whose import records whether the collector ran and whose main records its argv."""
    (tmp_path / "fake_capsdist_program.py").write_text(
        "import gc\nSEEN = {'collector_on_at_import': gc.isenabled()}\n"
        "def main(argv):\n    SEEN['argv'] = argv\n    SEEN['collector_on_in_main'] = gc.isenabled()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fake_capsdist_program"
    sys.modules.pop("fake_capsdist_program", None)


def test_a_program_imports_with_the_collector_paused_then_runs_with_it(fake_program: str) -> None:
    assert gc.isenabled()
    frozen_before = gc.get_freeze_count()
    program(fake_program)(["--flag"])
    seen = sys.modules[fake_program].SEEN
    assert seen == {"collector_on_at_import": False, "argv": ["--flag"], "collector_on_in_main": True}
    assert gc.isenabled() and gc.get_freeze_count() > frozen_before  # the imported objects left the collections


def test_a_failing_import_leaves_the_collector_on(fake_program: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        program("no_such_capsdist_program")([])
    assert gc.isenabled()


def test_entry_points_import_nothing_heavy_before_they_run() -> None:
    """`python -m` and the console scripts import these modules first: the seconds of imports must come later,
    inside main, where the collector is paused (and, for training, after the job's signal handlers)."""
    assert modules_loaded_after("; ".join(f"import {m}" for m in ENTRY_POINTS)) == set()
