"""`python -m capsdist.train` (`capsdist-train`): the service's entry point; the CLI lives in capsdist.training.cli."""

from capsdist.training.cli import main

if __name__ == "__main__":
    main()
