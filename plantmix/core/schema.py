"""The manifest contract (DESIGN §4): column names and types shared by every stage."""

from __future__ import annotations

import pyarrow as pa

TAXON_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
TAXON_COLUMNS = tuple(f"taxon_{rank}" for rank in TAXON_RANKS)
CAPTION_TEMPLATES = ("scientific", "common", "taxonomic", "combined")
DOMAINS = ("plant", "general")

# Columns every candidate row carries after ingest.
CANDIDATE_FIELDS: list[pa.Field] = [
    pa.field("uid", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("path", pa.string()),
    pa.field("caption", pa.string()),
    *[pa.field(f"caption_{t}", pa.string()) for t in CAPTION_TEMPLATES],
    pa.field("license", pa.string()),
    pa.field("attribution", pa.string()),
    *[pa.field(c, pa.string()) for c in TAXON_COLUMNS],
    pa.field("common_name", pa.string()),
    pa.field("source_key", pa.string()),
    pa.field("input_rows", pa.int64(), nullable=False),  # >1 when duplicate uids were collapsed
    pa.field("drop_reason", pa.string()),  # set at ingest for rows never sent to download
]
CANDIDATE_SCHEMA = pa.schema(CANDIDATE_FIELDS)

# Columns added by download/join, dedup and filter stages.
MANIFEST_EXTRA_FIELDS: list[pa.Field] = [
    pa.field("status", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("phash", pa.uint64()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("original_width", pa.int64()),
    pa.field("original_height", pa.int64()),
    pa.field("shard", pa.string()),
    pa.field("key", pa.string()),
    pa.field("clip_score", pa.float32()),
    pa.field("plant_score", pa.float32()),
    pa.field("dup_of", pa.string()),
    pa.field("keep", pa.bool_(), nullable=False),
]

# drop_reason values. A row has at most one; the first stage that drops it names it.
DROP_UNSUPPORTED_SCHEME = "unsupported_url_scheme"
DROP_MISSING_URL = "missing_url"
DROP_DOWNLOAD_FAILED = "download_failed"  # detail in status / error_message
DROP_DUPLICATE_EXACT = "duplicate_exact"
DROP_DUPLICATE_NEAR = "duplicate_near"
