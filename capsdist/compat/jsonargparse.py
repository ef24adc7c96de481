"""jsonargparse's private API, in one place: its YAML loader, which capsdist wraps with size and alias bounds
(capsdist.training.config.bounded_yaml_load). Canary: tests/unit/test_compat.py."""

from __future__ import annotations

from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

__all__ = ["get_yaml_default_loader", "yaml_load"]
