"""`python -m capsdist.checkpoint convert DIR OUT.ckpt`: a sharded checkpoint directory as one file that evaluate,
figures and pretrained export take (one process, the whole model in memory)."""

from __future__ import annotations

import argparse
import json

from capsdist.checkpoint.sharded import read_full
from capsdist.core.errors import user_errors
from capsdist.core.files import atomic_save


def parser() -> argparse.ArgumentParser:
    """The command line: ``convert DIR OUT``."""
    parser = argparse.ArgumentParser(prog="python -m capsdist.checkpoint", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="sharded NAME.ckpt/ directory -> single-file checkpoint")
    convert.add_argument("directory")
    convert.add_argument("out")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``convert DIR OUT``: a sharded checkpoint as one file that evaluate/figures/pretrained export take."""
    args = parser().parse_args(argv)
    with user_errors():
        checkpoint = read_full(args.directory)
        atomic_save(checkpoint, args.out)
    print(json.dumps({"checkpoint": args.out, "global_step": checkpoint.get("global_step", 0)}))



if __name__ == "__main__":
    main()
