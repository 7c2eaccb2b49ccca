"""SIGKILL of a build or a mix while its worker pool runs leaves no process of it alive 5 s later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from mixbuild import kept, make_build  # noqa: E402

GRACE_SECONDS = 5.0


def _stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, session id, state, start time) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[3]), fields[0], int(fields[19])


def _processes() -> dict[int, tuple[int, int, str, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def _descendants(root: int, table: dict[int, tuple[int, int, str, int]]) -> dict[int, int]:
    """pid → start time of every live descendant of `root`."""
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, state, start) in table.items():
            if ppid == parent and pid not in found and state != "Z":
                found[pid] = start
                frontier.append(pid)
    return found


def _survivors(root: int, seen: dict[int, int]) -> list[int]:
    """Live processes of the killed `root`: in its session (it was started in a new one), or
    descendants seen while it ran (same pid and start time: not a reused pid). Zombies are dead."""
    table = _processes()
    alive = {pid for pid, (_, sid, state, _) in table.items() if sid == root and state != "Z"}
    alive |= {pid for pid, start in seen.items() if pid in table and table[pid][3] == start and table[pid][2] != "Z"}
    return sorted(alive)


def _kill_and_watch(cmd: list[str], kill_when, env: dict | None = None, timeout: float = 300) -> tuple[int, dict[int, int], float]:
    """Run `cmd` in a new session; SIGKILL it once `kill_when(pid, descendants, process table)` holds
    (None: it dies by its own failpoint); return its pid, the descendants seen while it ran and the
    time it died."""
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    seen: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            table = _processes()
            now = _descendants(proc.pid, table)
            seen.update(now)
            if kill_when is not None and kill_when(proc.pid, now, table):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"{cmd} ended with {proc.returncode} before it could be killed"
    return proc.pid, seen, time.monotonic()


def _assert_none_survive(root: int, seen: dict[int, int], died: float) -> None:
    while (left := _survivors(root, seen)) and time.monotonic() < died + GRACE_SECONDS:
        time.sleep(0.1)
    for pid in left:  # clean up before failing, so a regression does not leave them behind either
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes of the killed command still alive {GRACE_SECONDS} s later: {left}"


RECIPE = """
name: orphans
sources:
  - name: leaves
    domain: plant
    format: image_folder
    path: {images}
download:
  number_sample_per_shard: 6
  processes_count: 1
  thread_count: 4
  image_size: 64
resources:
  workers: 2
"""


@pytest.mark.slow
def test_sigkill_during_phash_leaves_no_pool_worker(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(36):
        folder = tmp_path / "images" / f"Species_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(images=tmp_path / "images"))
    out = tmp_path / "build"
    cmd = [sys.executable, "-m", "plantmix.cli", "build", str(recipe), "--out", str(out), "--until", "hashes"]
    # the failpoint kills the build as it renames its second pHash file: the pool is running
    pid, seen, died = _kill_and_watch(cmd, None, env={"PLANTMIX_KILL_AT": "00001.parquet"})
    assert (out / "download" / "leaves" / "00005.tar").exists()  # six tars, so the pool had work left
    assert len(list((out / "hashes" / "leaves").glob("*.parquet"))) == 1
    _assert_none_survive(pid, seen, died)


@pytest.mark.slow
def test_sigkill_during_shard_writing_leaves_no_pool_worker(tmp_path):
    build = make_build(tmp_path / "b", rows={"plant_a": 1200, "plant_b": 600, "web": 900}, per_tar=100)
    have = kept(build)
    cmd = [sys.executable, "-m", "plantmix.cli", "mix", str(build), "--plant", str(have["plant"]),
           "--general", str(have["general"]), "--shard-size", "4", "--workers", "2", "--name", "m"]  # fmt: skip

    def writing(pid: int, descendants: dict[int, int], table) -> bool:  # a pool worker alive, a shard written
        return any(table[c][0] == pid for c in descendants if c in table) and (build / "mixes" / "m" / "shards" / "00000.tar").exists()

    pid, seen, died = _kill_and_watch(cmd, writing)
    assert seen
    _assert_none_survive(pid, seen, died)
