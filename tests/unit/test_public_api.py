"""The public API (``from capsdist import CapsNet, CapsNetModule, MnistData, ...``, docs/api.md): every name resolves to
the object its module defines, and ``import capsdist`` stays cheap: no torch, no Lightning until a name is used."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import capsdist
from tests.conftest import subprocess_env


def modules_loaded_after(code: str) -> set[str]:
    """Which of torch and the Lightning packages a fresh interpreter has imported after running ``code``."""
    heavy = ("torch", "pytorch_lightning", "lightning")
    probe = f"import sys; {code}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_import_capsdist_loads_neither_torch_nor_lightning_and_the_model_no_lightning() -> None:
    assert modules_loaded_after("import capsdist") == set()
    assert modules_loaded_after("from capsdist import CapsNet") == {"torch"}


@pytest.mark.parametrize("name", [n for n in capsdist.__all__ if not n.startswith("_")])
def test_every_public_name_is_its_modules_object(name: str) -> None:
    value = getattr(capsdist, name)  # a class or function
    assert getattr(importlib.import_module(value.__module__), value.__name__) is value
    assert name in dir(capsdist)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'capsdist' has no attribute 'CapsNett'"):
        capsdist.CapsNett  # noqa: B018 (the attribute access is the test)
