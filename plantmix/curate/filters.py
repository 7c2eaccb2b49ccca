"""Basic filters on image size and caption text. Every drop names its reason; earlier drops are kept."""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa
import pyarrow.compute as pc

from plantmix.core.recipe import FilterConfig
from plantmix.core.schema import (
    DROP_ASPECT, DROP_CAPTION_EMPTY, DROP_CAPTION_GARBAGE, DROP_CAPTION_LONG, DROP_CAPTION_SCRIPT, DROP_CAPTION_SHORT,
    DROP_TOO_SMALL,
)  # fmt: skip

# Camera and file names that crawls often carry instead of a caption.
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


FILTER_PROPOSAL_SCHEMA = pa.schema(
    [pa.field("uid", pa.string()), pa.field("image_reason", pa.string()), pa.field("caption_reason", pa.string())]
)


def filter_proposals(table: pa.Table, cfg: FilterConfig) -> pa.Table:
    """Row-level proposals (DESIGN §3): why each row with a usable image fails the image rules and,
    separately, the caption rules (null = passes). The decision step applies them; keeping the two
    apart lets it tell a member's valid caption from its bad image when it gathers group captions.
    Sizes are the originals' (img2dataset records them before resizing)."""
    usable = table["keep"].to_pylist()
    widths = pc.coalesce(table["original_width"], table["width"]).to_pylist()
    heights = pc.coalesce(table["original_height"], table["height"]).to_pylist()
    captions = table["caption"].to_pylist()
    image = [image_reason(w, h, cfg) if u else None for u, w, h in zip(usable, widths, heights)]
    caption = [caption_reason(c, cfg) if u else None for u, c in zip(usable, captions)]
    return pa.table([table["uid"], pa.array(image, pa.string()), pa.array(caption, pa.string())], schema=FILTER_PROPOSAL_SCHEMA)
