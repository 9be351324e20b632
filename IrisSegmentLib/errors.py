"""Errors the user can act on; the command line prints them without a traceback."""


class IrisInputError(ValueError):
    """Bad input: the message names the problem and the fix."""


class Cancelled(RuntimeError):
    """The user cancelled; nothing was written."""
