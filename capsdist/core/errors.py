"""The one user-facing error type and how every CLI shows it: one paragraph naming the problem and the fix, exit 2."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


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
    except OSError as err:
        if err.errno not in _WRITE_ERRORS:
            raise
        print(f"capsdist: error: {write_error(err)}", file=sys.stderr)
        sys.exit(2)


_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def write_error(err: OSError) -> str:
    """One paragraph for an output that cannot be written (disk full, quota, read-only, no permission)."""
    return (
        f"cannot write {err.filename or 'an output file'}: {err.strerror}. Fix: free space (or raise the file-size "
        "limit, `ulimit -f`) or choose a writable "
        "folder (--trainer.default_root_dir for training, --out for data_prep and figures); finished files "
        "there are complete (writes are atomic), so re-run once it is fixed (training: `--ckpt_path last`)."
    )


def prog(module: str) -> str:
    """A CLI's name in its usage line: the console script that was run (`capsdist-train`), else `python -m ...`
    with the module that was run (`data_prep.mnist` in a checkout), else `module`."""
    script = os.path.basename(sys.argv[0])
    if script.startswith("capsdist-"):
        return script
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name.removesuffix(".__main__") if spec else ""
    return f"python -m {name if name.startswith(('capsdist', 'data_prep')) else module}"
