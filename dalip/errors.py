"""User-facing errors: the `dalip` CLI prints them as one line and exits 2, without a traceback.

`DalipError` itself lives in the package root (so `import dalip` stays light); this module adds the
specific kinds the trainer raises.
"""

from dalip import DalipError

__all__ = ["DalipError", "CheckpointError", "NonFiniteLossError"]


class CheckpointError(DalipError):
    """A checkpoint is missing, incomplete, or holds something other than tensors and plain containers."""


class NonFiniteLossError(DalipError):
    """The loss was NaN or infinite for too many steps in a row."""
