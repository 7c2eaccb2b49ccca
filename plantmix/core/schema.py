"""The manifest contract (DESIGN §4): column names and types shared by every stage."""

from __future__ import annotations

import re

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
    # the distinct captions of the rows collapsed into this one that differ from its own (input order)
    pa.field("collapsed_captions", pa.list_(pa.string())),
    pa.field("drop_reason", pa.string()),  # set at ingest for rows never sent to download
]
CANDIDATE_SCHEMA = pa.schema(CANDIDATE_FIELDS)

# Columns added by download/join, dedup and filter stages.
MANIFEST_EXTRA_FIELDS: list[pa.Field] = [
    pa.field("status", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("phash", pa.uint64()),
    pa.field("phash_mirror", pa.uint64()),  # pHash of the mirror image: flipped copies are near twins
    pa.field("stored_bytes", pa.int64()),  # size of the stored (downloaded, resized) image file
    pa.field("original_bytes", pa.int64()),  # size of the file as downloaded, before img2dataset's resize
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

STATUS_NOT_ATTEMPTED = "not_attempted"  # dropped at ingest, never sent to the downloader
STATUS_MISSING = "missing_from_download"  # sent, but absent from the downloader's output
STATUS_UNDECODABLE = "failed_to_decode"  # stored by the downloader, but its bytes do not decode

# Why the download stage's guards refused a URL: the first word of its error_message (its status stays
# img2dataset's `failed_to_download`, its drop reason `download_failed`); see plantmix.stages.safe_fetch.
ERROR_RESPONSE_TOO_LARGE = "response_too_large"  # body over download.max_bytes (Content-Length or stream)
ERROR_DEADLINE_EXCEEDED = "deadline_exceeded"  # the URL took longer than download.deadline in all
ERROR_HOST_REFUSED = "host_refused"  # a hop to a loopback / private / link-local address, not allowed
ERROR_REDIRECT_REFUSED = "redirect_refused"  # a redirect to a scheme outside download.allowed_schemes

# Columns the decision step adds (DESIGN §3-4).
DECISION_FIELDS: list[pa.Field] = [
    pa.field("captions", pa.list_(pa.string())),  # the kept row's valid captions and its group's, own first
    pa.field("dup_distance", pa.int8()),  # Hamming distance of the pHashes to dup_of (0 for exact twins)
    pa.field("label_conflict", pa.bool_()),  # member of a duplicate group whose rows name different species
]

# Columns the model-based proposals add (scorer embeddings: plantmix.embed, plantmix.curate.model_*).
MODEL_DECISION_FIELDS: list[pa.Field] = [
    pa.field("semantic_cluster", pa.int32()),  # SemDeDup k-means cluster of the image embedding
    pa.field("eval_overlap", pa.string()),  # name of the evaluation set the image overlaps
    pa.field("routed_from", pa.string()),  # the row's domain before relevance routing moved it (route: move)
]

# drop_reason values, each with the stage that proposes it. A row has at most one: the decision step
# applies row-level reasons first (ingest, download, filters), then duplicate groups (DESIGN §3).
# ingest
DROP_UNSUPPORTED_SCHEME = "unsupported_url_scheme"
DROP_MISSING_URL = "missing_url"
DROP_MISSING_IMAGE = "missing_image"  # a local source file that does not exist
# ingest, on no row: rows past a source's `max_rows` are read only to be counted (the funnel's ingest stage)
DROP_OVER_MAX_ROWS = "over_max_rows"
# download / join
DROP_DOWNLOAD_FAILED = "download_failed"  # detail in status / error_message
# split (`plantmix split`): set aside as evaluation data, with the rows of its duplicate group
DROP_HELD_OUT = "held_out"
# filters: image
DROP_TOO_SMALL = "image_too_small"
DROP_ASPECT = "aspect_ratio"
# filters: caption (every caption reason starts with "caption_")
DROP_CAPTION_EMPTY = "caption_empty"
DROP_CAPTION_SHORT = "caption_too_short"
DROP_CAPTION_LONG = "caption_too_long"
DROP_CAPTION_GARBAGE = "caption_garbage"
DROP_CAPTION_SCRIPT = "caption_script"
# model-based proposals (a scorer model's embeddings)
DROP_CLIP_SCORE_LOW = "clip_score_low"  # image-caption similarity below the domain's threshold
DROP_PLANT_IN_GENERAL = "plant_in_general"  # a general-domain row whose image scores as a plant
DROP_NOT_A_PLANT = "not_a_plant"  # a plant-domain row whose image does not score as a plant
DROP_EVAL_OVERLAP = "eval_overlap"  # exact, pHash or embedding copy of an evaluation image
# dedup
DROP_DUPLICATE_EXACT = "duplicate_exact"  # same sha256 as its dup_of
DROP_DUPLICATE_NEAR = "duplicate_near"  # pHash (or its mirror's) within the radius of its dup_of's
DROP_DUPLICATE_SEMANTIC = "duplicate_semantic"  # image embedding within cosine 1 - epsilon of its dup_of's (SemDeDup)

ROW_LEVEL_REASONS = (
    DROP_UNSUPPORTED_SCHEME, DROP_MISSING_URL, DROP_MISSING_IMAGE, DROP_DOWNLOAD_FAILED, DROP_HELD_OUT, DROP_TOO_SMALL,
    DROP_ASPECT, DROP_CAPTION_EMPTY, DROP_CAPTION_SHORT, DROP_CAPTION_LONG, DROP_CAPTION_GARBAGE,
    DROP_CAPTION_SCRIPT, DROP_EVAL_OVERLAP, DROP_CLIP_SCORE_LOW, DROP_PLANT_IN_GENERAL, DROP_NOT_A_PLANT,
)  # fmt: skip
DUPLICATE_REASONS = (DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR, DROP_DUPLICATE_SEMANTIC)


def pandas_readable(table: pa.Table) -> pa.Table:
    """Attach pandas metadata that maps every integer column to pandas' nullable integer dtype.

    Without it `pandas.read_parquet` turns a nullable uint64 column with nulls (pHash) into float64,
    which silently changes every hash; with it pandas reads `UInt64` (etc.), exact. Arrow, DuckDB and
    polars ignore the metadata.
    """
    empty = table.slice(0, 0).to_pandas()
    for f in table.schema:
        if pa.types.is_integer(f.type):
            prefix = "UInt" if pa.types.is_unsigned_integer(f.type) else "Int"
            empty[f.name] = empty[f.name].astype(f"{prefix}{f.type.bit_width}")
    metadata = dict(table.schema.metadata or {})
    metadata.update(pa.Schema.from_pandas(empty, preserve_index=False).metadata)
    return table.replace_schema_metadata(metadata)


def species_folder(species: str) -> str:
    """The ImageFolder class directory of a species, e.g. `quercus_robur` (eval sets and splits)."""
    return re.sub(r"[^a-z0-9-]+", "_", species.lower()).strip("_")
