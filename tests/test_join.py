"""The join: one row per candidate, source and shard from the file list, repeated download rows collapsed."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from plantmix.core.schema import CANDIDATE_SCHEMA
from plantmix.stages.join import join_manifest


def _candidates(path, uids):
    rows = [{f.name: None for f in CANDIDATE_SCHEMA} | {"uid": u, "source": "src", "domain": "plant", "input_rows": 1} for u in uids]
    pq.write_table(pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA), path)


def _download(build, shard, rows):
    out = build / "download" / "src"
    out.mkdir(parents=True, exist_ok=True)
    t = pa.table({"uid": [r[0] for r in rows], "key": [r[1] for r in rows], "status": ["success"] * len(rows),
                  "error_message": pa.nulls(len(rows), pa.string()), "sha256": [f"sha-{r[1]}" for r in rows],
                  "width": [64] * len(rows), "height": [64] * len(rows)})
    pq.write_table(t, out / f"{shard}.parquet")
    hashes = build / "hashes" / "src"
    hashes.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": [r[1] for r in rows], "phash": pa.array([7] * len(rows), pa.uint64())}), hashes / f"{shard}.parquet")


def test_repeated_download_rows_collapse_to_the_first_shard_and_key(tmp_path):
    build = tmp_path / "b's download" / "download" / "x"  # path parts that once confused the join
    build.mkdir(parents=True)
    _candidates(build / "candidates.parquet", ["u1", "u2", "u3"])
    _download(build, "00001", [("u2", "000010001"), ("u1", "000010000")])
    _download(build, "00000", [("u1", "000000000")])  # u1 also in an earlier shard: that one wins
    m = join_manifest(build / "candidates.parquet", build)
    rows = {r["uid"]: r for r in m.to_pylist()}
    assert m["uid"].to_pylist() == ["u1", "u2", "u3"]
    assert (rows["u1"]["shard"], rows["u1"]["key"]) == ("download/src/00000.tar", "000000000")
    assert rows["u2"]["keep"] and rows["u2"]["phash"] == 7 and rows["u2"]["original_bytes"] is None
    assert rows["u3"]["status"] == "missing_from_download" and rows["u3"]["drop_reason"] == "download_failed"
