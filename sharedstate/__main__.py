"""``python -m sharedstate``: the command line."""

from sharedstate._cli import main

if __name__ == "__main__":
    main()
