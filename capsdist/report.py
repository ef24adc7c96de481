"""`python -m capsdist.report` (`capsdist-report`): the entry point; the program lives in capsdist.tools.report."""

from capsdist.core.startup import program

main = program("capsdist.tools.report")  # imported at the call: see capsdist.core.startup

if __name__ == "__main__":
    main()
