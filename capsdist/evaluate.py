"""`python -m capsdist.evaluate` (`capsdist-evaluate`): the entry point; the program is capsdist.tools.evaluate."""

from capsdist.core.startup import program

main = program("capsdist.tools.evaluate")  # imported at the call: see capsdist.core.startup

if __name__ == "__main__":
    main()
