"""Squash and routing-by-agreement where users reach them (``from capsdist.routing import dynamic_routing, squash``);
the code lives in capsdist.model.routing."""

from capsdist.model.routing import dynamic_routing, squash

__all__ = ["dynamic_routing", "squash"]
