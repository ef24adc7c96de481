"""`python -m capsdist.pretrained` (`capsdist-pretrained`): the entry point; the program: capsdist.tools.pretrained."""

from capsdist.tools.pretrained import main

if __name__ == "__main__":
    main()
