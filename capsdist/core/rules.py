"""Range rules for settings: a bad number is a one-line error naming the flag and the valid range, instead of a
traceback deep in training or a silently wrong run. Each layer declares the rules of its own settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from capsdist.core.errors import CapsdistError

Rule = tuple[Callable[[Any], bool], str]  # (test, what a valid value is)


class ConfigError(CapsdistError):
    """A setting outside its valid range."""


def integer(low: int, high: int | None = None) -> Rule:
    """An integer in [low, high]."""
    valid = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    return (lambda v: type(v) is int and v >= low and (high is None or v <= high)), valid


def real(test: Callable[[float], bool], valid: str) -> Rule:
    """A finite real number passing ``test``."""
    return (lambda v: isinstance(v, int | float) and abs(v) < float("inf") and test(float(v))), valid


def counts(v: Any) -> bool:
    """A list of integers >= 1."""
    return isinstance(v, list | tuple) and all(type(x) is int and x >= 1 for x in v)


def check(section: str, settings: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Raise ConfigError for the first setting outside its rule (None means "unset" and always passes)."""
    for name, (ok, valid) in rules.items():
        value = settings.get(name)
        if value is not None and not ok(value):
            flag = f"{section}.{name}" if section else name
            raise ConfigError(f"--{flag} {value!r} is out of range: it must be {valid}.")
