"""The one error type the CLI turns into a one-line message (exit code 2)."""


class UnpatchError(Exception):
    """A user-facing problem: the message names the culprit and says what to do next."""
