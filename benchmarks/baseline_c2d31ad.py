"""The non-network stages as they stood before they were made columnar (commit c2d31ad), kept only as
the baseline that `bench_build.py` measures today's code against. Not used by plantmix itself.

ingest: per-row Python dicts; filters: a per-row, per-character Python loop; mix manifest: one DuckDB
join + sort at a 2 GB memory limit.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import unicodedata
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.recipe import FilterConfig, Recipe, SourceConfig
from plantmix.core.schema import CANDIDATE_SCHEMA, CAPTION_TEMPLATES, DROP_MISSING_URL, DROP_UNSUPPORTED_SCHEME, TAXON_COLUMNS, TAXON_RANKS
from plantmix.core.stage import atomic_path
from plantmix.mix.manifest import MIX_FIELDS
from plantmix.mix.select import Selection
from plantmix.stages.ingest import DROP_MISSING_IMAGE, SourceIngestReport, make_uid, resolve_source_path



# ---- ingest (url lists; the readers read whole files) ------------------------------------------------

def _clean(v: object) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def caption_variants(taxa: dict[str, object]) -> dict[str, str | None]:
    """All template captions for one row; a template is None when its fields are missing.

    `taxa` maps `taxon_<rank>` and `common_name` to values (missing or empty = unknown).
    """
    species = _clean(taxa.get("taxon_species"))
    common = _clean(taxa.get("common_name"))
    family = _clean(taxa.get("taxon_family"))
    lineage = [(r, _clean(taxa.get(f"taxon_{r}"))) for r in TAXON_RANKS[:-1]]
    lineage = [(r, v) for r, v in lineage if v]

    scientific = f"a photo of {species}." if species else None
    common_c = f"a photo of {common}, a type of plant." if common else None
    taxonomic = None
    if species and lineage:
        taxonomic = f"a photo of {species}, " + ", ".join(f"{r} {v}" for r, v in lineage) + "."
    combined = None
    if species and common:
        combined = f"a photo of {common} ({species})" + (f", a plant of the family {family}." if family else ".")
    elif species or common:
        combined = scientific or common_c
    return {"scientific": scientific, "common": common_c, "taxonomic": taxonomic, "combined": combined}


def pick_caption(mode: str, column_caption: str | None, variants: dict[str, str | None], uid: str, seed: int) -> str | None:
    """The training caption for one row under a source's caption mode.

    `column`: the source's own caption. A template name: that template, falling back to the column
    caption when the template's fields are missing. `sample`: one of the available templates, chosen by
    a hash of (uid, seed) so the choice is stable across runs and machines.
    """
    if mode == "column":
        return column_caption
    if mode == "sample":
        options = [variants[t] for t in CAPTION_TEMPLATES if variants.get(t)]
        if not options:
            return column_caption
        h = int.from_bytes(hashlib.sha256(f"{uid}:{seed}".encode()).digest()[:8], "big")
        return options[h % len(options)]
    return variants.get(mode) or column_caption


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
        uid = make_uid(source.name, key=key, **({"path": path} if local else {"url": url}), row=i)
        taxa = {c: _text(raw.get(c)) for c in (*TAXON_COLUMNS, "common_name")}
        variants = caption_variants(taxa)
        caption = pick_caption(source.caption, _text(raw.get("caption")), variants, uid, seed)
        if uid in by_uid:
            first = by_uid[uid]
            first["input_rows"] += 1
            others = first["collapsed_captions"] or []
            if caption is not None and caption != first["caption"] and caption not in others:
                first["collapsed_captions"] = [*others, caption]
            report.collapsed += 1
            continue
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
            "caption": caption,
            **{f"caption_{t}": variants[t] for t in CAPTION_TEMPLATES},
            "license": _text(raw.get("license")) or source.license,
            "attribution": _text(raw.get("attribution")) or source.attribution,
            **taxa,
            "source_key": key,
            "input_rows": 1,
            "collapsed_captions": None,
            "drop_reason": drop,
        }
        by_uid[uid] = row
        if drop:
            report.drops[drop] = report.drops.get(drop, 0) + 1
    report.candidates = len(by_uid)
    return list(by_uid.values()), report


def ingest(recipe: Recipe, base_dir: Path) -> pa.Table:
    """url-list sources only (what the benchmark world holds), read whole as the old reader did."""
    from plantmix.stages.sources import url_list_batches

    rows = []
    for source in recipe.sources:
        path = Path(resolve_source_path(source, base_dir, None))
        table = pa.Table.from_batches(list(url_list_batches(path, source.columns, source.file_format, source.name, 1 << 40)))
        rows.extend(ingest_source(source, table, recipe.download.allowed_schemes, recipe.seed)[0])
    return pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)


# ---- filters -----------------------------------------------------------------------------------------

from plantmix.curate.filters import (  # noqa: E402
    DROP_ASPECT,
    DROP_CAPTION_EMPTY,
    DROP_CAPTION_GARBAGE,
    DROP_CAPTION_LONG,
    DROP_CAPTION_SCRIPT,
    DROP_CAPTION_SHORT,
    DROP_TOO_SMALL,
)

_FILENAME_LIKE = re.compile(
    r"^\s*(img|dsc|dscn|dcim|pxl|photo|image|screenshot|p)?[\s_-]*\d{2,}[\w-]*(\.(jpe?g|png|gif|webp|heic|tiff?))?\s*$"
    r"|^\s*[\w-]+\.(jpe?g|png|gif|webp|heic|tiff?)\s*$",
    re.IGNORECASE,
)


def _script_of(ch: str) -> str | None:
    """Coarse script of a letter from its Unicode name ('LATIN', 'CYRILLIC', 'CJK', …)."""
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return None
    return name.split(" ")[0]


def caption_reason(caption: str | None, cfg: FilterConfig) -> str | None:
    """Why a caption is unusable, or None."""
    text = (caption or "").strip()
    if not text:
        return DROP_CAPTION_EMPTY
    letters = [c for c in text if c.isalpha()]
    if _FILENAME_LIKE.match(text) or len(letters) < cfg.caption_min_letter_ratio * len(text.replace(" ", "")):
        return DROP_CAPTION_GARBAGE
    if cfg.caption_scripts:
        allowed = {s.upper() for s in cfg.caption_scripts}
        foreign = sum(1 for c in letters if _script_of(c) not in allowed)
        if foreign > 0.2 * len(letters):
            return DROP_CAPTION_SCRIPT
    words = len(text.split())
    if words < cfg.caption_min_words or len(text) < cfg.caption_min_chars:
        return DROP_CAPTION_SHORT
    if words > cfg.caption_max_words or len(text) > cfg.caption_max_chars:
        return DROP_CAPTION_LONG
    return None


def image_reason(width: int | None, height: int | None, cfg: FilterConfig) -> str | None:
    if not width or not height:
        return None  # unknown size: the downloader already refused undecodable images
    if min(width, height) < cfg.min_side:
        return DROP_TOO_SMALL
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return DROP_ASPECT
    return None


def apply_filters(table: pa.Table, cfg: FilterConfig) -> pa.Table:
    """Set keep=false and drop_reason on kept rows that fail a filter (sizes are the originals' sizes)."""
    keep = table["keep"].to_pylist()
    reasons = table["drop_reason"].to_pylist()
    widths = pc.coalesce(table["original_width"], table["width"]).to_pylist()
    heights = pc.coalesce(table["original_height"], table["height"]).to_pylist()
    captions = table["caption"].to_pylist()
    for i, kept in enumerate(keep):
        if not kept:
            continue
        reason = image_reason(widths[i], heights[i], cfg) or caption_reason(captions[i], cfg)
        if reason:
            keep[i] = False
            reasons[i] = reason
    table = table.set_column(table.schema.get_field_index("keep"), "keep", pa.array(keep, pa.bool_()))
    return table.set_column(table.schema.get_field_index("drop_reason"), "drop_reason", pa.array(reasons, pa.string()))


# ---- mix manifest ------------------------------------------------------------------------------------

def write_mix_manifest(
    manifest: Path, sel: Selection, out: Path, shard_size: int, memory_limit: str = "2GB"
) -> None:
    """Join the selection to the full manifest rows and write them in shard order.

    DuckDB does the join and the sort out of core; one row group per output shard lets the shard
    writer read shard i as row group i.
    """
    import duckdb

    sel_table = pa.table(
        {"row": sel.row, "mix_repeat": sel.repeat, "repeated": sel.repeated, "mix_position": sel.position}
    )
    target = pa.schema([f.with_nullable(True) for f in pq.read_schema(manifest)] + MIX_FIELDS)
    src = str(manifest).replace("'", "''")
    query = f"""
        SELECT m.* EXCLUDE (file_row_number),
               CASE WHEN s.repeated THEN m.uid || '-' || CAST(s.mix_repeat AS VARCHAR) ELSE m.uid END AS mix_key,
               s.mix_repeat, s.mix_position, s.mix_position // {int(shard_size)} AS mix_shard
        FROM read_parquet('{src}', file_row_number = true) m JOIN sel_table s ON m.file_row_number = s.row
        ORDER BY s.mix_position"""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=".spill-") as spill:
        con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": spill})
        con.register("sel_table", sel_table)
        reader = con.sql(query).to_arrow_reader(shard_size)
        with pq.ParquetWriter(tmp, target, compression="zstd") as writer:
            pending: list[pa.Table] = []
            rows = 0
            for batch in reader:
                pending.append(pa.Table.from_batches([batch]).cast(target))
                rows += batch.num_rows
                while rows >= shard_size:
                    t = pa.concat_tables(pending)
                    writer.write_table(t.slice(0, shard_size), row_group_size=shard_size)
                    pending, rows = [t.slice(shard_size)], rows - shard_size
            if rows:
                writer.write_table(pa.concat_tables(pending), row_group_size=shard_size)
        con.close()
