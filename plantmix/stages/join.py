"""Join: candidates ⟕ download results ⟕ hashes, one row per candidate, in candidate order (Arrow).

img2dataset's per-shard parquet files and the hash files are listed in Python, where the source and
the shard of each file are known from its place under the build directory, so no path is parsed.
The download rows (narrow: outcome, sizes, hashes; ~230 bytes each) are read once into memory, each
with its shard's pHash row attached; every candidate is matched to its (source, uid) download row
by hash lookup; the candidates are then streamed in file order, batch by batch, and each batch is
written with its download columns taken alongside — no sort, and the wide candidate columns are
never held whole. Every candidate keeps exactly one row whatever happened to it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError
from plantmix.core.overlap import ahead
from plantmix.core.recipe import ResourcesConfig
from plantmix.core.schema import (
    CANDIDATE_SCHEMA, DROP_DOWNLOAD_FAILED, MANIFEST_EXTRA_FIELDS, STATUS_MISSING, STATUS_NOT_ATTEMPTED,
    STATUS_UNDECODABLE, TAXON_COLUMNS,
)  # fmt: skip
from plantmix.core.stage import atomic_path
from plantmix.stages.hashes import HASH_SCHEMA

# The img2dataset columns the join reads, and the type each is read as (absent ones are null).
DOWNLOAD_SCHEMA = pa.schema(
    [("uid", pa.string()), ("status", pa.string()), ("error_message", pa.string()), ("sha256", pa.string()),
     ("width", pa.int64()), ("height", pa.int64()), ("original_width", pa.int64()), ("original_height", pa.int64()),
     ("key", pa.string()), ("original_bytes", pa.int64())]
)  # fmt: skip
_CANDIDATE_COLUMNS = [f.name for f in CANDIDATE_SCHEMA if f.name != "drop_reason"]
# Candidate columns, then DESIGN §4 extras, then drop_reason; typed per plantmix.core.schema.
JOINED_SCHEMA = pa.schema(
    [CANDIDATE_SCHEMA.field(n) for n in _CANDIDATE_COLUMNS] + MANIFEST_EXTRA_FIELDS + [pa.field("drop_reason", pa.string())]
)
ROWS_PER_BATCH = 256_000  # candidate rows per batch (about), and per written row group (exactly)
# The write is the join's largest cost: dictionaries only where values repeat (a per-row value, e.g.
# uid or sha256, fills a dictionary page only to fall back), statistics only on the fixed-width
# columns (string min/max cost a tenth of the write; this intermediate file is read whole).
_REPEATING = {"source", "domain", "license", "attribution", *TAXON_COLUMNS, "common_name", "status", "error_message",
              "shard", "drop_reason"}  # fmt: skip
_ENCODING = {
    "use_dictionary": [f.name for f in JOINED_SCHEMA if f.name in _REPEATING or not pa.types.is_string(f.type)],
    "write_statistics": [f.name for f in JOINED_SCHEMA if not (pa.types.is_string(f.type) or pa.types.is_list(f.type))],
}


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


def join_manifest(candidates_path: Path, build_dir: Path, resources: ResourcesConfig | None = None) -> pa.Table:
    """One row per candidate with the download outcome, hashes and sizes (DESIGN §4 columns), in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "joined.parquet"
        join_to_parquet(candidates_path, build_dir, out, resources)
        return pq.read_table(out)


def join_to_parquet(candidates_path: Path, build_dir: Path, out: Path, resources: ResourcesConfig | None = None) -> None:
    """`join_manifest` streamed to `out` (atomically), candidates batch by batch: memory holds the
    download rows and one batch, not the wide table. keep / drop_reason here say only whether the row
    has a usable image; curation decides later."""
    resources = resources or ResourcesConfig()
    candidates = pq.ParquetFile(candidates_path)
    missing = [c for c in [*_CANDIDATE_COLUMNS, "drop_reason"] if c not in candidates.schema_arrow.names]
    if missing:
        raise PlantmixError(f"{candidates_path} lacks the candidate columns {missing}: re-run ingest")
    downloads, shards = read_downloads(Path(build_dir), resources.threads)
    row = match_downloads(pq.read_table(candidates_path, columns=["uid", "source"]), downloads, shards)
    downloads = downloads.drop_columns(["uid"])
    batches = _batches(candidates.metadata)

    def load(batch: tuple[list[int], int]) -> pa.Table:
        groups, start = batch
        # a reader per call: the next batch loads while this one is written
        reader = pq.ParquetFile(candidates_path, metadata=candidates.metadata)
        read = reader.read_row_groups(groups, columns=[*_CANDIDATE_COLUMNS, "drop_reason"])
        return _joined(read, downloads, shards, row[start : start + read.num_rows])

    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, JOINED_SCHEMA, compression="zstd", **_ENCODING) as writer:
        _write_groups(writer, (table for _, table in ahead(load, batches)))


def _write_groups(writer: pq.ParquetWriter, tables: Iterator[pa.Table]) -> None:
    """Write `tables` in row groups of exactly ROWS_PER_BATCH rows (the last one shorter), whatever
    their sizes: later stages stream the file a row group at a time."""
    pending, rows = [], 0
    for table in tables:
        pending.append(table)
        rows += table.num_rows
        if rows >= ROWS_PER_BATCH:
            whole = pa.concat_tables(pending)
            cut = rows - rows % ROWS_PER_BATCH
            writer.write_table(whole.slice(0, cut), row_group_size=ROWS_PER_BATCH)
            pending, rows = [whole.slice(cut)], rows - cut
    if rows:
        writer.write_table(pa.concat_tables(pending))


def _batches(metadata: pq.FileMetaData) -> list[tuple[list[int], int]]:
    """(row groups, first row) of each batch: whole row groups, about ROWS_PER_BATCH rows a batch."""
    batches, groups, first, rows = [], [], 0, 0
    for i in range(metadata.num_row_groups):
        groups.append(i)
        rows += metadata.row_group(i).num_rows
        if rows - first >= ROWS_PER_BATCH or i == metadata.num_row_groups - 1:
            batches.append((groups, first))
            groups, first = [], rows
    return batches


# ---- the download rows ---------------------------------------------------------------------------


def read_downloads(build_dir: Path, threads: int = 2) -> tuple[pa.Table, pa.Table]:
    """(download rows, shards). Download rows: DOWNLOAD_SCHEMA + the hash columns of the same shard's
    pHash row (null unless status is success and the key has one) + `file`, the row's index into
    shards, a (source, shard) table in (source, shard) order."""
    dl = output_files(build_dir, "download")
    hashes = dict(zip(dl.column("shard").to_pylist(), [None] * dl.num_rows))
    hs = output_files(build_dir, "hashes")
    hashes.update((s, f) for s, f in zip(hs.column("shard").to_pylist(), hs.column("file").to_pylist()) if s in hashes)
    shards = pa.table({"source": dl["source"], "shard": dl["shard"]})
    jobs = [(f, hashes[s], i) for i, (f, s) in enumerate(zip(dl.column("file").to_pylist(), dl.column("shard").to_pylist()))]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        parts = list(pool.map(lambda job: _read_shard(*job), jobs))
    # one chunk per column, so each batch's take is a gather, not a concatenation; built a column at
    # a time, each column's parts freed as it is joined, so the rows are held about once, not twice
    chunks = {name: [p.column(name).chunk(0) for p in parts] for name in DOWNLOADS_SCHEMA.names}
    del parts
    columns = [pa.concat_arrays(chunks.pop(name)) if chunks[name] else pa.array([], f.type)
               for name, f in zip(DOWNLOADS_SCHEMA.names, DOWNLOADS_SCHEMA)]  # fmt: skip
    return pa.table(columns, schema=DOWNLOADS_SCHEMA), shards


def _large(field: pa.Field) -> pa.Field:
    return field.with_type(pa.large_string()) if field.type == pa.string() else field


# The download rows as held: strings large (no 2 GiB limit on one column of all rows), hash columns
# attached, `file` indexing the shards table.
DOWNLOADS_SCHEMA = pa.schema([_large(f) for f in [*DOWNLOAD_SCHEMA, *[f for f in HASH_SCHEMA if f.name != "key"],
                                                  pa.field("file", pa.int32())]])  # fmt: skip


def _read_shard(download: str, hashes: str | None, file: int) -> pa.Table:
    """One download parquet with its pHash rows attached (joined on key, for successful rows only)."""
    d = _read_as(download, DOWNLOAD_SCHEMA)
    h = _read_as(hashes, HASH_SCHEMA) if hashes else HASH_SCHEMA.empty_table()
    success = pc.fill_null(pc.equal(d["status"], "success"), False)
    at = pc.index_in(d["key"], value_set=h["key"], skip_nulls=True)  # the first row of a repeated key
    at = pc.if_else(success, at, pa.scalar(None, at.type))
    cols = {f.name: d[f.name] for f in DOWNLOAD_SCHEMA}
    cols.update((f.name, h[f.name].take(at)) for f in HASH_SCHEMA if f.name != "key")
    cols["file"] = pa.array(np.full(d.num_rows, file, np.int32))
    return pa.table([cols[f.name].cast(f.type).combine_chunks() if isinstance(cols[f.name], pa.ChunkedArray)
                     else cols[f.name].cast(f.type) for f in DOWNLOADS_SCHEMA], schema=DOWNLOADS_SCHEMA)


def _read_as(path: str, schema: pa.Schema) -> pa.Table:
    """The columns of `schema` from one parquet file, cast to its types (absent columns: null)."""
    file = pq.ParquetFile(path)
    present = set(file.schema_arrow.names)
    t = file.read(columns=[n for n in schema.names if n in present], use_threads=False)
    return pa.table([t[f.name].cast(f.type) if f.name in present else pa.nulls(t.num_rows, f.type) for f in schema],
                    schema=schema)  # fmt: skip


# ---- matching ---------------------------------------------------------------------------------------


def match_downloads(candidates: pa.Table, downloads: pa.Table, shards: pa.Table) -> np.ndarray:
    """Per candidate (uid, source), the index of its download row, or -1. A (source, uid) the
    downloader reports more than once is matched to its row of the first shard, then key."""
    row = np.full(candidates.num_rows, -1, np.int64)
    file_source = shards["source"].take(downloads["file"]).combine_chunks() if downloads.num_rows else pa.array([], pa.string())
    for source in pc.unique(shards["source"]).to_pylist():
        span = np.flatnonzero(pc.equal(file_source, source).to_numpy(zero_copy_only=False))
        if not len(span):
            continue
        lo, hi = int(span[0]), int(span[-1]) + 1  # rows are in (source, shard) order: one span per source
        uids = downloads["uid"].slice(lo, hi - lo)
        first = _first_rows(uids, downloads.slice(lo, hi - lo), shards)
        mine = np.flatnonzero(pc.equal(candidates["source"], source).to_numpy(zero_copy_only=False))
        at = pc.index_in(candidates["uid"].take(mine), value_set=uids, skip_nulls=True)
        at = pc.fill_null(at, -1).to_numpy()
        row[mine] = np.where(at >= 0, first[np.maximum(at, 0)] + lo, -1)
    return row


def _first_rows(uids: pa.ChunkedArray, rows: pa.Table, shards: pa.Table) -> np.ndarray:
    """Per row, the row its uid is matched to: itself, or for a repeated uid the row of the first
    (shard, key), ties in file order; index_in finds only the first in file order, so the rare
    repeated uids are ordered apart."""
    n = len(uids)
    pos = np.arange(n)
    first = pc.fill_null(pc.index_in(uids, value_set=uids, skip_nulls=True), -1).to_numpy()
    repeated = np.unique(first[(first >= 0) & (first != pos)])
    if not len(repeated):
        return pos
    members = np.flatnonzero(np.isin(first, repeated))
    files = rows["file"].take(members)
    order = pa.table({"group": first[members], "shard": shards["shard"].take(files), "key": rows["key"].take(members),
                      "pos": members}).sort_by([("group", "ascending"), ("shard", "ascending"), ("key", "ascending"),
                                                ("pos", "ascending")])  # fmt: skip
    group, chosen = order["group"].to_numpy(), order["pos"].to_numpy()
    lead = np.r_[True, group[1:] != group[:-1]]
    pos[group[lead]] = chosen[lead]
    return pos


# ---- one batch -------------------------------------------------------------------------------------


def _joined(batch: pa.Table, downloads: pa.Table, shards: pa.Table, row: np.ndarray) -> pa.Table:
    """The joined rows of one candidate batch, given each candidate's download row (-1 = none)."""
    d = downloads.take(pa.array(row, mask=row < 0))
    n = batch.num_rows
    status = d["status"]
    success = pc.fill_null(pc.equal(status, "success"), False)
    not_attempted = pc.is_valid(batch["drop_reason"])
    undecodable = pc.and_(success, pc.is_null(d["phash"]))
    decodable = pc.and_(success, pc.is_valid(d["phash"]))
    null_str = pa.scalar(None, pa.large_string())
    out = {c: batch[c] for c in _CANDIDATE_COLUMNS}
    out["status"] = pc.if_else(
        not_attempted, STATUS_NOT_ATTEMPTED,
        pc.if_else(pc.is_null(status), STATUS_MISSING, pc.if_else(undecodable, STATUS_UNDECODABLE, status)),
    )  # fmt: skip
    stored_missing = pc.coalesce(d["phash_error"], pa.scalar("stored image not found", pa.large_string()))
    out["error_message"] = pc.if_else(undecodable, stored_missing, d["error_message"])
    for c in ("sha256", "phash", "phash_mirror", "stored_bytes", "original_bytes", "width", "height",
              "original_width", "original_height"):  # fmt: skip
        out[c] = d[c]
    out["shard"] = pc.if_else(success, shards["shard"].take(d["file"]).cast(pa.large_string()), null_str)
    out["key"] = pc.if_else(success, d["key"], null_str)
    for c in ("clip_score", "plant_score", "dup_of"):
        out[c] = pa.nulls(n, JOINED_SCHEMA.field(c).type)
    out["keep"] = pc.and_(pc.invert(not_attempted), decodable)
    out["drop_reason"] = pc.if_else(
        not_attempted, batch["drop_reason"],
        pc.if_else(decodable, pa.scalar(None, pa.string()), DROP_DOWNLOAD_FAILED),
    )  # fmt: skip
    return pa.table([_cast(out[f.name], f.type) for f in JOINED_SCHEMA], schema=JOINED_SCHEMA)


def _cast(values, type_: pa.DataType):
    return values if values.type == type_ else values.cast(type_)
