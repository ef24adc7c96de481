"""jsonargparse's private API, in one place: its YAML loader, which capsdist wraps with size and alias bounds
(capsdist.training.config.bounded_yaml_load), and the parser internals the short usage errors read (the option
strings, jsonargparse's ``error(message, ex)``). Canary: tests/unit/test_compat.py."""

from __future__ import annotations

import difflib
import re
import sys
from typing import IO, Any, NoReturn

from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

__all__ = ["ShortUsageErrors", "get_yaml_default_loader", "option_strings", "yaml_load"]

WRITTEN_FOR = "4.53.0"
UNKNOWN = "unrecognized arguments: "  # jsonargparse's message for flags no parser takes
# a value outside its choices: argparse's for a subcommand, jsonargparse's for a Literal setting (--data.source)
_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)|Literal\[(.*)\]\. Got value: (\S+)")
_KEY = re.compile(r"does not accept option '([^']*)'")  # a key of a --config file no parser takes
MAX_USAGE_LINES = 4  # a longer usage (a subcommand's lists every flag: 96 lines for `fit`) is folded


def option_strings(parser: Any) -> list[str]:
    """Every option string ``parser`` takes (argparse's ``_option_string_actions``): ``--data.batch_size``, ..."""
    return list(parser._option_string_actions)


def closest(word: str, candidates: list[str]) -> list[str]:
    """The ``candidates`` closest to ``word``: difflib's best match (ratio >= 0.6) and any as close as it."""
    ratios = {c: difflib.SequenceMatcher(None, word, c).ratio() for c in candidates}
    best = max(ratios.values(), default=0.0)
    return [c for c, r in sorted(ratios.items(), key=lambda cr: -cr[1]) if r >= max(0.6, best - 0.02)][:3]


def suggestion(message: str, parser: Any) -> str:
    """The "did you mean ...?" line for what a parser error names as unknown: flags, a config file's key, a
    subcommand or a setting's value; "" when nothing valid is close."""
    flags = option_strings(parser)
    if message.startswith(UNKNOWN):
        words = [word.split("=", 1)[0] for word in message[len(UNKNOWN) :].split() if word.startswith("-")]
        pairs = [(word, closest(word, flags)) for word in words]
    elif key := _KEY.search(message):  # a config file's key: suggest keys, not flags
        pairs = [(key[1], closest(key[1], [flag.removeprefix("--") for flag in flags]))]
    elif choice := _CHOICE.search(message):
        word, among = (choice[1], choice[2]) if choice[1] is not None else (choice[4], choice[3])
        pairs = [(word, closest(word, re.findall(r"'([^']*)'", among)))]
    else:
        return ""
    hints = [f"{' or '.join(found)}{f' (for {word})' if len(pairs) > 1 else ''}" for word, found in pairs if found]
    return f"did you mean {', '.join(hints)}?" if hints else ""


class ShortUsageErrors:
    """Mixin for a jsonargparse parser: a usage error is a few lines (the usage folded to its first line when it
    would list every flag) and names the closest valid flag or subcommand; ``--help`` is unchanged."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """jsonargparse's error (usage, tip, message, exit 2) with "did you mean" added to the message."""
        parser = getattr(ex, "subcommand_parser", None) or self  # the parser whose usage jsonargparse prints
        hint = suggestion(message, parser) if self.exit_on_error else ""  # type: ignore[attr-defined]
        super().error(f"{message}\n{hint}" if hint else message, ex)  # type: ignore[misc]

    def print_usage(self, file: IO[str] | None = None) -> None:
        """The usage, folded to ``usage: PROG [--OPTION VALUE ...]`` when it would run over MAX_USAGE_LINES."""
        usage = self.format_usage()  # type: ignore[attr-defined]
        if usage.count("\n") > MAX_USAGE_LINES:
            usage = f"usage: {self.prog} [--OPTION VALUE ...]\n"  # type: ignore[attr-defined]
        (file or sys.stdout).write(usage)
