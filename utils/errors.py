"""The one exception type that entry scripts turn into a one-line message and exit status 2."""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a model name): the message says what and how to fix it."""
