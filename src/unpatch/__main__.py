"""`python -m unpatch`: the same command line as the `unpatch` script (unpatch.cli)."""

from .cli import main

main()
