"""Manifest: perceptual hashes of the downloaded images, then candidates ⟕ download results (DuckDB).

`hash_shards` reads each download tar once and writes `hashes/<source>/<shard>.parquet` (key, phash),
one file per tar, so an interrupted run redoes only unfinished tars. `join_manifest` left-joins the
download results (img2dataset's per-shard parquet files) and the hashes onto every candidate on `uid`,
so every candidate keeps exactly one row whatever happened to it.
"""

from __future__ import annotations

import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from plantmix.core.hashing import phash_bytes
from plantmix.core.schema import CANDIDATE_SCHEMA, DROP_DOWNLOAD_FAILED, MANIFEST_EXTRA_FIELDS
from plantmix.core.stage import fingerprint, is_done, mark_done, write_parquet

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
STATUS_NOT_ATTEMPTED = "not_attempted"  # dropped at ingest, never sent to the downloader
STATUS_MISSING = "missing_from_download"  # sent, but absent from the downloader's output


def _hash_one_shard(tar_path: str) -> pa.Table:
    keys, hashes, errors = [], [], []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            name = m.name
            if not m.isreg() or not name.lower().endswith(IMAGE_EXTS):
                continue
            data = tar.extractfile(m).read()
            keys.append(name.rsplit(".", 1)[0])
            try:
                hashes.append(phash_bytes(data))
                errors.append(None)
            except Exception as e:  # undecodable stored bytes: recorded, decided on in the join
                hashes.append(None)
                errors.append(f"phash failed: {e}")
    return pa.table(
        {"key": pa.array(keys, pa.string()), "phash": pa.array(hashes, pa.uint64()), "phash_error": pa.array(errors, pa.string())}
    )


def hash_shards(download_dir: Path, hashes_dir: Path, workers: int = 2, progress=None) -> int:
    """pHash every image in every download tar; per-tar outputs are cached by the tar's digest."""
    tars = sorted(Path(download_dir).glob("*/*.tar"))
    todo = []
    for tar in tars:
        out = hashes_dir / tar.parent.name / (tar.stem + ".parquet")
        key = fingerprint({"stage": "phash", "v": 1}, [tar])
        if not is_done(out, key):
            todo.append((tar, out, key))
    done = len(tars) - len(todo)
    if progress:
        progress(done, len(tars))
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            for (tar, out, key), table in zip(todo, pool.map(_hash_one_shard, [str(t) for t, _, _ in todo])):
                write_parquet(table, out)
                mark_done(out, key)
                done += 1
                if progress:
                    progress(done, len(tars))
    return len(tars)


def join_manifest(candidates_path: Path, build_dir: Path) -> pa.Table:
    """One row per candidate with the download outcome, hashes and sizes (DESIGN §4 columns)."""
    build_dir = Path(build_dir)
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    downloads = sorted(build_dir.glob("download/*/*.parquet"))
    hashes = sorted(build_dir.glob("hashes/*/*.parquet"))
    if downloads:
        files = ", ".join(f"'{p}'" for p in downloads)
        con.execute(
            f"""CREATE VIEW dl AS SELECT uid, status, error_message, sha256, width, height,
                original_width, original_height, key,
                regexp_extract(filename, '(download/[^/]+/[^/]+)\\.parquet$', 1) || '.tar' AS shard,
                regexp_extract(filename, 'download/([^/]+)/', 1) AS dl_source
            FROM read_parquet([{files}], filename=true, union_by_name=true)"""
        )
    else:
        con.execute(
            "CREATE VIEW dl AS SELECT NULL::VARCHAR uid, NULL::VARCHAR status, NULL::VARCHAR error_message, "
            "NULL::VARCHAR sha256, NULL::BIGINT width, NULL::BIGINT height, NULL::BIGINT original_width, "
            "NULL::BIGINT original_height, NULL::VARCHAR key, NULL::VARCHAR shard, NULL::VARCHAR dl_source WHERE false"
        )
    if hashes:
        files = ", ".join(f"'{p}'" for p in hashes)
        con.execute(
            f"""CREATE VIEW hs AS SELECT key, phash, phash_error,
                regexp_extract(filename, 'hashes/([^/]+)/', 1) AS hs_source
            FROM read_parquet([{files}], filename=true)"""
        )
    else:
        con.execute("CREATE VIEW hs AS SELECT NULL::VARCHAR key, NULL::UBIGINT phash, NULL::VARCHAR phash_error, NULL::VARCHAR hs_source WHERE false")
    cand = pq.read_table(candidates_path)
    con.register("cand", cand.append_column("rn", pa.array(range(cand.num_rows), pa.int64())))
    cand_cols = ", ".join(f"c.{f.name}" for f in CANDIDATE_SCHEMA if f.name != "drop_reason")
    table = con.sql(
        f"""
        WITH d AS (SELECT * FROM dl QUALIFY row_number() OVER (PARTITION BY dl_source, uid ORDER BY shard, key) = 1),
             c AS (SELECT * FROM cand)
        SELECT {cand_cols},
          CASE WHEN c.drop_reason IS NOT NULL THEN '{STATUS_NOT_ATTEMPTED}'
               WHEN d.status IS NULL THEN '{STATUS_MISSING}'
               WHEN d.status = 'success' AND h.phash IS NULL THEN 'failed_to_decode'
               ELSE d.status END AS status,
          CASE WHEN d.status = 'success' AND h.phash IS NULL THEN coalesce(h.phash_error, 'stored image not found')
               ELSE d.error_message END AS error_message,
          d.sha256, h.phash,
          d.width::BIGINT AS width, d.height::BIGINT AS height,
          d.original_width::BIGINT AS original_width, d.original_height::BIGINT AS original_height,
          CASE WHEN d.status = 'success' THEN d.shard END AS shard,
          CASE WHEN d.status = 'success' THEN d.key END AS key,
          NULL::FLOAT AS clip_score, NULL::FLOAT AS plant_score, NULL::VARCHAR AS dup_of,
          (c.drop_reason IS NULL AND d.status = 'success' AND h.phash IS NOT NULL) AS keep,
          CASE WHEN c.drop_reason IS NOT NULL THEN c.drop_reason
               WHEN d.status = 'success' AND h.phash IS NOT NULL THEN NULL
               ELSE '{DROP_DOWNLOAD_FAILED}' END AS drop_reason
        FROM c
        LEFT JOIN d ON d.uid = c.uid AND d.dl_source = c.source
        LEFT JOIN hs h ON h.hs_source = c.source AND h.key = d.key AND d.status = 'success'
        ORDER BY c.rn
        """
    ).to_arrow_table()
    return table.cast(manifest_schema(table.schema))


def manifest_schema(current: pa.Schema) -> pa.Schema:
    """Candidate columns, then DESIGN §4 extras, then drop_reason; typed per plantmix.schema."""
    fields = [f for f in CANDIDATE_SCHEMA if f.name != "drop_reason"] + MANIFEST_EXTRA_FIELDS
    fields.append(pa.field("drop_reason", pa.string()))
    by_name = {f.name: f for f in fields}
    return pa.schema([by_name.get(n, current.field(n)) for n in current.names])
