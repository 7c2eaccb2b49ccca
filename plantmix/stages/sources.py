"""Source readers: URL lists, image folders and existing webdataset shards → rows with our column names.

Every reader returns a pyarrow Table whose columns are a subset of MAPPABLE_COLUMNS plus `path`
(local image file) and `source_key` (the stable per-source identity used for the uid). Readers never
drop rows; validation (schemes, duplicates) happens in ingest, where it is counted.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from braceexpand import braceexpand

from plantmix.core.errors import PlantmixError
from plantmix.core.members import split_member
from plantmix.core.schema import TAXON_COLUMNS
from plantmix.core.stage import atomic_path

MAPPABLE_COLUMNS = ("url", "caption", "key", "license", "attribution", *TAXON_COLUMNS, "common_name")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def url_list_batches(
    path: Path, columns: dict[str, str], file_format: str | None, source: str, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Stream a csv/tsv/parquet/jsonl URL list as string batches with our column names.

    Only the mapped columns are read. csv/tsv values are read as text (a key like `007` stays `007`);
    jsonl is read whole (Arrow has no streaming json reader here), the others `batch_rows` at a time.
    """
    fmt = file_format or _infer_format(path, source)
    try:
        schema, batches = _open_url_list(path, fmt, batch_rows)
        mapping = _column_mapping(schema.names, columns, path, source)
        _check_text_columns(schema, mapping, path, source)
        rows = 0
        wanted = list(dict.fromkeys(mapping.values()))  # one file column may feed two of ours (url and key)
        for batch in batches(wanted):
            text = {name: _as_text(batch.column(name)) for name in wanted}
            if fmt not in ("csv", "tsv"):  # Arrow's csv reader checks UTF-8 itself; parquet and json readers do not
                _check_utf8(text, rows, path, source)
            rows += batch.num_rows
            yield pa.RecordBatch.from_arrays([text[theirs] for theirs in mapping.values()],
                                             names=["source_key" if ours == "key" else ours for ours in mapping])  # fmt: skip
    except FileNotFoundError:
        raise PlantmixError(f"source '{source}': file not found: {path}") from None
    except PermissionError:
        raise PlantmixError(f"source '{source}': no permission to read {path}") from None
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        hint = "; the file must be UTF-8 (re-encode it, e.g. with iconv)" if "utf" in str(e).lower() else ""
        raise PlantmixError(f"source '{source}': cannot read {path} as {fmt}: {str(e).splitlines()[0]}{hint}") from None


def _as_text(column: pa.Array) -> pa.Array:
    return column if column.type == pa.string() else column.cast(pa.string())


def _check_text_columns(schema: pa.Schema, mapping: dict[str, str], path: Path, source: str) -> None:
    """Every mapped column must hold scalar values that read as text (lists, structs and maps do not)."""
    for ours, theirs in mapping.items():
        t = schema.field(theirs).type
        value = t.value_type if pa.types.is_dictionary(t) else t
        if pa.types.is_nested(value):
            raise PlantmixError(
                f"source '{source}': column '{theirs}' of {path} (our {ours}) holds {t} values; it must hold one "
                "text value per row (a string, or a number)"
            )


def _check_utf8(columns: dict[str, pa.Array], first_row: int, path: Path, source: str) -> None:
    for name, column in columns.items():
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as e:
            at = re.search(r"string index (\d+)", str(e))
            row = f" (row {first_row + int(at.group(1))})" if at else ""
            raise PlantmixError(f"source '{source}': column '{name}' of {path} holds bytes that are not UTF-8{row}") from None


def _open_url_list(path: Path, fmt: str, batch_rows: int):
    """(the file's schema, a function from wanted columns to an iterator of record batches)."""
    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        return pf.schema_arrow, lambda wanted: pf.iter_batches(batch_size=batch_rows, columns=wanted)
    if fmt in ("csv", "tsv"):
        parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
        names = pacsv.open_csv(path, parse_options=parse).schema.names

        def batches(wanted: list[str]) -> Iterator[pa.RecordBatch]:
            convert = pacsv.ConvertOptions(
                strings_can_be_null=False, include_columns=wanted, column_types={n: pa.string() for n in names}
            )
            yield from pacsv.open_csv(path, parse_options=parse, convert_options=convert,
                                      read_options=pacsv.ReadOptions(block_size=1 << 24))

        return pa.schema([pa.field(n, pa.string()) for n in names]), batches
    table = pajson.read_json(path)
    return table.schema, lambda wanted: table.select(wanted).to_batches(batch_rows)


def _column_mapping(names: list[str], columns: dict[str, str], path: Path, source: str) -> dict[str, str]:
    """our column → the file's, for the mappable columns the file has (checked: url and every mapped one)."""
    mapping = {ours: columns.get(ours, ours) for ours in MAPPABLE_COLUMNS}
    if mapping["url"] not in names:
        raise PlantmixError(
            f"source '{source}': {path} has no url column '{mapping['url']}' "
            f"(columns: {', '.join(names)}); map it with `columns: {{url: <name>}}`"
        )
    missing = [theirs for theirs in columns.values() if theirs not in names]
    if missing:
        raise PlantmixError(f"source '{source}': {path} lacks mapped column(s) {missing} (columns: {', '.join(names)})")
    found = {ours: theirs for ours, theirs in mapping.items() if theirs in names}
    repeated = sorted({theirs for theirs in found.values() if names.count(theirs) > 1})
    if repeated:
        raise PlantmixError(f"source '{source}': {path} has more than one column named {', '.join(map(repr, repeated))}")
    return found


def _infer_format(path: Path, source: str) -> str:
    suffixes = "".join(path.suffixes[-2:]).lower()
    for ext, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if suffixes.endswith(ext) or path.suffix.lower() == ext:
            return fmt
    raise PlantmixError(
        f"source '{source}': cannot tell the format of {path} from its extension; set `file_format` to csv, tsv, parquet or jsonl"
    )


def _load_taxonomy(path: Path | None, source: str) -> dict[str, dict[str, str]]:
    """folder name → taxon columns, from a csv with a `folder` column (optional)."""
    if path is None:
        return {}
    try:
        table = pacsv.read_csv(path).to_pylist()
    except (OSError, pa.ArrowInvalid) as e:  # missing, a directory, unreadable, not csv
        raise PlantmixError(f"source '{source}': cannot read taxonomy table {path}: {str(e).splitlines()[0]}") from None
    if table and "folder" not in table[0]:
        raise PlantmixError(f"source '{source}': taxonomy table {path} needs a 'folder' column")
    return {str(r["folder"]): {k: v for k, v in r.items() if k in MAPPABLE_COLUMNS and v not in (None, "")} for r in table}


def _require_dir(path: Path, source: str) -> None:
    if not path.is_dir():
        raise PlantmixError(f"source '{source}': image folder not found or not a directory: {path}")


def read_image_folder(root: Path, source: str, taxonomy: Path | None = None) -> pa.Table:
    """ImageFolder layout `root/<class>/<image>`: the class folder names the species.

    `Genus_species` (or `Genus species`) folder names give species and genus; an optional taxonomy
    table adds or overrides columns per folder. Built column-wise: one small row per folder, taken
    once per image.
    """
    _require_dir(root, source)
    taxa_by_folder = _load_taxonomy(taxonomy, source)
    folders, paths, keys, folder_of = [], [], [], []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        name = cls.name.replace("_", " ").strip()
        folders.append({"taxon_species": name, "taxon_genus": name.split(" ")[0], **taxa_by_folder.get(cls.name, {})})
        resolved = cls.resolve()
        for img in sorted(p for p in cls.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            direct = img.parent == cls and not img.is_symlink()  # resolving once per folder is then exact
            paths.append(str(resolved / img.name) if direct else str(img.resolve()))
            keys.append(str(img.relative_to(root)))
            folder_of.append(len(folders) - 1)
    taxa = _rows_to_table(folders).drop(["path"]).take(pa.array(folder_of, pa.int64()))
    table = pa.table({"path": pa.array(paths, pa.string()), "source_key": pa.array(keys, pa.string())})
    for name in taxa.column_names:
        table = table.append_column(name, taxa[name])
    return table


def _rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows with differing keys → a string table over the union of keys (missing values null)."""
    names = list(dict.fromkeys(["path", *(k for r in rows for k in r)]))
    return pa.table({n: pa.array([r.get(n) for r in rows], pa.string()) for n in names})


def read_image_text_folder(root: Path, source: str) -> pa.Table:
    """Images with a caption in a same-named `.txt` file beside them (a missing .txt gives a null caption)."""
    _require_dir(root, source)
    rows = []
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        txt = img.with_suffix(".txt")
        caption = txt.read_text(errors="replace").strip() if txt.exists() else None
        rows.append({"path": str(img.resolve()), "source_key": str(img.relative_to(root)), "caption": caption})
    return _rows_to_table(rows)


def expand_shards(pattern: str, source: str) -> list[Path]:
    """A directory (all .tar inside), a brace pattern (`shards/{00000..00009}.tar`) or one tar path."""
    p = Path(pattern)
    if p.is_dir():
        paths = sorted(p.glob("*.tar"))
    else:
        paths = [Path(x) for x in braceexpand(pattern)]
    missing = [str(x) for x in paths if not x.is_file()]
    if not paths or missing:
        raise PlantmixError(f"source '{source}': webdataset shard(s) not found: {missing[:3] or pattern}")
    return paths


def safe_member_stem(key: str) -> str:
    """A file-name-safe version of an external tar sample key: no separators, no leading dots."""
    stem = _SAFE_NAME.sub("_", key).lstrip("._") or "sample"
    return stem[:120]


def read_webdataset(pattern: str, source: str, extract_dir: Path) -> pa.Table:
    """Read samples from existing webdataset tars; images are extracted under `extract_dir` with sanitised names.

    Member names from external tars are never used as paths: only regular members are read, through
    `extractfile`, and written under a sanitised stem plus an index, so `../` or absolute names cannot escape.
    """
    rows = []
    extract_dir.mkdir(parents=True, exist_ok=True)
    for shard in expand_shards(pattern, source):
        samples: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        try:
            with tarfile.open(shard, "r:*") as tar:
                for m in tar:
                    if not m.isreg():
                        continue
                    key, ext = split_member(m.name)
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    data = tar.extractfile(m)
                    samples[key][ext.lower()] = data.read() if data else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            # tarfile lists one line per compression it tried: say what they mean in one
            why = "not a tar file (plain, gz, bz2 or xz)" if "could not be opened" in str(e) else str(e).splitlines()[0]
            raise PlantmixError(f"source '{source}': cannot read webdataset shard {shard}: {why}") from None
        for i, key in enumerate(order):
            parts = samples[key]
            img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            meta = _json_or_empty(parts.get("json"))
            caption = parts["txt"].decode("utf-8", "replace").strip() if "txt" in parts else meta.get("caption")
            row = {"source_key": f"{shard.name}/{key}", "caption": caption, "url": meta.get("url")}
            if img_ext is not None:
                out = extract_dir / f"{shard.stem}-{i:06d}-{safe_member_stem(key)}.{img_ext}"
                if not _holds(out, parts[img_ext]):  # rewritten only when changed: its mtime keys the download
                    with atomic_path(out) as tmp:
                        tmp.write_bytes(parts[img_ext])
                row["path"] = str(out.resolve())
            else:
                row["path"] = None
            for k in MAPPABLE_COLUMNS:
                if k not in row and k in meta and k != "key" and meta[k] is not None:
                    row[k] = str(meta[k])
            rows.append(row)
    return _rows_to_table(rows)


def _holds(path: Path, data: bytes) -> bool:
    """True when `path` is a file with exactly these bytes (a replaced source tar's image is not)."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _json_or_empty(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        value = json.load(io.BytesIO(data))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
