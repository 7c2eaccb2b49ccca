"""For the concurrency tests: wait until a child process holds a directory lock."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_for_holder(lock: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Return once `lock` names `proc` as its holder; fail if `proc` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not (lock.exists() and f'"pid": {proc.pid}' in lock.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
