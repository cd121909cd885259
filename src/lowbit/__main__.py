"""``python -m lowbit``: the same command line as ``lowbit``."""
from lowbit.cli import main

if __name__ == "__main__":
    main()
