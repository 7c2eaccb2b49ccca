"""An exclusive lock per build (or mix) directory, so two commands never write one directory at once.

`flock` on DIR/.lock: the kernel releases it when the holder exits or is killed, so a lock is never
stale; the file records the holder (pid, host, start time) for the message a second command prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from plantmix.core.errors import PlantmixError


@contextlib.contextmanager
def directory_lock(directory: Path, what: str = "build") -> Iterator[None]:
    """Hold DIR/.lock for the block; raise PlantmixError naming the holder when another process has it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PlantmixError(f"{directory}: another {what} is running here ({_holder(path)}); wait for it or stop it") from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(holder).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
