"""`cqil generate`: greedy continuations on one device or on W ranks (docs/generate.md)."""
