"""The one exception type for user mistakes.

The CLI prints a `UserError` as a single `error: ...` line and exits with code 2; anything else is a bug and keeps its
traceback. It subclasses ValueError so library callers can catch it as one. Raise it with a message that names the file or recipe key and says what is expected.
"""


class UserError(ValueError):
    """A mistake in the user's input (a file, a recipe key, a value), not a bug in lmkit."""
