"""`python -m capsdist.report` (`capsdist-report`): the entry point; the program lives in capsdist.tools.report."""

from capsdist.tools.report import main

if __name__ == "__main__":
    main()
