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
