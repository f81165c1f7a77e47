"""The one error the filter compiler raises."""

from upcall_capture.errors import UsageError


class FilterError(UsageError):
    """A filter that cannot be compiled: one line that points at the problem, exit status 2."""
