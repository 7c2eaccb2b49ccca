"""Ingest: every row of every source → candidates.parquet, with a stable uid and provenance.

Nothing is dropped here: rows that cannot be fetched (no URL, a scheme other than the allowed ones)
stay with a `drop_reason`, and rows repeating a uid within a source are collapsed into one row whose
`input_rows` counts them, so `sum(input_rows)` always equals the rows read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from plantmix.stages.captions import caption_variants, pick_caption
from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import Recipe, SourceConfig
from plantmix.core.schema import (
    CANDIDATE_SCHEMA,
    CAPTION_TEMPLATES,
    DROP_MISSING_URL,
    DROP_UNSUPPORTED_SCHEME,
    TAXON_COLUMNS,
)
from plantmix.stages.sources import read_image_folder, read_image_text_folder, read_url_list, read_webdataset

DROP_MISSING_IMAGE = "missing_image"


@dataclass
class SourceIngestReport:
    source: str
    rows_read: int = 0
    candidates: int = 0
    collapsed: int = 0  # rows merged into an earlier row with the same uid
    drops: dict[str, int] = field(default_factory=dict)


def make_uid(source: str, identity: str) -> str:
    """Stable id: hash of (source, source key or url or path)."""
    return hashlib.sha256(f"{source}\x00{identity}".encode()).hexdigest()[:32]


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


def read_source(source: SourceConfig, path: str, taxonomy: Path | None, extract_dir: Path) -> pa.Table:
    if source.format == "url_list":
        return read_url_list(Path(path), source.columns, source.file_format, source.name)
    if source.format == "image_folder":
        return read_image_folder(Path(path), source.name, taxonomy)
    if source.format == "image_text_folder":
        return read_image_text_folder(Path(path), source.name)
    if source.format == "webdataset":
        return read_webdataset(path, source.name, extract_dir / source.name)
    raise PlantmixError(f"source '{source.name}': unknown format '{source.format}'")


def _text(v: object) -> str | None:
    if v is None:
        return None
    s = str(v)
    return s if s.strip() else None


def ingest_source(
    source: SourceConfig, table: pa.Table, allowed_schemes: list[str], seed: int
) -> tuple[list[dict], SourceIngestReport]:
    """Turn one source's rows into candidate rows (list of dicts in CANDIDATE_SCHEMA order)."""
    report = SourceIngestReport(source=source.name)
    if source.max_rows is not None:
        table = table.slice(0, source.max_rows)
    report.rows_read = table.num_rows
    local = source.format != "url_list"
    by_uid: dict[str, dict] = {}
    for i, raw in enumerate(table.to_pylist()):
        url = _text(raw.get("url"))
        path = _text(raw.get("path"))
        key = _text(raw.get("source_key"))
        identity = key or (path if local else url) or f"row:{i}"
        uid = make_uid(source.name, identity)
        if uid in by_uid:
            by_uid[uid]["input_rows"] += 1
            report.collapsed += 1
            continue
        taxa = {c: _text(raw.get(c)) for c in (*TAXON_COLUMNS, "common_name")}
        variants = caption_variants(taxa)
        drop = None
        if local:
            if path is None:
                drop = DROP_MISSING_IMAGE
        elif url is None:
            drop = DROP_MISSING_URL
        elif urlsplit(url).scheme.lower() not in allowed_schemes:
            drop = DROP_UNSUPPORTED_SCHEME
        row = {
            "uid": uid,
            "source": source.name,
            "domain": source.domain,
            "url": url,
            "path": path,
            "caption": pick_caption(source.caption, _text(raw.get("caption")), variants, uid, seed),
            **{f"caption_{t}": variants[t] for t in CAPTION_TEMPLATES},
            "license": _text(raw.get("license")) or source.license,
            "attribution": _text(raw.get("attribution")) or source.attribution,
            **taxa,
            "source_key": key,
            "input_rows": 1,
            "drop_reason": drop,
        }
        by_uid[uid] = row
        if drop:
            report.drops[drop] = report.drops.get(drop, 0) + 1
    report.candidates = len(by_uid)
    return list(by_uid.values()), report


def ingest(
    recipe: Recipe, base_dir: Path, extract_dir: Path, demo_dir: Path | None = None
) -> tuple[pa.Table, list[SourceIngestReport]]:
    """All sources of a recipe → one candidates table (CANDIDATE_SCHEMA), plus per-source reports."""
    rows: list[dict] = []
    reports = []
    for source in recipe.sources:
        path = resolve_source_path(source, base_dir, demo_dir)
        table = read_source(source, path, taxonomy_path(source, base_dir, demo_dir), extract_dir)
        source_rows, report = ingest_source(source, table, recipe.download.allowed_schemes, recipe.seed)
        rows.extend(source_rows)
        reports.append(report)
    table = pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)
    assert sum(r.rows_read for r in reports) == (pc.sum(table["input_rows"]).as_py() or 0)
    return table, reports
