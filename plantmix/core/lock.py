"""An exclusive lock per build or mix directory, so two commands never write one directory at once.

The lock itself is dalip's (`dalip.lock.directory_lock`, one implementation for both packages: a
kernel `flock` on DIR/.lock that dies with its holder, so it is never stale, and whose file names the
holder — pid, host, start time — for the refusal); here it raises PlantmixError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from dalip.lock import LOCK_FILE, directory_lock as _directory_lock
from plantmix.core.errors import PlantmixError

__all__ = ["LOCK_FILE", "directory_lock"]


@contextlib.contextmanager
def directory_lock(directory: Path, what: str = "build") -> Iterator[Path]:
    """Hold DIR/.lock for the block; raise PlantmixError naming the holder when another process has it."""
    with _directory_lock(directory, what, error=PlantmixError) as path:
        yield path
