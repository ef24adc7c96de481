"""`python -m data_prep.multimnist`: the checkout's spelling of `capsdist-shards` (capsdist.prep.multimnist)."""

import sys

from capsdist.prep.multimnist import Plan, build_parser, generate, lock_folder, main, verify

__all__ = ["Plan", "build_parser", "generate", "lock_folder", "main", "verify"]

if __name__ == "__main__":
    sys.exit(main())
