"""`python -m regularize`."""

from regularize.cli import main

if __name__ == "__main__":
    main()
