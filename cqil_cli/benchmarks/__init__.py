"""Developer benchmarks (not part of the CLI): `python -m cqil_cli.benchmarks.runtime`."""
