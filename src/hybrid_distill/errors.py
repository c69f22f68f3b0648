"""The base of every error that reports a problem with the user's input, files or environment (not a bug).

The command line prints these as one line (``--debug`` adds the traceback); any other exception is a bug and
keeps its traceback.
"""


class HybridDistillError(Exception):
    """A problem the user can fix: a bad setting, a missing or damaged file, a folder in use."""


__all__ = ["HybridDistillError"]
