"""capsdist: distributed training of capsule networks (Sabour, Frosst & Hinton 2017)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

__version__ = "0.1.0"


class CapsdistError(Exception):
    """Bad user input (data, config, checkpoint): the message names the problem and the fix."""


@contextmanager
def user_errors() -> Iterator[None]:
    """For CLIs: print a CapsdistError as one paragraph on stderr (no traceback) and exit with status 2."""
    try:
        yield
    except CapsdistError as err:
        print(f"capsdist: error: {err}", file=sys.stderr)
        sys.exit(2)
