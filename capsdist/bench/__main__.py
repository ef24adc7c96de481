"""`python -m capsdist.bench`: see capsdist.bench.cli."""

from capsdist.bench.cli import main

main()
