"""`python -m cqil_cli` is the `cqil` command."""

from .cli.app import main

main()
