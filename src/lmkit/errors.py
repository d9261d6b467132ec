"""The one exception type for user mistakes.

The CLI prints a `UserError` as a single `error: ...` line and exits with code 2; anything else is a bug and keeps its
traceback. It subclasses ValueError so library callers can catch it as one. Raise it with a message that names the file
or recipe key and says what is expected. An `OSError` (full disk, read-only directory, ...) is the machine's state, not
a bug either: the CLI prints it the same way, through `describe_os_error`.
"""


class UserError(ValueError):
    """A mistake in the user's input (a file, a recipe key, a value), not a bug in lmkit."""


def describe_os_error(error: OSError) -> str:
    """'<path>: <cause>' (or '<path> -> <path2>: <cause>') for an OSError, whatever raised it."""
    cause = error.strerror or str(error) or type(error).__name__
    if error.filename is None:
        return cause
    where = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    return f"{where}: {cause}"
