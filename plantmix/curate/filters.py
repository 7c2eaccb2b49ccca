"""Basic filters on image size and caption text, vectorised (numpy over UTF-8 buffers, RE2 for file names).

`filter_reasons` names, for every row, the first rule it fails: image size, then aspect ratio, then
caption empty, garbage, foreign script, too short, too long. Text rules follow Python's `str`
semantics exactly (whitespace as `str.isspace`, letters as `str.isalpha`, `\\d`/`\\w` as in `re`), so
the decisions equal the per-row Python implementation they replace (tests compare them).
"""

from __future__ import annotations

import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plantmix.core.recipe import FilterConfig
from plantmix.core.text import WHITESPACE_RE2, string_buffers

from plantmix.core.schema import (
    DROP_ASPECT, DROP_CAPTION_EMPTY, DROP_CAPTION_GARBAGE, DROP_CAPTION_LONG, DROP_CAPTION_SCRIPT, DROP_CAPTION_SHORT,
    DROP_TOO_SMALL,
)  # fmt: skip
# Rule order = precedence: a row gets the first reason that applies.
FILTER_REASONS = (
    DROP_TOO_SMALL, DROP_ASPECT, DROP_CAPTION_EMPTY, DROP_CAPTION_GARBAGE, DROP_CAPTION_SCRIPT,
    DROP_CAPTION_SHORT, DROP_CAPTION_LONG,
)

_SPACE = WHITESPACE_RE2  # Python's \s (RE2's own is ASCII only)
_WORD = r"\pL\pN_"  # Python re's Unicode \w: alphanumerics and underscore (a class body)
_DIGIT = r"\p{Nd}"  # Python re's Unicode \d
_IMAGE_EXT = r"(jpe?g|png|gif|webp|heic|tiff?)"
# Camera and file names that crawls often carry instead of a caption.
FILENAME_LIKE = (
    rf"(?i)^[{_SPACE}]*(img|dsc|dscn|dcim|pxl|photo|image|screenshot|p)?[{_SPACE}_-]*{_DIGIT}{{2,}}"
    rf"[{_WORD}-]*(\.{_IMAGE_EXT})?[{_SPACE}]*$"
    rf"|^[{_SPACE}]*[{_WORD}-]+\.{_IMAGE_EXT}[{_SPACE}]*$"
)
_CHUNK_ROWS = 1 << 16  # rows per compute task: threads share the work, temporaries stay small


def filter_reasons(table: pa.Table, cfg: FilterConfig, threads: int | None = None) -> pa.Array:
    """The filter drop reason of every row (null = passes), whatever its current keep/drop_reason:
    the image rules first, then the caption rules.

    Reads `caption` and the image size (`original_width/height`, falling back to `width/height`;
    an unknown or zero size passes the image rules: the downloader already refused undecodable images).
    """
    image, caption = _codes(table, cfg, threads)
    return _reasons(np.where(image > 0, image, caption))


FILTER_PROPOSAL_SCHEMA = pa.schema(
    [pa.field("uid", pa.string()), pa.field("image_reason", pa.string()), pa.field("caption_reason", pa.string()),
     pa.field("collapsed_captions", pa.list_(pa.string()))]  # those of the row's collapsed captions that pass
)


def filter_proposals(table: pa.Table, cfg: FilterConfig, threads: int | None = None) -> pa.Table:
    """Row-level proposals (DESIGN §3) for the rows with a usable image (`keep`): why each fails the
    image rules and, separately, the caption rules (null = passes; other rows get nulls). The decision
    step applies them; keeping the two apart lets it tell a member's valid caption from its bad image
    when it gathers a duplicate group's captions."""
    image, caption = _codes(table, cfg, threads)
    usable = pc.fill_null(table["keep"], False).to_numpy(zero_copy_only=False)
    image[~usable], caption[~usable] = 0, 0
    extra = _valid_collapsed_captions(table, usable, cfg)
    return pa.table([table["uid"], _reasons(image), _reasons(caption), extra], schema=FILTER_PROPOSAL_SCHEMA)


def _valid_collapsed_captions(table: pa.Table, usable: np.ndarray, cfg: FilterConfig) -> pa.Array:
    """Per row, the captions of the input rows collapsed into it at ingest that pass the caption
    rules (null for rows without any, and for rows without a usable image)."""
    list_type = FILTER_PROPOSAL_SCHEMA.field("collapsed_captions").type
    if "collapsed_captions" not in table.column_names:
        return pa.nulls(table.num_rows, list_type)
    lists = table["collapsed_captions"].combine_chunks()
    flat = pc.list_flatten(lists)
    if not len(flat):
        return pa.nulls(table.num_rows, list_type)
    parent = pc.list_parent_indices(lists).to_numpy()
    ok = (_caption_codes(pa.chunked_array([flat]), cfg) == 0) & usable[parent]
    counts = np.bincount(parent[ok], minlength=table.num_rows)
    offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
    return pa.ListArray.from_arrays(offsets, flat.filter(pa.array(ok)), mask=pa.array(counts == 0)).cast(list_type)


def _codes(table: pa.Table, cfg: FilterConfig, threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(image rule codes, caption rule codes) per row: 0 = passes, else 1 + index into FILTER_REASONS."""
    n = table.num_rows
    width = _size(table, "original_width", "width")
    height = _size(table, "original_height", "height")
    captions = table["caption"]
    spans = [(a, min(n, a + _CHUNK_ROWS)) for a in range(0, n, _CHUNK_ROWS)]
    image, caption = np.zeros(n, np.int8), np.zeros(n, np.int8)

    def run(span: tuple[int, int]) -> None:
        a, b = span
        image[a:b] = _image_codes(width[a:b], height[a:b], cfg)
        caption[a:b] = _caption_codes(captions.slice(a, b - a), cfg)

    with ThreadPoolExecutor(max(1, threads or pa.cpu_count())) as pool:
        list(pool.map(run, spans))
    return image, caption


def _reasons(codes: np.ndarray) -> pa.Array:
    indices = pa.array(codes.astype(np.int32) - 1, mask=codes == 0)
    return pa.DictionaryArray.from_arrays(indices, pa.array(FILTER_REASONS)).cast(pa.string())


def _size(table: pa.Table, original: str, stored: str) -> np.ndarray:
    """Image side as float64 (NaN when unknown or 0), the original's size where known."""
    cols = [table[c] for c in (original, stored) if c in table.column_names]
    side = pc.coalesce(*cols) if len(cols) > 1 else cols[0]
    side = pc.if_else(pc.equal(side, 0), pa.scalar(None, side.type), side)
    return side.cast(pa.float64()).to_numpy()


def _image_codes(width: np.ndarray, height: np.ndarray, cfg: FilterConfig) -> np.ndarray:
    known = ~(np.isnan(width) | np.isnan(height))
    short, long = np.fmin(width, height), np.fmax(width, height)
    with np.errstate(invalid="ignore", divide="ignore"):
        too_small = known & (short < cfg.min_side)
        aspect = known & ~too_small & (long / short > cfg.max_aspect_ratio)
    codes = np.zeros(len(width), np.int8)
    codes[too_small] = 1 + FILTER_REASONS.index(DROP_TOO_SMALL)
    codes[aspect] = 1 + FILTER_REASONS.index(DROP_ASPECT)
    return codes


def _caption_codes(captions: pa.ChunkedArray, cfg: FilterConfig) -> np.ndarray:
    scripts = frozenset(s.upper() for s in cfg.caption_scripts)
    text = pc.utf8_trim_whitespace(pc.fill_null(captions.cast(pa.string()), "")).combine_chunks()
    stats = _char_stats(text, _char_classes(scripts))
    chars, letters, words = stats["chars"], stats["letters"], stats["words"]
    rules = [
        (DROP_CAPTION_EMPTY, chars == 0),
        (DROP_CAPTION_GARBAGE, pc.match_substring_regex(text, FILENAME_LIKE).to_numpy(zero_copy_only=False)
         | _few_letters(text, chars, letters, cfg.caption_min_letter_ratio)),
    ]
    if scripts:
        foreign = letters - stats["allowed"]
        rules.append((DROP_CAPTION_SCRIPT, foreign > cfg.caption_max_foreign_letter_ratio * letters))
    rules.append((DROP_CAPTION_SHORT, (words < cfg.caption_min_words) | (chars < cfg.caption_min_chars)))
    rules.append((DROP_CAPTION_LONG, (words > cfg.caption_max_words) | (chars > cfg.caption_max_chars)))
    codes = np.zeros(len(text), np.int8)
    for reason, hit in reversed(rules):  # the earliest rule is written last: it wins
        codes[hit] = 1 + FILTER_REASONS.index(reason)
    return codes


def _few_letters(text: pa.Array, chars: np.ndarray, letters: np.ndarray, ratio: float) -> np.ndarray:
    """letters < ratio × (characters other than ASCII blanks). Blanks only lower the bound, so they
    are counted only in the rows that fail it without them."""
    out = letters < ratio * chars
    maybe = np.flatnonzero(out)
    if len(maybe):
        blanks = _np(pc.count_substring(text.take(pa.array(maybe)), " ")).astype(np.int64)
        out[maybe] = letters[maybe] < ratio * (chars[maybe] - blanks)
    return out


# Per-code-point class bits, from Python's own Unicode database (so the rules are str's rules).
_LETTER, _SPACE_BIT, _ALLOWED = 1, 2, 4


def _char_stats(text: pa.Array, classes: np.ndarray) -> dict[str, np.ndarray]:
    """Per string: characters, letters, letters of an allowed script, words.

    ASCII strings (nearly all captions) are counted byte by byte; the others character by character
    (`_unicode_stats`), and the two merged back in row order.
    """
    offsets, data = string_buffers(text)
    wide_bytes = np.flatnonzero(data[offsets[0] : offsets[-1]] >= 0x80)
    if not len(wide_bytes):
        return _ascii_stats(text, classes)
    ascii_rows = np.ones(len(text), bool)
    ascii_rows[np.searchsorted(offsets, wide_bytes + offsets[0], side="right") - 1] = False
    at_ascii, at_wide = np.flatnonzero(ascii_rows), np.flatnonzero(~ascii_rows)
    narrow = _ascii_stats(text.take(pa.array(at_ascii)), classes)
    wide = _unicode_stats(text.take(pa.array(at_wide)), classes)
    out = {}
    for name in narrow:
        out[name] = np.empty(len(text), np.int64)
        out[name][at_ascii], out[name][at_wide] = narrow[name], wide[name]
    return out


def _ascii_stats(text: pa.Array, classes: np.ndarray) -> dict[str, np.ndarray]:
    """`_char_stats` of ASCII strings: one byte is one character, classed by arithmetic (ASCII
    letters are A-Z and a-z; ASCII spaces \\t-\\r, \\x1c-\\x1f and ' ', as in `str`)."""
    offsets, data = string_buffers(text)
    data = data[offsets[0] : offsets[-1]]
    starts = offsets[:-1] - offsets[0]
    chars = np.diff(offsets)
    scratch = np.bitwise_or(data, 0x20)
    letter = np.subtract(scratch, ord("a"), out=scratch) < 26  # uint8 wraps: one compare per range
    space = np.subtract(data, 9, out=scratch) < 5
    space |= np.subtract(data, 0x1C, out=scratch) < 4
    space |= data == ord(" ")
    word_start = ~space
    word_start[1:] &= space[:-1]
    nonempty = np.flatnonzero(chars > 0)
    word_start[starts[nonempty]] = ~space[starts[nonempty]]  # a string's first character starts a word
    if len(chars) and chars.max() < 1 << 16:  # both counts in one pass: words in the high half
        packed = word_start.astype(np.uint32)
        packed <<= 16
        packed |= letter
        both = _per_string(packed, starts, nonempty, len(chars), np.uint32)
        letters, words = both & 0xFFFF, both >> 16
    else:
        letters, words = _per_string(letter, starts, nonempty, len(chars)), _per_string(word_start, starts, nonempty, len(chars))
    return {
        "chars": chars,
        "letters": letters,
        "allowed": letters if classes[ord("a")] & _ALLOWED else np.zeros(len(chars), np.int64),
        "words": words,
    }


def _per_string(flags: np.ndarray, starts: np.ndarray, nonempty: np.ndarray, n: int, dtype=np.int32) -> np.ndarray:
    """Sum of flags over each string's characters (reduceat is one pass; empty strings are 0)."""
    out = np.zeros(n, np.int64)
    if len(nonempty):
        values = flags.view(np.uint8) if flags.dtype == bool else flags
        out[nonempty] = np.add.reduceat(values, starts[nonempty], dtype=dtype)
    return out


def _unicode_stats(text: pa.Array, classes: np.ndarray) -> dict[str, np.ndarray]:
    """`_char_stats` of any strings. Works on the UTF-8 buffer: one entry per character (its lead
    byte), ASCII classified by table, the multi-byte characters decoded to code points first. ASCII
    letters are all Latin, so only multi-byte letters need counting apart for the script rule.
    """
    offsets, data = string_buffers(text)
    data = np.append(data[offsets[0] : offsets[-1]], np.zeros(3, np.uint8))  # room to decode the last char
    chars = _np(pc.utf8_length(text)).astype(np.int64)
    char_start = np.concatenate(([0], np.cumsum(chars)[:-1]))
    nonempty = np.flatnonzero(chars > 0)
    lead_at = np.flatnonzero((data[:-3] & 0xC0) != 0x80)
    first = data[lead_at]
    cls = classes[first]  # right for ASCII; multi-byte characters are looked up below
    wide = np.flatnonzero(first >= 0x80)
    wide_cls = classes[_decode(data, lead_at[wide], first[wide])] if len(wide) else np.zeros(0, np.uint8)
    cls[wide] = wide_cls
    space = (cls & _SPACE_BIT) != 0
    word_start = np.concatenate(([True], space[:-1]))[: len(space)]
    word_start[char_start[nonempty]] = True  # a string's first character starts a word
    word_start &= ~space
    letters = _per_string(cls & _LETTER, char_start, nonempty, len(chars))
    row_of_wide = np.searchsorted(char_start, wide, side="right") - 1
    wide_letters = np.bincount(row_of_wide, weights=wide_cls & _LETTER, minlength=len(chars)).astype(np.int64)
    wide_allowed = np.bincount(row_of_wide, weights=(wide_cls & _ALLOWED) != 0, minlength=len(chars)).astype(np.int64)
    ascii_allowed = bool(classes[ord("a")] & _ALLOWED)
    return {
        "chars": chars,
        "letters": letters,
        "allowed": wide_allowed + (letters - wide_letters if ascii_allowed else 0),
        "words": _per_string(word_start, char_start, nonempty, len(chars)),
    }


def _np(values: pa.Array) -> np.ndarray:
    return pc.fill_null(values, 0).to_numpy()


def _decode(data: np.ndarray, at: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Code points of the multi-byte UTF-8 characters starting at byte positions `at`."""
    tail = [data[at + k].astype(np.int64) & 0x3F for k in (1, 2, 3)]
    lead = first.astype(np.int64)
    two = ((lead & 0x1F) << 6) | tail[0]
    three = ((lead & 0x0F) << 12) | (tail[0] << 6) | tail[1]
    four = ((lead & 0x07) << 18) | (tail[0] << 12) | (tail[1] << 6) | tail[2]
    return np.where(lead < 0xE0, two, np.where(lead < 0xF0, three, four))


@lru_cache(maxsize=1)
def _base_classes() -> np.ndarray:
    chars = [chr(c) for c in range(sys.maxunicode + 1)]
    return np.array([_LETTER * c.isalpha() + _SPACE_BIT * c.isspace() for c in chars], np.uint8)


@lru_cache(maxsize=8)
def _char_classes(scripts: frozenset[str]) -> np.ndarray:
    """Class bits of every code point; _ALLOWED marks letters whose Unicode name starts with one of
    `scripts` (LATIN, CJK, ...), the per-letter rule precomputed."""
    classes = _base_classes().copy()
    if scripts:
        for cp in np.flatnonzero(classes & _LETTER):
            if unicodedata.name(chr(cp), "").split(" ")[0] in scripts:
                classes[cp] |= _ALLOWED
    return classes
