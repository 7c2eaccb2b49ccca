"""User-facing errors: the `dalip` CLI prints them as one line and exits 2, without a traceback.

`DalipError` itself lives in the package root (so `import dalip` stays light); this module adds the
specific kinds the trainer raises.
"""

from dalip import DalipError

__all__ = ["DalipError", "CheckpointError", "NonFiniteLossError", "first_line"]


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty (a
    zero-byte file makes torch.load raise with no message at all)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


class CheckpointError(DalipError):
    """A checkpoint is missing, incomplete, or holds something other than tensors and plain containers."""


class NonFiniteLossError(DalipError):
    """The loss was NaN or infinite for too many steps in a row."""
