"""The model layer, pure torch: CapsNet, its layers, routing, losses, metrics and the plain reference formulation.

It imports nothing of capsdist above it (no Lightning, no data, no training code)."""

from capsdist.model.capsnet import CapsLayer, CapsNet, CapsOutput, Decoder, PrimaryCaps

__all__ = ["CapsLayer", "CapsNet", "CapsOutput", "Decoder", "PrimaryCaps"]
