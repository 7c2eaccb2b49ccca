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
