"""Errors that end the program with one line on stderr, never a traceback."""


class UsageError(Exception):
    """Bad input or an environment that cannot work: exit status 2."""

    exit_status = 2


class CaptureError(Exception):
    """A failure while capturing (e.g. a write error): exit status 1."""

    exit_status = 1
