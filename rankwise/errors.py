"""The one exception type for bad input: the CLI prints its message as one sentence."""


class RankwiseError(ValueError):
    """A user-facing error: bad option, unreadable file, unusable model or data."""
