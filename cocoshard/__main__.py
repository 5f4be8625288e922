"""`python -m cocoshard ...` is the same as the `cocoshard` console script (and what torchrun runs)."""

from cocoshard.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
