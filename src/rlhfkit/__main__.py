"""`python -m rlhfkit` is the same as the `rlhfkit` console script (used under torchrun)."""

from rlhfkit.cli import main

if __name__ == "__main__":
    main()
