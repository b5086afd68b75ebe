"""The exception for user errors.

A :class:`UserError` means that something the user gave (a config value, a data set, a
workdir, a checkpoint, a function argument) is wrong; its message names the offending value
and the remedy. The command line prints it as one ``error:`` line. Any other exception is a
bug and keeps its traceback.
"""

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user: the message names the offending value and how to fix it.

    A subclass of :class:`ValueError`, so code that catches ``ValueError`` still catches it.
    """
