import pyarrow as pa
import pytest

from plantmix.core.stage import atomic_path, fingerprint, is_done, mark_done, read_parquet, write_parquet


def test_atomic_path_leaves_old_output_on_failure(tmp_path):
    out = tmp_path / "x.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_directory_replace(tmp_path):
    out = tmp_path / "d"
    for content in ("one", "two"):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(content)
    assert (out / "f").read_text() == "two"


def test_fingerprint_and_markers(tmp_path):
    src = tmp_path / "in.parquet"
    write_parquet(pa.table({"a": [1, 2]}), src)
    k1 = fingerprint({"p": 1}, [src])
    assert k1 == fingerprint({"p": 1}, [src]) != fingerprint({"p": 2}, [src])
    out = tmp_path / "out.parquet"
    assert not is_done(out, k1)
    write_parquet(read_parquet(src), out)
    mark_done(out, k1)
    assert is_done(out, k1) and not is_done(out, "other")
    write_parquet(pa.table({"a": [3]}), src)
    assert fingerprint({"p": 1}, [src]) != k1


def test_fingerprint_of_a_directory_sees_edits_and_new_files(tmp_path):
    d = tmp_path / "images" / "sp"
    d.mkdir(parents=True)
    (d / "a.jpg").write_bytes(b"x" * 10)
    k1 = fingerprint({}, [tmp_path / "images"])
    assert fingerprint({}, [tmp_path / "images"]) == k1
    (d / "a.jpg").write_bytes(b"y" * 11)  # edited in place
    k2 = fingerprint({}, [tmp_path / "images"])
    (d / "b.jpg").write_bytes(b"z")
    k3 = fingerprint({}, [tmp_path / "images"])
    assert len({k1, k2, k3}) == 3


def test_directory_lock_refuses_a_second_holder_and_frees_on_death(tmp_path):
    import subprocess
    import sys

    from plantmix.core.errors import PlantmixError
    from plantmix.core.lock import directory_lock

    code = f"from plantmix.core.lock import directory_lock\nwith directory_lock({str(tmp_path)!r}): print('got it')"
    with directory_lock(tmp_path):
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and "another build is running here (pid " in other.stderr
        with pytest.raises(PlantmixError, match="another build"):
            with directory_lock(tmp_path):
                pass
    # a killed holder leaves no stale lock: the kernel released it
    holder = subprocess.Popen([sys.executable, "-c", code.replace("print('got it')", "import time; time.sleep(60)")])
    import time

    time.sleep(1.5)
    holder.kill()
    holder.wait()
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "got it"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import os

    from plantmix.core.stage import remove_stale_temporaries

    (tmp_path / "a").mkdir()
    dead = tmp_path / "a" / ".manifest.parquet.tmp-999999"
    dead.write_text("half")
    (tmp_path / ".stage.old-999998").mkdir()
    live = tmp_path / f".x.tmp-{os.getpid()}"
    live.write_text("mine")
    assert remove_stale_temporaries(tmp_path) == 2
    assert not dead.exists() and live.exists()
