import re
import sys
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from plantmix.core.recipe import FilterConfig
from plantmix.core.text import WHITESPACE
from plantmix.curate import filters
from plantmix.curate.filters import filter_proposals, filter_reasons

CFG = FilterConfig(min_side=64, max_aspect_ratio=4, caption_min_words=2, caption_max_words=10, caption_scripts=["LATIN"])


# ---- the per-row reference: the filters as first written, one Python call per row ----------------

_FILENAME_LIKE = re.compile(
    r"^\s*(img|dsc|dscn|dcim|pxl|photo|image|screenshot|p)?[\s_-]*\d{2,}[\w-]*(\.(jpe?g|png|gif|webp|heic|tiff?))?\s*$"
    r"|^\s*[\w-]+\.(jpe?g|png|gif|webp|heic|tiff?)\s*$",
    re.IGNORECASE,
)


def _script_of(ch):
    try:
        return unicodedata.name(ch).split(" ")[0]
    except ValueError:
        return None


def caption_reason(caption, cfg):
    text = (caption or "").strip()
    if not text:
        return "caption_empty"
    letters = [c for c in text if c.isalpha()]
    if _FILENAME_LIKE.match(text) or len(letters) < cfg.caption_min_letter_ratio * len(text.replace(" ", "")):
        return "caption_garbage"
    if cfg.caption_scripts:
        allowed = {s.upper() for s in cfg.caption_scripts}
        foreign = sum(1 for c in letters if _script_of(c) not in allowed)
        if foreign > cfg.caption_max_foreign_letter_ratio * len(letters):
            return "caption_script"
    words = len(text.split())
    if words < cfg.caption_min_words or len(text) < cfg.caption_min_chars:
        return "caption_too_short"
    if words > cfg.caption_max_words or len(text) > cfg.caption_max_chars:
        return "caption_too_long"
    return None


def image_reason(width, height, cfg):
    if not width or not height:
        return None
    if min(width, height) < cfg.min_side:
        return "image_too_small"
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return "aspect_ratio"
    return None


def reference_reasons(table: pa.Table, cfg: FilterConfig) -> list:
    widths = pc.coalesce(table["original_width"], table["width"]).to_pylist()
    heights = pc.coalesce(table["original_height"], table["height"]).to_pylist()
    captions = table["caption"].to_pylist()
    return [image_reason(w, h, cfg) or caption_reason(c, cfg) for w, h, c in zip(widths, heights, captions)]


def one(caption, cfg=CFG, w=None, h=None):
    t = pa.table({"caption": pa.array([caption], pa.string()), "width": pa.array([w], pa.int64()),
                  "height": pa.array([h], pa.int64())})
    return filter_reasons(t, cfg)[0].as_py()


# ---- behaviour ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("a photo of Quercus robur.", None),
        ("una foto de un roble común", None),  # other Latin-script languages pass
        ("", "caption_empty"),
        ("   ", "caption_empty"),
        ("\u3000\x1c\n", "caption_empty"),  # every str.isspace() character counts as space
        (None, "caption_empty"),
        ("IMG_2034.JPG", "caption_garbage"),
        ("DSC00012", "caption_garbage"),
        ("####!!!!", "caption_garbage"),
        ("photo.png", "caption_garbage"),
        ("IMG_\u0663\u0664\u0665", "caption_garbage"),  # Arabic-Indic digits are \d in Python's re
        ("橡树的叶子和果实的照片", "caption_script"),
        ("фотография листа дуба", "caption_script"),
        ("oak", "caption_too_short"),
        ("one two three four five six seven eight nine ten eleven", "caption_too_long"),
    ],
)
def test_caption_reasons(caption, reason):
    assert one(caption) == reason == caption_reason(caption, CFG)


def test_any_script_when_unconfigured():
    assert one("фотография листа дуба", FilterConfig()) is None


def test_foreign_letter_tolerance_is_a_setting():
    mixed = "a photo of a large oak дуб"  # 3 of 19 letters Cyrillic
    assert one(mixed) is None
    assert one(mixed, CFG.model_copy(update={"caption_max_foreign_letter_ratio": 0.1})) == "caption_script"


def test_space_class_is_pythons():
    assert WHITESPACE == "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]
    spaces = "".join(c for c in chars if c.isspace())
    others = "".join(c for c in chars if not c.isspace())
    stripped = pc.replace_substring_regex(pa.array([spaces, others]), f"[{filters._SPACE}]", "").to_pylist()
    assert stripped == ["", others]
    # Arrow's whitespace trim (used for str.strip) strips exactly these characters, at either end
    padded = pa.array([f"{c}x{c}" for c in chars])
    trimmed = pc.utf8_trim_whitespace(padded).to_pylist()
    assert {c for c, t in zip(chars, trimmed) if t == "x"} == set(spaces)


@pytest.mark.parametrize("w, h, reason", [(200, 100, None), (50, 200, "image_too_small"), (640, 90, "aspect_ratio"), (None, None, None), (0, 30, None)])
def test_image_reasons(w, h, reason):
    assert one("a fine oak leaf", w=w, h=h) == reason


def test_proposals_keep_image_and_caption_reasons_apart():
    t = pa.table(
        {
            "uid": ["a", "b", "c", "d", "e"],
            "keep": [True, True, False, True, True],
            "original_width": [200, 30, None, None, 20],
            "original_height": [200, 30, None, None, 20],
            "width": [200, 30, None, 640, 20],
            "height": [200, 30, None, 90, 20],
            "caption": ["a fine oak leaf", "a fine oak leaf", "", "wide image here", ""],
        }
    )
    out = filter_proposals(t, CFG)
    assert out["uid"].to_pylist() == t["uid"].to_pylist()
    # a row without a usable image (c) gets no proposal; e fails both kinds of rule, and both are kept
    assert out["image_reason"].to_pylist() == [None, "image_too_small", None, "aspect_ratio", "image_too_small"]
    assert out["caption_reason"].to_pylist() == [None, None, None, None, "caption_empty"]
    assert filter_reasons(t, CFG).to_pylist() == ["image_too_small" if i == 4 else r for i, r in
                                                  enumerate([None, "image_too_small", "caption_empty", "aspect_ratio", None])]


# ---- equivalence with the per-row reference -----------------------------------------------------

# Fragments chosen to sit on every rule's edge: Unicode spaces and digits, file names, letters whose
# Unicode name is not their script's (ª, µ, fullwidth), combining marks, CJK, Cyrillic, Greek.
_FRAGMENTS = [
    "a", "photo", "of", "Quercus", "robur", "leaf", " ", "  ", "\t", "\u3000", "\xa0", "\x1c", "\x1f", "\x0b", "\n", ".", ",",
    "IMG_", "DSC", "dscn", "Pxl_", "p", "12", "0042", "\u0663\u0664", "\uff11\uff12", ".jpg", ".JPEG", ".png",
    ".tiff", ".heic", "-", "_", "#", "!!", "?", "дуб", "лист", "橡树", "照片", "φύλλο", "ª", "µ", "ß", "é",
    "e\u0301", "\uff21\uff22", "Ⅻ", "ǅ", "ʰ", "𝔄", "ok", "x" * 30,
]


def fuzz_captions(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    frags = np.array(_FRAGMENTS, dtype=object)
    lengths = rng.integers(0, 9, n)
    picks = rng.integers(0, len(frags), lengths.sum())
    out, at = [], 0
    for k in lengths:
        out.append("".join(frags[picks[at : at + k]]))
        at += k
    out = [None if i % 97 == 0 else c for i, c in enumerate(out)]
    return out


def fuzz_table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    side = lambda: pa.array(rng.integers(0, 700, n), mask=rng.random(n) < 0.1)  # noqa: E731
    return pa.table({"caption": pa.array(fuzz_captions(n, seed), pa.string()), "width": side(), "height": side(),
                     "original_width": side(), "original_height": side()})


@pytest.mark.parametrize("cfg", [CFG, FilterConfig(), FilterConfig(caption_scripts=["LATIN", "CJK"], caption_min_chars=0)])
def test_same_decisions_as_reference_on_fuzzed_rows(cfg):
    t = fuzz_table(30_000, seed=1)
    new = filter_reasons(t, cfg, threads=2).to_pylist()
    old = reference_reasons(t, cfg)
    diff = [(t["caption"][i].as_py(), old[i], new[i]) for i in range(t.num_rows) if old[i] != new[i]]
    assert not diff, diff[:5]
    assert len(set(old)) >= 6  # the fuzz reaches most rules


def test_same_decisions_on_a_million_row_manifest():
    t = fuzz_table(1_000_000, seed=2)
    new = filter_reasons(t, CFG)
    sample = np.random.default_rng(3).choice(t.num_rows, 40_000, replace=False)
    ts = t.take(pa.array(sample))
    assert new.take(pa.array(sample)).to_pylist() == reference_reasons(ts, CFG)


def test_same_decisions_on_the_demo_build(demo_joined):
    cfg = FilterConfig.model_validate({"min_side": 64, "max_aspect_ratio": 4.0, "caption_min_words": 2,
                                       "caption_max_words": 80, "caption_scripts": ["LATIN"]})
    assert filter_reasons(demo_joined, cfg).to_pylist() == reference_reasons(demo_joined, cfg)


@pytest.fixture
def demo_joined(tmp_path):
    """Rows shaped like the demo build's joined manifest: the demo world's own URL lists and captions."""
    from plantmix.core.recipe import DemoWorldConfig
    from plantmix.demo.world import generate_world

    world = generate_world(tmp_path / "world", DemoWorldConfig(species=6, images_per_species=6, general_images=40))
    rows = pa.concat_tables([pq.read_table(world / f, columns=["caption"]) for f in ("plant_urls.parquet", "general_urls.parquet")])
    n = rows.num_rows
    rng = np.random.default_rng(0)
    side = lambda: pa.array(rng.integers(20, 400, n))  # noqa: E731
    return rows.append_column("width", side()).append_column("height", side()).append_column(
        "original_width", pa.nulls(n, pa.int64())).append_column("original_height", pa.nulls(n, pa.int64()))
