"""The mix manifest: the selected build rows in shard order, one row group per shard.

Most of its bytes are strings that repeat (source, status, license, taxonomy and the captions made
from it), so those columns travel as dictionary codes: read from the build manifest's dictionary
pages, unified once into one dictionary per column, gathered as int16/int32 codes in mix order and written
as a dictionary per row group. The other columns are gathered whole through a spill by bucket. Both
give the same rows; readers see plain string columns either way.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.overlap import ahead
from plantmix.core.recipe import ResourcesConfig
from plantmix.core.stage import atomic_path
from plantmix.mix.select import Selection

MIX_FIELDS = [
    pa.field("mix_key", pa.string()),  # the sample key in the shards: uid, or uid-<repeat> when repeated
    pa.field("mix_repeat", pa.int32()),
    pa.field("mix_position", pa.int64()),  # global shuffled position
    pa.field("mix_shard", pa.int64()),  # = mix_position // shard_size
]
# A string column is gathered as codes when its first row group and the whole manifest have at most this
# many distinct values per row, and its row groups' dictionaries fit the byte budget (else it is gathered whole).
CODED_MAX_DISTINCT_SHARE = 0.1
CANDIDATE_MAX_DISTINCT_SHARE = 0.5  # first row group: worth reading as a dictionary
CODED_DICTIONARY_BUDGET = 128 << 20
# Row groups take the whole dictionary of a column up to this many values; larger ones get only the
# values the row group uses (a 120k-species dictionary in each 10k-row shard would bloat the file).
_WHOLE_DICTIONARY_MAX = 1024
_CODES = pa.int32()
# Hex digests: snappy saves 5-13 % of their bytes at 3-7x their write time (13M rows: 4.6 s against 1.1 s).
DIGEST_COLUMNS = ("uid", "sha256", "mix_key", "dup_of")


def write_mix_manifest(
    manifest: Path, sel: Selection, out: Path, shard_size: int, resources: ResourcesConfig | None = None
) -> None:
    """Gather the selected rows of the build manifest, in shard order, into `out`.

    Memory is bounded by one manifest row group, one bucket of `resources.batch_rows` rows (rounded to
    whole shards), the selection, and two coded columns' codes at a time (2 or 4 bytes per manifest row each):
    (1) coded columns: codes in mix order, one .npy per column in the spill folder; (2) the other
    columns: each selected row, once per copy, appended to the spill file of its bucket (a range of
    shards); (3) per bucket, order by position, add the coded columns, write one row group per shard,
    so the shard writer reads shard i as row group i.
    """
    resources = resources or ResourcesConfig()
    bucket_rows = max(1, resources.batch_rows // shard_size) * shard_size
    target = pa.schema([f.with_nullable(True) for f in pq.read_schema(manifest)] + MIX_FIELDS)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=".spill-") as spill_dir:
        spill = Path(spill_dir)
        coded = _gather_codes(manifest, sel, spill)
        dense = pa.schema([f for f in target if f.name not in coded])
        buckets = _spill_by_bucket(manifest, sel, shard_size, bucket_rows, dense, spill)
        written = pa.schema([f.with_type(pa.dictionary(_CODES, f.type)) if f.name in coded else f for f in target])
        # One writer thread encodes every row: it bounds the stage's wall time. Snappy costs it a quarter
        # less than zstd (the file is ~1.8x larger; the shard writer reads it once), and nothing on hex
        # digests; statistics only where readers filter (by shard, position): string statistics cost a
        # fifth of the write. No stored Arrow schema: readers get coded columns back as plain strings.
        compression = {path: "none" if path.split(".")[0] in DIGEST_COLUMNS else "snappy" for path in _column_paths(target)}
        with pq.ParquetWriter(tmp, written, compression=compression, use_dictionary=sorted(coded) or False,
                              write_statistics=["mix_shard", "mix_position"], store_schema=False) as writer:
            def load(k: int) -> pa.Table:
                """Bucket k, whole: its spilled rows in position order and its coded columns."""
                part = _sorted_bucket(buckets[k])
                columns = {n: _coded_bucket(*coded[n], k * bucket_rows, part.num_rows, shard_size) for n in coded}
                return _assemble(part, columns, written)

            for k, table in ahead(load, range(len(buckets))):
                writer.write_table(table, row_group_size=shard_size)
                buckets[k].unlink()
        if not buckets:
            pq.write_table(target.empty_table(), tmp, compression="zstd")


def _column_paths(schema: pa.Schema) -> list[str]:
    """The Parquet column paths of a schema (a list column is `name.list.element`): what per-column
    writer options are keyed by."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    meta = pq.read_metadata(pa.BufferReader(sink.getvalue()))
    return [meta.schema.column(i).path for i in range(meta.num_columns)]


# ---- coded columns ------------------------------------------------------------------------------------
def _coded_candidates(manifest: Path, pf: pq.ParquetFile) -> list[str]:
    """String columns with few distinct values per row in the first row group."""
    names = [f.name for f in pf.schema_arrow if pa.types.is_string(f.type) and f.name != "uid"]  # uid: mix_key's input
    if not names or pf.num_row_groups == 0 or pf.metadata.row_group(0).num_rows == 0:
        return []
    first = _dictionary_reader(manifest, pf, names).read_row_group(0, columns=names)
    limit = CANDIDATE_MAX_DISTINCT_SHARE * first.num_rows
    return [n for n in names if sum(len(c.dictionary) for c in first[n].chunks) <= limit]


def _dictionary_reader(manifest: Path, pf: pq.ParquetFile, names: list[str]) -> pq.ParquetFile:
    """A reader of the manifest that returns `names` as dictionary arrays (from their Parquet dictionary pages)."""
    return pq.ParquetFile(manifest, metadata=pf.metadata, read_dictionary=names)


def _column_codes(manifest: Path, pf: pq.ParquetFile, name: str) -> tuple[pa.Array, np.ndarray] | None:
    """(dictionary, int16 or int32 code of every manifest row, -1 for null), or None when the column has too many
    distinct values (or its row groups' dictionaries pass the byte budget) to gain from codes."""
    reader, chunks, size, rows = _dictionary_reader(manifest, pf, [name]), [], 0, 0
    for rg in range(pf.num_row_groups):
        new = reader.read_row_group(rg, columns=[name]).column(0).chunks
        chunks += new
        size += sum(c.dictionary.nbytes for c in new)
        rows += sum(len(c) for c in new)
        if size * max(1, pf.metadata.num_rows / max(rows, 1)) > CODED_DICTIONARY_BUDGET:
            return None  # the row groups' dictionaries would pass the budget at this rate
    unified = pa.chunked_array(chunks, pa.dictionary(_CODES, pf.schema_arrow.field(name).type)).unify_dictionaries()
    dictionary = unified.chunk(0).dictionary
    if len(dictionary) > CODED_MAX_DISTINCT_SHARE * pf.metadata.num_rows:
        return None
    codes = np.concatenate([pc.fill_null(c.indices, -1).to_numpy() for c in unified.chunks])
    # int16 where the dictionary allows: the gather in mix order is cache-bound, 4x faster on half the bytes
    return dictionary, codes.astype(np.int16) if len(dictionary) < np.iinfo(np.int16).max else codes


def _gather_codes(manifest: Path, sel: Selection, spill: Path) -> dict[str, tuple[pa.Array, np.ndarray]]:
    """Coded columns → (dictionary, memory-mapped codes in mix position order), two columns at a time."""
    pf = pq.ParquetFile(manifest)
    row_at = np.empty(len(sel), np.int64)
    row_at[sel.position] = sel.row  # the manifest row at each mix position

    def gather(name: str) -> tuple[pa.Array, np.ndarray] | None:
        found = _column_codes(manifest, pf, name)
        if found is None:
            return None
        path = spill / f"codes-{name.encode().hex()}.npy"
        np.save(path, found[1][row_at])
        return found[0], np.load(path, mmap_mode="r")

    names = _coded_candidates(manifest, pf)
    with ThreadPoolExecutor(2) as pool:  # Arrow's reads and numpy's gathers release the GIL
        found = list(pool.map(gather, names))
    return {name: f for name, f in zip(names, found) if f is not None}


def _coded_bucket(dictionary: pa.Array, codes: np.ndarray, start: int, n: int, shard_size: int) -> pa.ChunkedArray:
    """The bucket's rows of one coded column: one dictionary chunk per shard (a row group each)."""
    part = np.asarray(codes[start : start + n])
    shards = range(0, n, shard_size)
    if len(dictionary) <= _WHOLE_DICTIONARY_MAX:
        chunks = [_dictionary_chunk(part[s : s + shard_size], dictionary) for s in shards]
        return pa.chunked_array(chunks, pa.dictionary(_CODES, dictionary.type))
    # Only the values each shard uses: factorize (shard, code) pairs. Rows come in shard order, so each
    # shard's values get consecutive ids in order of first use; a shard's local code is id - its first id.
    width = len(dictionary) + 1
    shard = np.arange(n, dtype=np.int64) // shard_size
    ids, pairs = pd.factorize(shard * width + (part.astype(np.int64) + 1))
    first = np.searchsorted(pairs // width, np.arange(len(shards) + 1))
    values = dictionary.take(pa.array(np.maximum(pairs % width - 1, 0)))  # null rows map to value 0: unused
    chunks = [_dictionary_chunk(np.where(part[s : s + shard_size] < 0, -1, ids[s : s + shard_size] - first[i]),
                                values.slice(first[i], first[i + 1] - first[i]))
              for i, s in enumerate(shards)]  # fmt: skip
    return pa.chunked_array(chunks, pa.dictionary(_CODES, dictionary.type))


def _dictionary_chunk(codes: np.ndarray, dictionary: pa.Array) -> pa.DictionaryArray:
    indices = pa.array(codes.astype(np.int32, copy=False), _CODES, mask=codes < 0)
    return pa.DictionaryArray.from_arrays(indices, dictionary)


def _assemble(part: pa.Table, coded: dict[str, pa.ChunkedArray], schema: pa.Schema) -> pa.Table:
    """The bucket's dense and coded columns in the manifest's column order."""
    return pa.table([coded[f.name] if f.name in coded else part[f.name] for f in schema], schema=schema)


# ---- the spill of the other columns --------------------------------------------------------------------
def _spill_by_bucket(
    manifest: Path, sel: Selection, shard_size: int, bucket_rows: int, target: pa.Schema, spill: Path
) -> list[Path]:
    """Pass 2 of write_mix_manifest: selected rows (their dense columns and mix columns) → one IPC file per bucket."""
    by_row = np.argsort(sel.row, kind="stable")
    rows_sorted = sel.row[by_row]
    n_buckets = -(-len(sel) // bucket_rows)
    paths = [spill / f"bucket-{k:05d}.arrow" for k in range(n_buckets)]
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    writers = [pa.ipc.new_file(str(p), target, options=options) for p in paths]
    pf = pq.ParquetFile(manifest)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    columns = [f.name for f in target if f.name in pf.schema_arrow.names]

    def picked_rows(rg: int) -> tuple[pa.Table, np.ndarray] | None:
        """Row group rg's selected rows, grouped by bucket, and the bucket boundaries."""
        a, b = np.searchsorted(rows_sorted, starts[rg : rg + 2])
        if a == b:
            return None
        picked = by_row[a:b]
        bucket = sel.position[picked] // bucket_rows
        order = np.argsort(bucket, kind="stable")
        picked, bucket = picked[order], bucket[order]
        # a reader per call: two loads run at once, and one parquet reader is not meant to be shared
        reader = pq.ParquetFile(manifest, metadata=pf.metadata)
        rows = reader.read_row_group(rg, columns=columns).take(pa.array(sel.row[picked] - starts[rg]))
        return _with_mix_columns(rows, sel, picked, shard_size).cast(target), np.searchsorted(bucket, np.arange(n_buckets + 1))

    for _, result in ahead(picked_rows, range(pf.num_row_groups), depth=2):
        if result is not None:
            part, bounds = result
            for k in np.flatnonzero(np.diff(bounds)):
                writers[k].write_table(part.slice(bounds[k], bounds[k + 1] - bounds[k]))
    for w in writers:
        w.close()
    return paths


def _sorted_bucket(path: Path) -> pa.Table:
    """Pass 3's input: one spilled bucket, in mix_position order."""
    with pa.OSFile(str(path)) as source:
        part = pa.ipc.open_file(source).read_all()
    return part.take(pa.array(np.argsort(part["mix_position"].to_numpy(), kind="stable")))


def _with_mix_columns(rows: pa.Table, sel: Selection, picked: np.ndarray, shard_size: int) -> pa.Table:
    """Append mix_key (uid, or uid-<repeat> in a repeated domain), mix_repeat, mix_position, mix_shard."""
    repeat = pa.array(sel.repeat[picked], pa.int32())
    position = sel.position[picked]
    suffixed = pc.binary_join_element_wise(rows["uid"], repeat.cast(pa.string()), "-")
    key = pc.if_else(pa.array(sel.repeated[picked]), suffixed, rows["uid"])
    return (rows.append_column("mix_key", key).append_column("mix_repeat", repeat)
            .append_column("mix_position", pa.array(position, pa.int64()))
            .append_column("mix_shard", pa.array(position // shard_size, pa.int64())))
