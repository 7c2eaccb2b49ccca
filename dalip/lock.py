"""An exclusive lock per output directory (a training run; plantmix uses it for builds and mixes), so
two commands never write one directory at once.

`flock` on DIR/.lock: the kernel releases it when the holder exits or is killed, so a crashed holder
never leaves a stale lock behind — the next command simply takes it and rewrites the holder record.
The file names the holder (pid, host, start time) for the one line a refused second command prints.
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

from dalip import DalipError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def directory_lock(directory: Path | str, what: str = "dalip train", error: type[Exception] = DalipError) -> Iterator[Path]:
    """Hold DIR/.lock for the block (creating DIR); raise `error` naming the holder when another
    process has it. Yields the lock file's path."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise error(f"{directory}: exists and is not a directory, or a parent of it is a file") from None
    except OSError as e:
        raise error(f"{directory}: cannot create it ({e.strerror})") from None
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"{directory}: another {what} is running here ({_holder(path)}); wait for it or stop it") from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(holder).encode())
        yield path
    finally:
        os.close(fd)  # closing releases the lock


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
