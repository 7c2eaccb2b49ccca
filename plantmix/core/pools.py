"""Worker pools that die with their parent.

A `ProcessPoolExecutor` worker whose parent is SIGKILLed never sees its call queue close (it holds
both ends of the pipe since the fork), so it waits, or finishes its task, for ever: a killed build
left ~400 MB pHash and shard-writer workers behind for over 30 minutes. Each worker started here asks
the kernel for a SIGKILL when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`), and a daemon thread
checks the parent pid once a second as the fallback where prctl is missing or its signal was lost
(the death signal follows the parent *thread* that forked the worker, so it fires early only if that
thread ends while the pool lives on, which a `with` block around the pool rules out).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1
WATCHDOG_SECONDS = 1.0  # how often a worker checks that its parent is still there


def parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; False where unsupported."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux, or no prctl in the C library
        return False


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait(WATCHDOG_SECONDS)


def die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker as soon as process `parent` is gone (see module doc)."""
    parent_death_signal()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool of `workers` (at least 1) whose workers die with this process."""
    return ProcessPoolExecutor(max_workers=max(1, workers), initializer=die_with_parent, initargs=(os.getpid(),))
