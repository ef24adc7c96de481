"""`python -m capsdist.figures` (`capsdist-figures`): the entry point; the program lives in capsdist.tools.figures."""

from capsdist.core.startup import program

main = program("capsdist.tools.figures")  # imported at the call: see capsdist.core.startup

if __name__ == "__main__":
    main()
