"""`python -m capsdist.figures` (`capsdist-figures`): the entry point; the program lives in capsdist.tools.figures."""

from capsdist.tools.figures import main

if __name__ == "__main__":
    main()
