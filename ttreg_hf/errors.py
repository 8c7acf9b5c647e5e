"""The package's errors: `TTRegError` is every refusal of a user's input, so that callers (and the ``ttreg`` command
line, which reports them in one line) catch exactly those; anything else that escapes is a bug."""


class TTRegError(Exception):
    """ttreg_hf refused its input: a bad argument, setting, file or index. The message says what to change."""


class TTRegValueError(TTRegError, ValueError):
    """A value ttreg_hf refuses (a `ValueError`, as before there was a `TTRegError`)."""


class TTRegTypeError(TTRegError, TypeError):
    """An argument of the wrong type or name, e.g. an unknown keyword (a `TypeError`, as Python raises for those)."""


class MissingDependencyError(TTRegError, ImportError):
    """An optional dependency the call needs is not installed; the message names what to install."""
