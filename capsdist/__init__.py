"""capsdist: distributed training of capsule networks (Sabour, Frosst & Hinton 2017)."""

__version__ = "0.1.0"
