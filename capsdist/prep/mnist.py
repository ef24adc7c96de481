"""`capsdist-mnist` (`python -m data_prep.mnist` in a checkout): fetch or install the four official MNIST files.

The reader, the folder resolution and the download live in ``capsdist.data.mnist`` (runtime code training uses);
this is only the command line.

    python -m data_prep.mnist                 # resolve (download if needed), verify, print the folder
    python -m data_prep.mnist --from ~/mnist  # verify local copies and install them into the cache

Folders you already have (uncompressed IDX files, torchvision's ``MNIST/raw/``, Fashion-MNIST) can also be used
in place: ``--mnist-dir DIR`` / ``data.mnist_dir`` (see ``capsdist.data.mnist``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from capsdist.core.errors import prog
from capsdist.data.mnist import CACHE_DIR, MnistError, download, install_from, load, resolve_dir


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: resolve, fetch or install, verify, and print the MNIST folder."""
    ap = argparse.ArgumentParser(prog=prog("capsdist.prep.mnist"), description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help=f"target folder (default: resolution order, download into {CACHE_DIR})")
    ap.add_argument(
        "--from",
        dest="source",
        help="verify the four official files here (gzipped or not, or torchvision's MNIST/raw/) and install them",
    )
    ap.add_argument("--mirror", action="append", help="mirror base URL (repeatable; default: public mirrors)")
    args = ap.parse_args(argv)
    try:
        if args.source:
            folder = install_from(args.source, args.dir or CACHE_DIR)
        elif args.dir:
            folder = download(args.dir, args.mirror)
        else:
            folder = resolve_dir()
        for split in ("train", "test"):  # md5s: downloads and installs are verified; a folder you named warns
            images, labels = load(folder, split)
            print(f"{split}: {images.shape[0]} images, mean pixel {images.mean():.4f}")
    except MnistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
