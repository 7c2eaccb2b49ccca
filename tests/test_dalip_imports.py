"""`dalip` stands alone: importing every one of its modules never imports `plantmix`."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import dalip

ROOT = Path(__file__).resolve().parent.parent


def test_no_dalip_module_imports_plantmix():
    modules = sorted(f"dalip.{m.name}" for m in pkgutil.iter_modules(dalip.__path__))
    assert "dalip.checkpoint" in modules and "dalip.cli" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'plantmix' or m.startswith('plantmix.'))\n"
        "print(','.join(leaked))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"plantmix imported by dalip: {done.stdout.strip()}"


def test_atomic_path_replaces_a_directory_or_leaves_it(tmp_path):
    import pytest

    from dalip.atomic import atomic_path

    target = tmp_path / "ckpt"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_directory_lock_refuses_a_second_holder_and_survives_a_killed_one(tmp_path):
    import pytest

    from dalip import DalipError
    from dalip.lock import directory_lock

    run = tmp_path / "run"
    hold = f"from dalip.lock import directory_lock\nwith directory_lock({str(run)!r}):\n    print('held', flush=True)\n    import time; time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DalipError, match=rf"run: another dalip train is running here \(pid {holder.pid} on .+, started "):
            with directory_lock(run):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (run / ".lock").is_file()
    with directory_lock(run) as lock:  # the kernel released the dead holder's lock: taken over at once
        assert f'"pid": {__import__("os").getpid()}' in lock.read_text()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DalipError, match="exists and is not a directory"):
        with directory_lock(tmp_path / "file"):
            pass
