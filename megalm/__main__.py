"""`python -m megalm ...`: the same as the `megalm` command."""

from megalm.cli import main

main()
