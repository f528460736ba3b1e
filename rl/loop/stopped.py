"""How a run that stops itself says so."""
from __future__ import annotations


class RunStopped(RuntimeError):
    """The run stopped itself: the message names why, the step and what to do; `exit_code` is the
    process's (1 for a failure, 128 + signal for an interrupt)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
