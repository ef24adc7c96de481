"""`python -m capsdist.bench` (`capsdist-bench`): the entry point; the program is capsdist.bench.cli."""

from capsdist.core.startup import program

main = program("capsdist.bench.cli")  # imported at the call: see capsdist.core.startup

if __name__ == "__main__":
    main()
