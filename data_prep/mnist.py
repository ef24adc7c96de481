"""`python -m data_prep.mnist`: the checkout's spelling of `capsdist-mnist` (capsdist.prep.mnist)."""

import sys

from capsdist.prep.mnist import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
