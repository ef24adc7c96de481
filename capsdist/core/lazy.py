"""Packages that name their public API without importing it (PEP 562): ``import capsdist.data.mnist`` or
``capsdist.bench.memory`` must not pull in Lightning through a package ``__init__`` that re-exports everything."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``where[name]`` is the module defining ``name`` (relative to
    ``package`` when it starts with a dot), imported at first use."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    return __getattr__
