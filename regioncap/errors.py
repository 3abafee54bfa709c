"""The error a user sees as a one-line message rather than a traceback."""


class RunError(RuntimeError):
    """The run cannot start or finish (bad config or data, model not available, too many errors)."""
