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
