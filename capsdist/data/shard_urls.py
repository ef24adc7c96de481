"""What a shard setting opens: webdataset's expansion (``::`` lists, ``${VAR}`` from ``$WDS_VAR``, braces), bounded
and checked, and the opener.

webdataset expands ``{a,b}`` braces and splits ``::`` *before* it opens anything, and opens ``pipe:`` with a shell:
a check of the raw string (``startswith("pipe:")``) is not a check of what runs. ``shard_urls`` is the one
expansion, used both to check a setting (``local_only``: settings read from a file may name local files only) and
to open it, so what is checked is exactly what is opened. Brace ranges are sized before they are expanded
(``braceexpand`` materialises a range: ``x{0..999999999}`` took all memory).
"""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Sequence
from math import prod
from pathlib import Path
from typing import Any

import braceexpand

from capsdist.core.shipped import data_tool
from capsdist.data.batch import DataError

SHARD_SUFFIXES = ("*.tar", "*.tar.gz", "*.tgz")  # what a directory of shards is globbed for
URL_TIMEOUT = 60.0  # seconds to connect to / stall on an http(s) shard (webdataset's curl retries for ~16 min)
MAX_URLS = 1_000_000  # shard names one setting may expand to (60M MultiMNIST samples are 60,000 shards of 1,000)
_VAR = re.compile(r"\$\{(\w+)\}")  # webdataset's envsubst: ${NAME} is $WDS_NAME
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(\.\.-?\d+)?")


def is_local(url: str) -> bool:
    """Whether ``open_shard`` opens ``url`` as a local file: not a ``pipe:`` command nor a ``scheme://`` URL."""
    return not (url.startswith("pipe:") or "://" in url)


def _most_names(pattern: str) -> int:
    """An upper bound of the names ``braceexpand(pattern)`` yields, without expanding it: the product, over every
    brace group, of its alternatives (a ``{a..b}`` range: its length)."""
    sizes, stack = [], []
    for pos, char in enumerate(pattern):
        if char == "{":
            stack.append(pos)
        elif char == "}" and stack:
            body = pattern[stack.pop() + 1 : pos]
            numbers = _RANGE.fullmatch(body)
            if numbers:
                sizes.append(abs(int(numbers[2]) - int(numbers[1])) + 1)
            else:  # alternatives (nested groups' commas count too: still a bound), or a character range {a..z}
                sizes.append(128 if ".." in body else body.count(",") + 1)
    return prod(sizes)


def _substitute(url: str) -> str:
    """webdataset's ``${NAME}`` -> ``$WDS_NAME`` substitution, repeated up to 10 times as it does."""
    for _ in range(10):
        last, url = url, _VAR.sub(lambda m: os.environ.get("WDS_" + m[1], m[0]), url)
        if url == last:
            break
    return url


def shard_urls(spec: str | Sequence[str] | None, local_only: bool = False, origin: str = "") -> list[str]:
    """Every URL a shard setting names, as webdataset expands it; ``local_only`` refuses any that is not a local
    path (``origin`` says where the setting came from, for the message)."""
    specs = [spec] if isinstance(spec, str) else list(spec or [])
    urls: list[str] = []
    for s in specs:
        for part in str(s).split("::"):
            part = _substitute(part)
            if len(urls) + _most_names(part) > MAX_URLS:
                raise DataError(
                    f"the shard setting {str(s)[:200]!r} expands to more than {MAX_URLS:,} shard names. Fix: name "
                    "fewer, larger shards (a directory or a brace range such as DIR/train-{000000..000059}.tar)."
                )
            urls.extend(braceexpand.braceexpand(part))
    remote = [u for u in urls if not is_local(u)] if local_only else []
    if remote:
        raise DataError(
            f"{origin or 'a setting read from a file'} names {remote[0]!r} (from {str(spec)[:200]!r}): settings "
            "read from a file (a checkpoint, weights metadata) may name local files only, never a pipe: command "
            "or a URL, which would run or fetch here. Fix: pass the shards yourself on the command line or in "
            "your --config (a pipe: command or URL you give is honoured)."
        )
    return urls


def expand_shards(
    spec: str | Sequence[str] | None, name: str = "train_shards/val_shards", writer: str | None = None
) -> list[str]:
    """Shard URLs from paths, directories (their *.tar), brace patterns, URLs and ``pipe:`` commands; ``writer``:
    what writes such shards, for the messages (default: capsdist's MultiMNIST tool)."""
    writer = writer or f"`{data_tool('multimnist')} --out DIR ...`"
    urls: list[str] = []
    for url in shard_urls(spec):
        if not is_local(url):
            urls.append(url)
        elif Path(url).is_dir():
            urls.extend(sorted(str(p) for pattern in SHARD_SUFFIXES for p in Path(url).glob(pattern)))
        elif Path(url).is_file():
            urls.append(url)
        else:
            raise DataError(
                f"shard {url!r} (from {spec!r}) does not exist. Fix: point {name} at shards written by {writer} (a "
                "directory, a brace pattern such as DIR/train-{000000..000059}.tar, a URL or a pipe: command)."
            )
    if not urls:
        where = "no shard setting was given" if spec is None else f"no shards in {spec!r}"
        raise DataError(
            f"{where}. Fix: set {name} (--data.{name}) to shard files, a directory of them or a "
            f"brace pattern; create them with {writer}."
        )
    return urls


def open_shard(url: str) -> Any:
    """A binary stream of one shard: a local file, http(s) with a timeout (no endless retries), else webdataset's
    gopen (``pipe:`` commands, s3://, gs://; only ever from the user's own settings, see ``shard_urls``)."""
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=URL_TIMEOUT)
    if not is_local(url):
        from webdataset.gopen import gopen  # webdataset (heavy) only for remote shards

        return gopen(url, "rb")
    return open(url, "rb")
