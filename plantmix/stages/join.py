"""Join: candidates ⟕ download results ⟕ hashes, one row per candidate (DuckDB).

img2dataset's per-shard parquet files and the hash files are listed in Python, where the source and
the shard of each file are known from its place under the build directory; DuckDB gets the lists as
bound parameters and a (file → source, shard) table, so no path is ever parsed or spliced into SQL.
Every candidate keeps exactly one row whatever happened to it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from plantmix.core.stage import atomic_path

from plantmix.core.duck import connect, spill_dir, sql_quote
from plantmix.core.recipe import ResourcesConfig
from plantmix.core.schema import (
    CANDIDATE_SCHEMA, DROP_DOWNLOAD_FAILED, MANIFEST_EXTRA_FIELDS, STATUS_MISSING, STATUS_NOT_ATTEMPTED,
    STATUS_UNDECODABLE,
)  # fmt: skip
from plantmix.stages.hashes import HASH_SCHEMA

_DOWNLOAD_COLUMNS = {
    "uid": "VARCHAR", "status": "VARCHAR", "error_message": "VARCHAR", "sha256": "VARCHAR", "width": "BIGINT",
    "height": "BIGINT", "original_width": "BIGINT", "original_height": "BIGINT", "key": "VARCHAR",
    "original_bytes": "BIGINT",
}  # fmt: skip


def output_files(build_dir: Path, kind: str) -> pa.Table:
    """(file, source, shard) of every `<kind>/<source>/<shard>.parquet` under the build directory."""
    files = sorted(Path(build_dir).glob(f"{kind}/*/*.parquet"))
    return pa.table(
        {
            "file": pa.array([str(f) for f in files], pa.string()),
            "source": pa.array([f.parent.name for f in files], pa.string()),
            "shard": pa.array([f"download/{f.parent.name}/{f.stem}.tar" for f in files], pa.string()),
        }
    )


def _register_files(con: duckdb.DuckDBPyConnection, name: str, files: pa.Table, columns: dict[str, str]) -> None:
    """Create table `name` with `columns` + source + shard from the parquet files listed in `files`."""
    con.register(f"{name}_files", files)
    present = set().union(*(pq.read_schema(f).names for f in files.column("file").to_pylist()))
    cols = ", ".join(f"t.{c}::{t} AS {c}" if c in present else f"NULL::{t} AS {c}" for c, t in columns.items())
    if files.num_rows:
        con.execute(
            f"""CREATE TEMP TABLE {name} AS SELECT {cols}, f.source, f.shard
                FROM read_parquet($files, filename = true, union_by_name = true) t
                JOIN {name}_files f ON f.file = t.filename""",
            {"files": files.column("file").to_pylist()},
        )
    else:
        nulls = ", ".join(f"NULL::{t} AS {c}" for c, t in columns.items())
        con.execute(f"CREATE TEMP TABLE {name} AS SELECT {nulls}, NULL::VARCHAR source, NULL::VARCHAR shard WHERE false")


def join_manifest(candidates_path: Path, build_dir: Path, resources: ResourcesConfig | None = None) -> pa.Table:
    """One row per candidate with the download outcome, hashes and sizes (DESIGN §4 columns), in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "joined.parquet"
        join_to_parquet(candidates_path, build_dir, out, resources)
        return pq.read_table(out)


def join_to_parquet(candidates_path: Path, build_dir: Path, out: Path, resources: ResourcesConfig | None = None) -> None:
    """`join_manifest` streamed by DuckDB straight to `out` (atomically): out of core, so the memory it
    takes is the recipe's DuckDB limit, not the size of the build. keep / drop_reason here say only
    whether the row has a usable image; curation decides later."""
    resources = resources or ResourcesConfig()
    con = connect(resources, spill_dir(resources, build_dir))
    _register_files(con, "dl", output_files(build_dir, "download"), _DOWNLOAD_COLUMNS)
    hash_types = {"key": "VARCHAR", "phash": "UBIGINT", "phash_mirror": "UBIGINT", "stored_bytes": "BIGINT", "phash_error": "VARCHAR"}
    assert set(hash_types) == set(HASH_SCHEMA.names)
    _register_files(con, "hs", output_files(build_dir, "hashes"), hash_types)
    cand_cols = ", ".join(f"c.{f.name}" for f in CANDIDATE_SCHEMA if f.name != "drop_reason")
    decodable = "d.status = 'success' AND h.phash IS NOT NULL"
    query = f"""
        WITH dup AS (SELECT source, uid FROM dl GROUP BY ALL HAVING count(*) > 1),
        -- one download row per (source, uid): a window over only the rare repeated keys, since a window
        -- over every row does not spill and holds the whole download table in memory
        d AS (SELECT dl.* FROM dl ANTI JOIN dup USING (source, uid)
              UNION ALL
              SELECT * FROM (SELECT dl.* FROM dl SEMI JOIN dup USING (source, uid))
              QUALIFY row_number() OVER (PARTITION BY source, uid ORDER BY shard, key) = 1)
        SELECT {cand_cols},
          CASE WHEN c.drop_reason IS NOT NULL THEN '{STATUS_NOT_ATTEMPTED}'
               WHEN d.status IS NULL THEN '{STATUS_MISSING}'
               WHEN d.status = 'success' AND h.phash IS NULL THEN '{STATUS_UNDECODABLE}'
               ELSE d.status END AS status,
          CASE WHEN d.status = 'success' AND h.phash IS NULL THEN coalesce(h.phash_error, 'stored image not found')
               ELSE d.error_message END AS error_message,
          d.sha256, h.phash, h.phash_mirror, h.stored_bytes, d.original_bytes,
          d.width, d.height, d.original_width, d.original_height,
          CASE WHEN d.status = 'success' THEN d.shard END AS shard,
          CASE WHEN d.status = 'success' THEN d.key END AS key,
          NULL::FLOAT AS clip_score, NULL::FLOAT AS plant_score, NULL::VARCHAR AS dup_of,
          (c.drop_reason IS NULL AND {decodable}) AS keep,
          CASE WHEN c.drop_reason IS NOT NULL THEN c.drop_reason
               WHEN {decodable} THEN NULL
               ELSE '{DROP_DOWNLOAD_FAILED}' END AS drop_reason
        FROM read_parquet($candidates, file_row_number = true) c
        LEFT JOIN d ON d.uid = c.uid AND d.source = c.source
        LEFT JOIN hs h ON h.source = c.source AND h.shard = d.shard AND h.key = d.key AND d.status = 'success'
        ORDER BY c.file_row_number"""
    # COPY keeps the whole query inside DuckDB (its memory limit, its spill files); the file is then
    # retyped row group by row group to the manifest schema (DuckDB writes every column nullable)
    with atomic_path(out) as tmp:
        raw = out.with_name(f".{out.name}.raw.tmp-{os.getpid()}")  # a name stale-temporary cleanup knows
        try:
            con.execute(
                f"COPY ({query}) TO {sql_quote(str(raw))} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROWS_PER_BATCH})",
                {"candidates": str(candidates_path)},
            )
            con.close()
            _retype(raw, tmp)
        finally:
            raw.unlink(missing_ok=True)


def _retype(src: Path, dst: Path) -> None:
    source = pq.ParquetFile(src)
    schema = manifest_schema(source.schema_arrow)
    with pq.ParquetWriter(dst, schema, compression="zstd") as writer:
        for i in range(source.num_row_groups):
            writer.write_table(source.read_row_group(i).cast(schema))


ROWS_PER_BATCH = 256_000


def manifest_schema(current: pa.Schema) -> pa.Schema:
    """Candidate columns, then DESIGN §4 extras, then drop_reason; typed per plantmix.core.schema."""
    fields = [f for f in CANDIDATE_SCHEMA if f.name != "drop_reason"] + MANIFEST_EXTRA_FIELDS
    fields.append(pa.field("drop_reason", pa.string()))
    by_name = {f.name: f for f in fields}
    return pa.schema([by_name.get(n, current.field(n)) for n in current.names])
