"""The one exception type that entry scripts turn into a one-line message and exit status 2."""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a model name): the message says what and how to fix it."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name when empty), for one-line errors."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
