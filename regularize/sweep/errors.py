"""The sweep's own error (data errors: `regularize.sweep.data.DataError`)."""

from __future__ import annotations

from regularize.core.errors import RegularizeError


class SweepError(RegularizeError):
    """The sweep cannot run or resume as asked (output folder, metrics).

    Attributes:
        argument: The `run_sweep` argument at fault (e.g. "out"), or None; the
            command line names its own flag from it.
    """

    def __init__(self, message: str, *, argument: str | None = None):
        super().__init__(message)
        self.argument = argument
