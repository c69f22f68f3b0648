"""The base of every error that reports a problem with the user's input, files or environment (not a bug), and
`TimeLimitReached`, the signal that a run under a time limit stopped (not an error).

The command line prints these as one line (``--debug`` adds the traceback); any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations


class HybridDistillError(Exception):
    """A problem the user can fix: a bad setting, a missing or damaged file, a folder in use."""


class TimeLimitReached(Exception):
    """A run under a time limit (``hybrid-distill run --time-limit``) stopped before ``unit`` — its estimate, times
    the safety factor, exceeded the ``left_s`` seconds left — or ``during`` it (the trainer's hard deadline passed; it
    checkpointed). Everything finished is recorded; running the same command again continues. ``limit_s``: the
    whole time limit, given when the unit cannot fit even in a command of its own.

    An exception rather than a returned value: a stopped run has not produced what a run returns (every requested
    stage done), and a caller that does not look for a partial result must not mistake one for a finished run. It
    is not a `HybridDistillError`: nothing is wrong; the command line exits with `TIME_LIMIT_EXIT_CODE` on it.
    """

    def __init__(self, unit: str, estimate_s: float | None = None, left_s: float = 0.0, during: bool = False,
                 limit_s: float | None = None):
        super().__init__(unit, estimate_s, left_s, during, limit_s)  # pickled with its fields (workers raise it)
        self.unit, self.estimate_s, self.left_s, self.during, self.limit_s = unit, estimate_s, left_s, during, limit_s

    def __str__(self) -> str:
        if self.during:
            what = f"stopped during {self.unit} (the time limit passed; its training checkpointed where it was)"
        else:
            estimated = "not estimated" if self.estimate_s is None else f"estimated {self.estimate_s:.0f} s"
            what = f"stopped before {self.unit} ({estimated}, {max(self.left_s, 0.0):.0f} s left)"
        if self.limit_s is not None:
            return (f"time limit: {what}; it needs more than the whole time limit ({self.limit_s:.0f} s): run the same "
                    "command again with a larger --time-limit, or without one, to continue")
        return f"time limit: {what}; run the same command again to continue"


# EX_TEMPFAIL (sysexits.h): the command stopped at its time limit and is to be run again.
TIME_LIMIT_EXIT_CODE = 75

__all__ = ["TIME_LIMIT_EXIT_CODE", "HybridDistillError", "TimeLimitReached"]
