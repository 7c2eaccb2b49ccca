"""The streamed join equals a straightforward one-query SQL join (the join as it first was) row for row,
value for value and type for type, on a build with every case the join distinguishes."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plantmix.core.errors import PlantmixError
from plantmix.core.schema import CANDIDATE_SCHEMA
from plantmix.stages.join import JOINED_SCHEMA, join_manifest, output_files


def reference_join(candidates: Path, build: Path) -> pa.Table:
    """Candidates ⟕ downloads ⟕ hashes in one DuckDB query, ordered by candidate row, then typed."""
    con = duckdb.connect()
    dl_types = {"uid": "VARCHAR", "status": "VARCHAR", "error_message": "VARCHAR", "sha256": "VARCHAR",
                "width": "BIGINT", "height": "BIGINT", "original_width": "BIGINT", "original_height": "BIGINT",
                "key": "VARCHAR", "original_bytes": "BIGINT"}  # fmt: skip
    hash_types = {"key": "VARCHAR", "phash": "UBIGINT", "phash_mirror": "UBIGINT", "stored_bytes": "BIGINT", "phash_error": "VARCHAR"}
    for name, kind, types in (("dl", "download", dl_types), ("hs", "hashes", hash_types)):
        files = output_files(build, kind)
        con.register(f"{name}_files", files)
        present = set().union(*(pq.read_schema(f).names for f in files.column("file").to_pylist()))
        cols = ", ".join(f"t.{c}::{t} AS {c}" if c in present else f"NULL::{t} AS {c}" for c, t in types.items())
        con.execute(f"""CREATE TABLE {name} AS SELECT {cols}, f.source, f.shard
                        FROM read_parquet($files, filename = true, union_by_name = true) t
                        JOIN {name}_files f ON f.file = t.filename""", {"files": files.column("file").to_pylist()})
    cand_cols = ", ".join(f"c.{f.name}" for f in CANDIDATE_SCHEMA if f.name != "drop_reason")
    ok = "d.status = 'success' AND h.phash IS NOT NULL"
    table = con.sql(f"""
        WITH d AS (SELECT * FROM dl QUALIFY row_number() OVER (PARTITION BY source, uid ORDER BY shard, key) = 1)
        SELECT {cand_cols},
          CASE WHEN c.drop_reason IS NOT NULL THEN 'not_attempted' WHEN d.status IS NULL THEN 'missing_from_download'
               WHEN d.status = 'success' AND h.phash IS NULL THEN 'failed_to_decode' ELSE d.status END AS status,
          CASE WHEN d.status = 'success' AND h.phash IS NULL THEN coalesce(h.phash_error, 'stored image not found')
               ELSE d.error_message END AS error_message,
          d.sha256, h.phash, h.phash_mirror, h.stored_bytes, d.original_bytes, d.width, d.height,
          d.original_width, d.original_height,
          CASE WHEN d.status = 'success' THEN d.shard END AS shard, CASE WHEN d.status = 'success' THEN d.key END AS key,
          NULL::FLOAT AS clip_score, NULL::FLOAT AS plant_score, NULL::VARCHAR AS dup_of,
          (c.drop_reason IS NULL AND {ok}) AS keep,
          CASE WHEN c.drop_reason IS NOT NULL THEN c.drop_reason WHEN {ok} THEN NULL ELSE 'download_failed' END AS drop_reason
        FROM read_parquet($candidates, file_row_number = true) c
        LEFT JOIN d ON d.uid = c.uid AND d.source = c.source
        LEFT JOIN hs h ON h.source = c.source AND h.shard = d.shard AND h.key = d.key AND d.status = 'success'
        ORDER BY c.file_row_number""", params={"candidates": str(candidates)}).to_arrow_table()
    return table.cast(JOINED_SCHEMA)


def _candidates(path: Path, rows: list[tuple]) -> None:
    """rows: (uid, source, drop_reason, collapsed captions)."""
    full = [{f.name: None for f in CANDIDATE_SCHEMA}
            | {"uid": u, "source": s, "domain": "plant", "input_rows": 1, "caption": f"a photo of {u}",
               "url": f"https://example.org/{u}.jpg", "drop_reason": r, "collapsed_captions": cc}
            for u, s, r, cc in rows]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(full, schema=CANDIDATE_SCHEMA), path, row_group_size=4)


def _shard(build: Path, source: str, stem: str, rows: list[tuple], hashes: list[tuple] | None, extra: bool) -> None:
    """rows: (uid, key, status); hashes: (key, phash, phash_error) or None for no hash file; `extra`
    adds the optional columns (original_bytes; phash_mirror and stored_bytes)."""
    (build / "download" / source).mkdir(parents=True, exist_ok=True)
    ok = [s == "success" for _, _, s in rows]
    cols = {"uid": [u for u, _, _ in rows], "key": [k for _, k, _ in rows], "status": [s for _, _, s in rows],
            "error_message": [None if o else "<urlopen error timed out>" for o in ok],
            "sha256": [f"sha-{k}" if o else None for (_, k, _), o in zip(rows, ok)],
            "width": pa.array([64 if o else None for o in ok], pa.int32()),  # read as BIGINT
            "height": [48 if o else None for o in ok], "url": [f"https://example.org/{u}.jpg" for u, _, _ in rows]}  # fmt: skip
    if extra:
        cols |= {"original_width": [640 if o else None for o in ok], "original_height": [480 if o else None for o in ok],
                 "original_bytes": [1000 + i for i in range(len(rows))]}  # fmt: skip
    pq.write_table(pa.table(cols), build / "download" / source / f"{stem}.parquet")
    if hashes is None:
        return
    (build / "hashes" / source).mkdir(parents=True, exist_ok=True)
    h = {"key": [k for k, _, _ in hashes], "phash": pa.array([p for _, p, _ in hashes], pa.uint64()),
         "phash_error": [e for _, _, e in hashes]}  # fmt: skip
    if extra:
        h |= {"phash_mirror": pa.array([None if p is None else p + 1 for _, p, _ in hashes], pa.uint64()),
              "stored_bytes": [500] * len(hashes)}  # fmt: skip
    pq.write_table(pa.table(h), build / "hashes" / source / f"{stem}.parquet")


def _tricky_build(build: Path) -> Path:
    build.mkdir(parents=True)
    cands = [("u1", "a", None, None), ("u2", "a", None, ["another caption"]), ("u3", "a", None, None),
             ("u4", "a", "missing_url", None), ("u5", "a", None, None), ("u6", "a", None, None),
             ("u7", "a", None, None), ("u1", "b", None, None), ("u8", "b", None, None), ("u9", "a", None, None),
             ("u10", "c", None, None), ("u11", "a", "unsupported_url_scheme", None), ("u12", "b", None, None)]  # fmt: skip
    _candidates(build / "candidates.parquet", cands)
    # source a, shard 00001: u1 repeated (also in 00000, which wins), u2 repeated within the shard (key "k1b" < "k1c")
    _shard(build, "a", "00001", [("u1", "k1a", "success"), ("u2", "k1c", "success"), ("u2", "k1b", "success"),
                                 ("u3", "k1d", "failed_to_download"), ("u5", "k1e", "success"), ("u6", "k1f", "success"),
                                 ("u11", "k1g", "success")],
           [("k1a", 1, None), ("k1b", 2, None), ("k1c", 3, None), ("k1d", 4, None),  # a hash for a failed row: unused
            ("k1e", None, "phash failed: truncated"), ("k1g", 5, None)], extra=True)  # u6: no hash row
    _shard(build, "a", "00000", [("u1", "k0b", "success"), ("u7", None, "success"), ("u13", "k0a", "failed_to_download")],
           [("k0a", 9, None), ("k0b", 10, None)], extra=False)
    _shard(build, "a", "00002", [("u9", "k2a", "success")], None, extra=False)  # no hash file at all
    # source b: u1 again (another source: its own row); u12 downloaded but its status unknown
    _shard(build, "b", "00000", [("u1", "kb0", "success"), ("u8", "kb1", "success"), ("u12", "kb2", None)],
           [("kb0", 20, None), ("kb1", 21, None)], extra=True)
    _shard(build, "d", "00000", [("u10", "kd0", "success")], [("kd0", 30, None)], extra=True)  # no candidate of d
    return build / "candidates.parquet"


def test_streamed_join_equals_the_one_query_join(tmp_path):
    build = tmp_path / "b's build"
    candidates = _tricky_build(build)
    got, want = join_manifest(candidates, build), reference_join(candidates, build)
    assert got.schema.equals(want.schema) and got.schema.equals(JOINED_SCHEMA)
    assert got.to_pylist() == want.to_pylist()
    rows = {(r["uid"], r["source"]): r for r in got.to_pylist()}
    # the cases the build was made for, so a wrong reference could not pass unseen
    assert (rows["u1", "a"]["shard"], rows["u1", "a"]["key"], rows["u1", "a"]["phash"]) == ("download/a/00000.tar", "k0b", 10)
    assert (rows["u2", "a"]["key"], rows["u2", "a"]["phash"], rows["u2", "a"]["original_bytes"]) == ("k1b", 2, 1002)
    assert rows["u3", "a"]["status"] == "failed_to_download" and rows["u3", "a"]["phash"] is None
    assert rows["u4", "a"]["status"] == "not_attempted" and rows["u4", "a"]["drop_reason"] == "missing_url"
    assert rows["u5", "a"]["status"] == "failed_to_decode" and rows["u5", "a"]["error_message"] == "phash failed: truncated"
    assert rows["u6", "a"]["error_message"] == rows["u9", "a"]["error_message"] == "stored image not found"
    assert rows["u7", "a"]["status"] == "failed_to_decode" and rows["u7", "a"]["key"] is None
    assert rows["u1", "b"]["phash"] == 20 and rows["u1", "b"]["phash_mirror"] == 21 and rows["u1", "b"]["keep"]
    assert rows["u10", "c"]["status"] == rows["u12", "b"]["status"] == "missing_from_download"
    assert rows["u11", "a"]["status"] == "not_attempted" and rows["u11", "a"]["sha256"] == "sha-k1g"
    assert rows["u2", "a"]["collapsed_captions"] == ["another caption"]


def test_join_without_any_download_keeps_every_candidate(tmp_path):
    build = tmp_path / "b"
    build.mkdir()
    _candidates(build / "candidates.parquet", [("u1", "a", None, None), ("u2", "a", "missing_url", None)])
    got = join_manifest(build / "candidates.parquet", build)
    assert got.schema.equals(JOINED_SCHEMA)
    assert got["status"].to_pylist() == ["missing_from_download", "not_attempted"]
    assert got["drop_reason"].to_pylist() == ["download_failed", "missing_url"] and not any(got["keep"].to_pylist())


def test_candidates_without_the_candidate_columns_are_refused(tmp_path):
    build = tmp_path / "b"
    build.mkdir()
    pq.write_table(pa.table({"uid": ["u1"], "source": ["a"]}), build / "candidates.parquet")
    with pytest.raises(PlantmixError, match="lacks the candidate columns"):
        join_manifest(build / "candidates.parquet", build)
