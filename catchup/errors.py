class CatchupError(Exception):
    """A user-facing error: one line, naming the problem; scripts print it and exit non-zero."""
