"""`python -m cqil_cli` is the `cqil` command."""

from .cli import main

main()
