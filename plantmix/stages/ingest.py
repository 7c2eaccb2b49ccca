"""Ingest: every row of every source → candidates.parquet, with a stable uid and provenance.

Nothing is lost here: rows that cannot be fetched (no URL, a scheme other than the allowed ones)
stay with a `drop_reason`; rows repeating a uid within a source are collapsed into one row whose
`input_rows` counts them and whose `collapsed_captions` keeps their other captions; rows past a
source's `max_rows` are counted (`over_max_rows` in the ingest report). So `sum(input_rows)` plus the
rows past the caps always equals the rows read.

A uid hashes the source name with the row's identity in its own namespace: `key:<source key>`, else
`path:<file>` (local sources) or `url:<url>`, else `row:<index>`. One row's key can then never equal
another row's URL or row number.

Columnar and streamed, so memory is bounded by `resources.batch_rows` and DuckDB's memory limit, not
by the input: each source is read a batch at a time and normalised by one DuckDB query (uid hashing,
scheme checks, caption templates as column expressions) into a spill file; a group-by on uid finds
the repeated rows; a second streaming pass drops them and appends the source's candidates, in input
order, to the output.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.duck import connect, sql_quote
from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import Recipe, ResourcesConfig, SourceConfig
from plantmix.core.schema import (
    CANDIDATE_SCHEMA,
    CAPTION_TEMPLATES,
    DROP_MISSING_IMAGE,
    DROP_MISSING_URL,
    DROP_UNSUPPORTED_SCHEME,
    TAXON_COLUMNS,
)
from plantmix.core.stage import atomic_path, atomic_write_text
from plantmix.stages.captions import caption_variants, pick_caption
from plantmix.stages.sources import (
    read_image_folder,
    read_image_text_folder,
    read_webdataset,
    url_list_batches,
)

_TEXT_COLUMNS = ("url", "path", "source_key", "caption", "license", "attribution", *TAXON_COLUMNS, "common_name")


@dataclass
class SourceIngestReport:
    source: str
    domain: str = ""
    rows_read: int = 0  # rows normalised into candidates (at most max_rows)
    candidates: int = 0
    collapsed: int = 0  # rows merged into an earlier row with the same uid
    over_max_rows: int = 0  # rows past the source's max_rows: read, counted, not ingested
    drops: dict[str, int] = field(default_factory=dict)


# The namespaces of a row's identity, in precedence order: a uid is hashed from the first one present.
UID_NAMESPACES = ("key", "path", "url", "row")


def make_uid(source: str, *, key: str | None = None, path: str | None = None, url: str | None = None,
             row: int | None = None) -> str:
    """Stable id of one row: the first 32 hex digits of sha256("<source>\\0<namespace>:<value>"), from
    the first of key, path, url, row given (see the module doc)."""
    for namespace, value in zip(UID_NAMESPACES, (key, path, url, row)):
        if value is not None:
            return hashlib.sha256(f"{source}\x00{namespace}:{value}".encode()).hexdigest()[:32]
    raise ValueError("make_uid needs a key, path, url or row")


def resolve_path(raw: str, base_dir: Path, demo_dir: Path | None, source: str) -> str:
    """Expand `{demo}` and make relative paths relative to the recipe's directory."""
    if "{demo}" in raw:
        if demo_dir is None:
            raise PlantmixError(f"source '{source}': path uses {{demo}} but no demo world was generated")
        raw = raw.replace("{demo}", str(demo_dir))
    p = Path(raw).expanduser()
    return str(p if p.is_absolute() else base_dir / p)


def resolve_source_path(source: SourceConfig, base_dir: Path, demo_dir: Path | None) -> str:
    return resolve_path(source.path, base_dir, demo_dir, source.name)


def taxonomy_path(source: SourceConfig, base_dir: Path, demo_dir: Path | None) -> Path | None:
    """The image-folder taxonomy table, resolved like the source path (None when not given)."""
    return Path(resolve_path(source.taxonomy, base_dir, demo_dir, source.name)) if source.taxonomy else None


def source_batches(
    source: SourceConfig, path: str, taxonomy: Path | None, extract_dir: Path, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """A source's rows, with our column names, `batch_rows` at a time (all of them: `capped` applies
    `max_rows`)."""
    if source.format == "url_list":
        batches = url_list_batches(Path(path), source.columns, source.file_format, source.name, batch_rows)
    elif source.format == "image_folder":
        batches = read_image_folder(Path(path), source.name, taxonomy).to_batches(batch_rows)
    elif source.format == "image_text_folder":
        batches = read_image_text_folder(Path(path), source.name).to_batches(batch_rows)
    elif source.format == "webdataset":
        batches = read_webdataset(path, source.name, extract_dir / source.name).to_batches(batch_rows)
    else:
        raise PlantmixError(f"source '{source.name}': unknown format '{source.format}'")
    yield from batches


def capped(batches: Iterator[pa.RecordBatch], max_rows: int | None, report: SourceIngestReport) -> Iterator[pa.RecordBatch]:
    """The first `max_rows` rows of `batches`; the rows past the cap are read to the end only to be
    counted in `report.over_max_rows`, so the funnel accounts for every input row."""
    left = max_rows
    for batch in batches:
        take = batch.num_rows if left is None else min(left, batch.num_rows)
        report.over_max_rows += batch.num_rows - take
        if take:
            yield batch.slice(0, take)
        if left is not None:
            left -= take


def _text(batch: pa.RecordBatch, name: str) -> tuple[pa.Array, pa.Array]:
    """(value, stripped value) of a reader column; both null when missing or blank (blank as
    Python's str.strip sees it: Arrow's whitespace trim strips exactly that set, a test checks)."""
    n = batch.num_rows
    col = batch.column(name) if name in batch.schema.names else None
    if col is None or col.null_count == n:
        return pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
    stripped = pc.utf8_trim_whitespace(col)
    blank = pc.equal(stripped, "")
    if pc.any(blank).as_py():
        col, stripped = (pc.if_else(blank, pa.scalar(None, pa.string()), c) for c in (col, stripped))
    return col, stripped


def _drop_reasons(source: SourceConfig, url: pa.Array, path: pa.Array, allowed_schemes: list[str]) -> pa.Array:
    """missing_image / missing_url / unsupported_url_scheme, or null."""
    null = pa.scalar(None, pa.string())
    if source.format != "url_list":
        return pc.if_else(pc.is_null(path), pa.scalar(DROP_MISSING_IMAGE), null)
    # the scheme as urllib's urlsplit reads it: tabs and newlines removed, leading C0 controls and spaces stripped
    clean = pc.replace_substring_regex(pc.replace_substring_regex(url, r"[\t\r\n]", ""), r"^[\x00-\x20]+", "")
    scheme = pc.utf8_lower(pc.struct_field(pc.extract_regex(clean, r"^(?P<s>[A-Za-z][A-Za-z0-9+.-]*):"), [0]))
    allowed = pc.fill_null(pc.is_in(scheme, pa.array(allowed_schemes, pa.string())), False)
    return pc.if_else(pc.is_null(url), pa.scalar(DROP_MISSING_URL), pc.if_else(allowed, null, pa.scalar(DROP_UNSUPPORTED_SCHEME)))


def _hashes(con: duckdb.DuckDBPyConnection, source: str, identity: pa.Array, seed: int) -> tuple[pa.Array, np.ndarray]:
    """uid = first 32 hex digits of sha256("<source>\\0<identity>"), and the caption pick hash: the
    first 8 bytes (big-endian) of sha256("<uid>:<seed>")."""
    con.register("ids", pa.table({"identity": identity}))
    hashed = con.sql(
        f"""SELECT uid, ('0x' || substr(sha256(uid || {sql_quote(f":{seed}")}), 1, 16))::UBIGINT AS pick
            FROM (SELECT substr(sha256(encode({sql_quote(source)}) || '\\x00'::BLOB || encode(identity)), 1, 32) AS uid FROM ids)"""
    ).to_arrow_table()
    con.unregister("ids")
    return hashed["uid"].combine_chunks(), hashed["pick"].to_numpy()


def normalise(
    con: duckdb.DuckDBPyConnection, source: SourceConfig, batch: pa.RecordBatch, first_row: int,
    allowed_schemes: list[str], seed: int,
) -> pa.Table:
    """A reader batch → candidate rows: CANDIDATE_SCHEMA (input_rows = 1 until repeats are counted), then `rn`."""
    n = batch.num_rows
    value, stripped = {}, {}
    for name in _TEXT_COLUMNS:
        value[name], stripped[name] = _text(batch, name)
    rn = pa.array(np.arange(first_row, first_row + n), pa.int64())
    located = "path" if source.format != "url_list" else "url"
    identity = pc.coalesce(*(_namespaced(ns, v) for ns, v in (("key", value["source_key"]), (located, value[located]),
                                                               ("row", rn.cast(pa.string())))))
    uid, pick_hash = _hashes(con, source.name, identity, seed)
    variants = caption_variants({c: stripped[c] for c in (*TAXON_COLUMNS, "common_name")})
    columns = {
        "uid": uid, "source": pa.nulls(n, pa.string()).fill_null(source.name),
        "domain": pa.nulls(n, pa.string()).fill_null(source.domain), "url": value["url"], "path": value["path"],
        "caption": pick_caption(source.caption, value["caption"], variants, pick_hash),
        **{f"caption_{t}": variants[t] for t in CAPTION_TEMPLATES},
        "license": _fallback(value["license"], source.license),
        "attribution": _fallback(value["attribution"], source.attribution),
        **{c: value[c] for c in (*TAXON_COLUMNS, "common_name", "source_key")},
        "input_rows": pa.array(np.ones(n, np.int64)),
        "collapsed_captions": pa.nulls(n, _CAPTION_LIST),
        "drop_reason": _drop_reasons(source, value["url"], value["path"], allowed_schemes),
        "rn": rn,
    }
    return pa.table(columns, schema=_NORMALISED_SCHEMA)


def _namespaced(namespace: str, values: pa.Array) -> pa.Array:
    """"<namespace>:<value>" (null where the value is null); see `make_uid`."""
    assert namespace in UID_NAMESPACES
    return pc.binary_join_element_wise(f"{namespace}:", values, "")


def _fallback(column: pa.Array, default: str | None) -> pa.Array:
    return column if default is None else pc.coalesce(column, pa.scalar(default))


_CAPTION_LIST = CANDIDATE_SCHEMA.field("collapsed_captions").type
_NORMALISED_SCHEMA = CANDIDATE_SCHEMA.append(pa.field("rn", pa.int64()))
_KEYS_SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False), pa.field("rn", pa.int64())])
# Columns with few distinct values: dictionary-encoded in candidates.parquet (the others are not
# worth the encoder's attempt).
_DICTIONARY_COLUMNS = [f.name for f in CANDIDATE_SCHEMA
                       if f.name not in ("uid", "url", "path", "caption", "source_key", "input_rows", "collapsed_captions")]


def ingest_source(
    con: duckdb.DuckDBPyConnection, source: SourceConfig, batches: Iterator[pa.RecordBatch],
    allowed_schemes: list[str], seed: int, writer: pq.ParquetWriter, spill: Path, batch_rows: int,
) -> SourceIngestReport:
    """Normalise one source's batches (at most `max_rows` rows, the rest counted), collapse repeated
    uids into their first row (keeping the other captions), append its candidates to `writer`."""
    report = SourceIngestReport(source=source.name, domain=source.domain)
    # Spill: the normalised rows as Arrow IPC (cheap to write and read back), their (uid, rn) as
    # parquet for DuckDB's group-by.
    normalised, keys = spill / f"{source.name}.arrow", spill / f"{source.name}.keys.parquet"
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.ipc.new_file(str(normalised), _NORMALISED_SCHEMA, options=options) as out, \
            pq.ParquetWriter(keys, _KEYS_SCHEMA, compression="none", use_dictionary=False) as key_out:
        for batch in capped(batches, source.max_rows, report):
            rows = normalise(con, source, batch, report.rows_read, allowed_schemes, seed)
            out.write_table(rows)
            key_out.write_table(rows.select(_KEYS_SCHEMA.names))
            report.rows_read += batch.num_rows
    first, count, later, later_first = _repeats(con, keys)
    with_extra, extra = _collapsed_captions(con, normalised, first, later, later_first)
    drops: dict[str, int] = {}
    with pa.OSFile(str(normalised)) as spill_file:  # read, not mapped: mapped pages would count as resident
        spilled = pa.ipc.open_file(spill_file)
        for i in range(spilled.num_record_batches):
            batch = spilled.get_batch(i)
            rn = batch["rn"].to_numpy()
            input_rows = np.ones(len(rn), np.int64)
            is_first, at = _find_sorted(first, rn)
            input_rows[is_first] = count[at[is_first]]
            has_extra, where = _find_sorted(with_extra, rn)
            captions = extra.take(pa.array(where, mask=~has_extra)) if has_extra.any() else pa.nulls(len(rn), _CAPTION_LIST)
            kept = pa.Table.from_batches([batch])
            for name, column in (("input_rows", pa.array(input_rows, pa.int64())), ("collapsed_captions", captions)):
                kept = kept.set_column(CANDIDATE_SCHEMA.get_field_index(name), name, column)
            kept = kept.filter(pa.array(~_find_sorted(later, rn)[0])).drop_columns(["rn"])
            writer.write_table(kept.cast(CANDIDATE_SCHEMA))
            report.candidates += kept.num_rows
            for v in pc.value_counts(kept["drop_reason"].drop_null()).to_pylist():
                drops[v["values"]] = drops.get(v["values"], 0) + v["counts"]
    normalised.unlink()
    keys.unlink()
    report.collapsed, report.drops = len(later), drops
    return report


def _repeats(con: duckdb.DuckDBPyConnection, keys: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For uids seen more than once: their first row and count (sorted by row), and every later row
    (sorted) with the first row of its uid."""
    src = sql_quote(str(keys))
    con.execute(f"CREATE OR REPLACE TEMP TABLE dups AS SELECT uid, min(rn) AS first, count(*) AS n "
                f"FROM read_parquet({src}) GROUP BY uid HAVING count(*) > 1")
    firsts = con.sql("SELECT first, n FROM dups ORDER BY first").fetchnumpy()
    later = con.sql(f"SELECT t.rn, d.first FROM read_parquet({src}) t JOIN dups d USING (uid) WHERE t.rn <> d.first ORDER BY 1").fetchnumpy()
    con.execute("DROP TABLE dups")
    return (np.asarray(firsts["first"], np.int64), np.asarray(firsts["n"], np.int64),
            np.asarray(later["rn"], np.int64), np.asarray(later["first"], np.int64))  # fmt: skip


def _collapsed_captions(
    con: duckdb.DuckDBPyConnection, normalised: Path, first: np.ndarray, later: np.ndarray, later_first: np.ndarray
) -> tuple[np.ndarray, pa.Array]:
    """(first rows, sorted; their `collapsed_captions`) for the first rows whose later rows carry
    captions other than their own: distinct, in input order. Reads only the caption and row-number
    columns of the repeated rows back from the spill."""
    if not len(later):
        return np.zeros(0, np.int64), pa.array([], _CAPTION_LIST)
    fields = [_NORMALISED_SCHEMA.get_field_index(c) for c in ("caption", "rn")]
    parts = []
    with pa.OSFile(str(normalised)) as spill_file:
        spilled = pa.ipc.open_file(spill_file, options=pa.ipc.IpcReadOptions(included_fields=fields))
        for i in range(spilled.num_record_batches):
            batch = spilled.get_batch(i)
            rn = batch["rn"].to_numpy()
            parts.append(batch.filter(pa.array(_find_sorted(first, rn)[0] | _find_sorted(later, rn)[0])))
    con.register("rep_captions", pa.Table.from_batches(parts, schema=parts[0].schema))
    con.register("rep_later", pa.table({"rn": later, "first": later_first}))
    found = con.sql(
        """SELECT first, list(caption ORDER BY pos) AS captions FROM (
             SELECT l.first, c.caption, min(l.rn) AS pos
             FROM rep_later l JOIN rep_captions c USING (rn) JOIN rep_captions own ON own.rn = l.first
             WHERE c.caption IS NOT NULL AND c.caption IS DISTINCT FROM own.caption GROUP BY 1, 2)
           GROUP BY 1 ORDER BY 1"""
    ).to_arrow_table()
    con.unregister("rep_captions")
    con.unregister("rep_later")
    return found["first"].to_numpy(), found["captions"].combine_chunks().cast(_CAPTION_LIST)


def _find_sorted(sorted_keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, position) of each value in a sorted array of distinct keys."""
    if not len(sorted_keys):
        return np.zeros(len(values), bool), np.zeros(len(values), np.int64)
    at = np.searchsorted(sorted_keys, values).clip(max=len(sorted_keys) - 1)
    return sorted_keys[at] == values, at


def ingest_to_parquet(
    recipe: Recipe, base_dir: Path, extract_dir: Path, demo_dir: Path | None, out_path: Path,
    spill: Path | None = None, progress: Callable[[str, int], None] | None = None,
) -> list[SourceIngestReport]:
    """All sources of a recipe → `out_path` (CANDIDATE_SCHEMA, sources in recipe order, rows in input
    order), written atomically; returns per-source reports."""
    resources: ResourcesConfig = recipe.resources
    out_path = Path(out_path)
    spill_root = Path(spill) if spill is not None else out_path.parent
    spill_root.mkdir(parents=True, exist_ok=True)
    reports = []
    with tempfile.TemporaryDirectory(dir=spill_root, prefix=".ingest-") as tmp, atomic_path(out_path) as part:
        con = connect(resources, Path(tmp) / "duckdb")
        with pq.ParquetWriter(part, CANDIDATE_SCHEMA, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS) as writer:
            for source in recipe.sources:
                path = resolve_source_path(source, base_dir, demo_dir)
                batches = source_batches(source, path, taxonomy_path(source, base_dir, demo_dir), extract_dir,
                                         resources.batch_rows)
                reports.append(ingest_source(con, source, batches, recipe.download.allowed_schemes, recipe.seed,
                                             writer, Path(tmp), resources.batch_rows))
                if progress:
                    progress(source.name, reports[-1].rows_read)
        con.close()
        rows = sum(r.candidates for r in reports)
        assert pq.read_metadata(part).num_rows == rows
        # written before the candidates are renamed into place, so a current candidates file always
        # has a current report beside it
        atomic_write_text(report_path(out_path), json.dumps([asdict(r) for r in reports], indent=1))
    return reports


def report_path(candidates: Path) -> Path:
    """The ingest report beside candidates.parquet: per source, rows read, collapsed, past max_rows, drops."""
    candidates = Path(candidates)
    return candidates.with_name(candidates.stem + ".ingest.json")


def over_max_rows(candidates: Path) -> pa.Table:
    """(source, domain, rows) of the rows past each source's `max_rows`, from the ingest report (no
    rows when there is none: a build ingested before the report existed)."""
    path = report_path(candidates)
    reports = json.loads(path.read_text()) if path.is_file() else []
    capped_sources = [r for r in reports if r.get("over_max_rows")]
    return pa.table({"source": pa.array([r["source"] for r in capped_sources], pa.string()),
                     "domain": pa.array([r["domain"] for r in capped_sources], pa.string()),
                     "rows": pa.array([r["over_max_rows"] for r in capped_sources], pa.int64())})  # fmt: skip


def ingest(
    recipe: Recipe, base_dir: Path, extract_dir: Path, demo_dir: Path | None = None
) -> tuple[pa.Table, list[SourceIngestReport]]:
    """All sources of a recipe → one in-memory candidates table, plus per-source reports (small inputs)."""
    with tempfile.TemporaryDirectory() as tmp:
        reports = ingest_to_parquet(recipe, base_dir, extract_dir, demo_dir, Path(tmp) / "candidates.parquet")
        table = pq.read_table(Path(tmp) / "candidates.parquet")
    assert sum(r.rows_read for r in reports) == (pc.sum(table["input_rows"]).as_py() or 0)
    return table, reports
