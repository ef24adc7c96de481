"""`python -m capsdist.pretrained` (`capsdist-pretrained`): the entry point; the program: capsdist.tools.pretrained."""

from capsdist.core.startup import program

main = program("capsdist.tools.pretrained")  # imported at the call: see capsdist.core.startup

if __name__ == "__main__":
    main()
