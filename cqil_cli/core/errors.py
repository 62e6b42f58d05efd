"""The one exception type the CLI turns into a clear one-line error and a non-zero exit."""


class CqilError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, too little text."""
