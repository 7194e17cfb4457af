"""The one error type the CLI turns into a one-line message (exit code 2), and its did-you-mean."""


class UnpatchError(Exception):
    """A user-facing problem: the message names the culprit and says what to do next."""


def did_you_mean(word: str, known, cutoff: float = 0.6, prefix: str = "") -> str:
    """" Did you mean: X?" for the known name nearest to `word` (difflib, at `cutoff`), else "":
    the one suggestion every unknown-name message appends (methods, metrics, options, data)."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=cutoff)
    return f" Did you mean: {prefix}{close[0]}?" if close else ""
