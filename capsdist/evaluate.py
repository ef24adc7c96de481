"""`python -m capsdist.evaluate` (`capsdist-evaluate`): the entry point; the program is capsdist.tools.evaluate."""

from capsdist.tools.evaluate import main

if __name__ == "__main__":
    main()
