"""The embedded demo world (DESIGN §7): species, images, URL lists with planted faults, ground truth.

`generate_world(out_dir, config)` writes:

    world.json              config + version (the idempotency key), species, per-fault counts
    routes.json             URL path -> behaviour (status, content_type, headers, body_file | body, delay)
    files/<list>/<key>.ext  every payload the server serves
    plant_urls.parquet      key, url, caption, taxon_kingdom .. taxon_species, common_name, license, attribution
    general_urls.parquet    key, url, caption, license, attribution
    ground_truth.parquet    one row per URL-list row: list, row, key, url, fault, dup_of_url, species (what
                            the image shows; null for a scene), dup_phash_distance (copies: to the original
                            or evaluation image), eval_image (copies of an evaluation image: its file),
                            caption_mismatch (MISMATCH_*: how the caption fails the image)
    eval/<genus_species>/NNNN.png, eval/classnames.json   held-out images of the same species
    validation/{plant,general}/00000.tar, classify/         per-domain validation (plantmix.demo.validation)
    pretrain/00000.tar      pairs of the same world for bootstrapping the scorer model (plantmix.demo.validation)
    support/{plant,general}/ the pretraining pairs' images per domain (relevance's support images)

URLs use the port-free base DEMO_BASE_URL, so uids stay stable across runs; the pipeline rewrites the
prefix to the live server's address (see plantmix.demo.server.live_url) at download time.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from plantmix.demo.draw import (
    LEAF_SHAPES, MARGINS, TEXTURES, VENATIONS, PlantTraits, draw_plant, draw_scene, hex_rgb,
)
from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import DemoWorldConfig
from plantmix.core.schema import TAXON_COLUMNS, TAXON_RANKS, species_folder
from plantmix.core.stage import atomic_path, write_parquet

DEMO_BASE_URL = "http://plantmix-demo.invalid"
WORLD_VERSION = 4  # 2: curation cases (mirrored copies, a bad-caption group, a label conflict); 3: model-curation cases; 4: support folders
SPECIES_TABLE = "demo_species.csv"
LISTS = ("plant", "general")

# Faults that change the row's own image, URL or caption.
IN_PLACE_FAULTS = (
    "http_404", "http_500", "timeout", "truncated", "corrupt", "html", "tiny", "huge", "extreme_aspect",
    "mismatched_caption", "empty_caption", "non_english_caption", "garbage_caption", "noai", "bad_scheme",
)
# Faults that add a row copying a clean row's image (or the whole row, for repeated_row).
EXTRA_ROW_FAULTS = ("exact_dup", "near_dup_reencode", "near_dup_resize", "near_dup_crop", "repeated_row")
DUP_FAULTS = ("exact_dup", "near_dup_reencode", "near_dup_resize", "near_dup_crop")
CAPTION_FAULTS = ("mismatched_caption", "empty_caption", "non_english_caption", "garbage_caption")
# Curation cases (DESIGN §7), planted after the crawl faults on items no fault used:
#   near_dup_mirror          a mirrored copy of a clean row
#   group_empty_caption      the best image of a duplicate group, with an empty caption (in place) ...
#   group_garbage_caption    ... its exact copy with a garbage caption ...
#   group_good_copy          ... and a smaller copy with a good caption: the one the decision must keep
#   conflict_other_species   a copy listed under another species (plant list): a label conflict
CURATION_FAULTS = ("near_dup_mirror", "group_empty_caption", "group_garbage_caption", "group_good_copy",
                   "conflict_other_species")
# Model-based curation cases (DESIGN §7), planted last from their own seed streams, so every row above
# keeps its image, caption and payload (only keys shift):
#   plant_in_general_list    a new plant drawing in the general list, with a general crawl's vague caption
#   non_plant_in_plant_list  a new scene in the plant list, with a species caption and taxonomy
#   cross_domain_caption     (in place) a clean row captioned with another row's caption of the other domain
#   species_swap_caption     (in place, plant list) a clean row listed with another species' caption and taxonomy
#   eval_copy_*              an exact or near copy of a held-out evaluation image, captioned as its species
#   semantic_dup             the same individual plant photographed again (draw_plant's restyle): new
#                            background, colours, pose; far in pHash from its original (dup_of_url)
EVAL_COPY_FAULTS = ("eval_copy_exact", "eval_copy_reencode", "eval_copy_resize", "eval_copy_crop", "eval_copy_mirror")
MODEL_CURATION_FAULTS = ("plant_in_general_list", "non_plant_in_plant_list", "cross_domain_caption",
                         "species_swap_caption", *EVAL_COPY_FAULTS, "semantic_dup")
FAULTS = ("ok", *IN_PLACE_FAULTS, *EXTRA_ROW_FAULTS, *CURATION_FAULTS, *MODEL_CURATION_FAULTS)
# Faults planted in one list only.
LIST_ONLY_FAULTS = {
    "plant": ("conflict_other_species", "non_plant_in_plant_list", "species_swap_caption", *EVAL_COPY_FAULTS,
              "semantic_dup"),
    "general": ("plant_in_general_list",),
}
# copies and new photos posted with a fresh caption (a vague one when a plant lands in the general list)
FRESH_CAPTION_FAULTS = (*DUP_FAULTS, "near_dup_mirror", "group_good_copy", "plant_in_general_list", *EVAL_COPY_FAULTS,
                        "semantic_dup")
# ground_truth.caption_mismatch: how a row's caption fails its image (null: it does not)
MISMATCH_CROSS_DOMAIN = "cross_domain"  # names the other domain (a scene for a plant, a species for a scene)
MISMATCH_SPECIES = "between_species"  # names another species
MISMATCH_SCENES = "between_scenes"  # describes another general scene
_FAULT_CAP = {"timeout": 3, "huge": 2}  # per list: each costs a download thread or ~100 MB of decode

# img2dataset settings under which EXPECTED_DOWNLOAD_OUTCOME was measured (img2dataset 1.47, OpenCV 4.11,
# one process, 8 threads). The server's timeout delay (DemoWorldConfig.timeout_delay_s) must exceed `timeout`.
REFERENCE_DOWNLOAD_SETTINGS = dict(
    timeout=2, retries=0, min_image_size=48, max_image_area=64e6,
    disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
)
# fault -> (img2dataset status, regex the error_message must fully match; None = no error message).
# Measured, not assumed: a JPEG cut anywhere after its headers (mid-scan, or only the final EOI marker
# missing) is also rejected by OpenCV 4.11 with "Image decoding error" (older OpenCV builds returned
# the partial image); the planted `truncated` payloads are cut PNGs and JPEGs cut inside their headers,
# which every decoder rejects. bad_scheme rows are meant to be dropped before download; when they do
# reach img2dataset, urllib fails on the ftp:// or file:// URL.
EXPECTED_DOWNLOAD_OUTCOME: dict[str, tuple[str, str | None]] = {
    "ok": ("success", None),
    "http_404": ("failed_to_download", r"HTTP Error 404: Not Found"),
    "http_500": ("failed_to_download", r"HTTP Error 500: Internal Server Error"),
    "timeout": ("failed_to_download", r"timed out"),
    "truncated": ("failed_to_resize", r"Image decoding error"),
    "corrupt": ("failed_to_resize", r"Image decoding error"),
    "html": ("failed_to_resize", r"Image decoding error"),
    "tiny": ("failed_to_resize", r"image too small"),
    "huge": ("failed_to_resize", r"image area too large"),
    "extreme_aspect": ("success", None),
    "exact_dup": ("success", None),
    "near_dup_reencode": ("success", None),
    "near_dup_resize": ("success", None),
    "near_dup_crop": ("success", None),
    "mismatched_caption": ("success", None),
    "empty_caption": ("success", None),
    "non_english_caption": ("success", None),
    "garbage_caption": ("success", None),
    "noai": ("failed_to_download", r"Use of image disallowed by X-Robots-Tag directive"),
    "bad_scheme": ("failed_to_download", r"<urlopen error .*>"),
    "repeated_row": ("success", None),
    **{f: ("success", None) for f in (*CURATION_FAULTS, *MODEL_CURATION_FAULTS)},
}

_TRAIT_COLUMNS = ("leaf_shape", "margin", "venation", "leaf_color", "flower_petals", "flower_color", "vein_pairs",
                  "texture")
_TABLE_COLUMNS = (*TAXON_RANKS, "common_name", *_TRAIT_COLUMNS)
_LICENSES = ("CC-BY-4.0", "CC-BY-SA-4.0", "CC0-1.0", "CC-BY-NC-4.0")
_NON_ENGLISH = {  # non-Latin scripts only, so no Latin-letter heuristic mistakes them for English
    "plant": ("植物叶子的照片", "花园里的绿色植物", "Листья растения крупным планом", "Растение в саду",
              "صورة لأوراق نبات", "نبات أخضر في الحديقة", "庭の植物の写真", "葉のクローズアップ",
              "식물 잎 사진", "पौधे की पत्तियाँ", "φύλλα φυτού στον κήπο"),
    "general": ("红色的汽车和房子", "天空中的气球", "Дом у моря", "Машина на улице ночью",
                "بيت أحمر تحت الشمس", "青い空と太陽", "海の上のヨット", "하늘의 풍선", "समुद्र पर नाव",
                "σπίτι στον δρόμο"),
}
_GARBAGE = ("IMG_{n4}.JPG", "DSC{n5}", "####!!!!", "_MG_{n4}.CR2", "{n8}_{n6}.jpg", "P{n7}", "???? ????", "-----",
            "0x{n6}")
_LIE_VIEW = {"layout": "sprig", "flowering": False, "background": "soil"}  # what a borrowed caption describes
_CROSS_LIST_CAPTIONS = ("green leaves close-up", "a plant in my garden", "nature photo", "leaf macro shot",
                        "spring in the park", "botanical study")
_BACKGROUND_WORDS = {"soil": "dark soil", "sky": "a sky background", "paper": "a white background", "stone": "stone",
                     "dark": "a dark background", "sand": "sand", "bokeh": "a blurred garden background"}
_SHAPE_WORDS = {"pinnate_compound": "compound", "trifoliate": "three-part", "needle": "needle-like",
                "flabellate": "fan-shaped", "cordate": "heart-shaped", "orbicular": "round"}
_MARGIN_WORDS = {"entire": "smooth-edged", "runcinate": "deeply toothed", "pinnatifid": "deeply split",
                 "bilobed": "two-lobed", "notched": "notched", "spiny": "spiny-edged"}


# ---------------------------------------------------------------- the species table


@dataclass(frozen=True)
class Species:
    index: int  # row in the species table: seeds the species' images, so they do not depend on the selection
    taxonomy: dict[str, str]  # rank -> name, for TAXON_RANKS
    common_name: str
    traits: PlantTraits

    @property
    def scientific(self) -> str:
        return self.taxonomy["species"]

    @property
    def folder(self) -> str:
        """ImageFolder class directory, e.g. quercus_robur."""
        return species_folder(self.scientific)


def species_table_path() -> Path:
    """The packaged copy of manifests/demo_species.csv (identical; a test keeps them so)."""
    return Path(str(resources.files("plantmix") / "data" / SPECIES_TABLE))


def load_species_table(path: Path | None = None) -> list[Species]:
    """Read and validate the species table; a bad cell raises PlantmixError naming file, row and column."""
    path = Path(path) if path is not None else species_table_path()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _TABLE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PlantmixError(f"{path}: missing column(s) {missing}")
        rows = list(reader)
    vocab = {"leaf_shape": LEAF_SHAPES, "margin": MARGINS, "venation": VENATIONS, "texture": TEXTURES}
    table = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 2}"
        for col, allowed in vocab.items():
            if row[col] not in allowed:
                raise PlantmixError(f"{where}: column '{col}': unknown value {row[col]!r}")
        try:
            petals = int(row["flower_petals"])
            traits = PlantTraits(
                leaf_shape=row["leaf_shape"], margin=row["margin"], venation=row["venation"],
                leaf_color=hex_rgb(row["leaf_color"]), flower_petals=petals,
                flower_color=hex_rgb(row["flower_color"]) if petals else None,
                vein_pairs=int(row["vein_pairs"]), texture=row["texture"],
            )
        except ValueError as e:
            raise PlantmixError(f"{where}: {e}") from None
        if row["species"].split(" ")[0] != row["genus"]:
            raise PlantmixError(f"{where}: species {row['species']!r} is not in genus {row['genus']!r}")
        table.append(Species(i, {r: row[r].strip() for r in TAXON_RANKS}, row["common_name"].strip(), traits))
    names = [s.scientific for s in table]
    if len(set(names)) != len(names):
        raise PlantmixError(f"{path}: repeated species {sorted({n for n in names if names.count(n) > 1})}")
    return table


def texture_groups(table: list[Species]) -> list[list[Species]]:
    """Species that share every trait except vein density and texture: told apart only by fine texture."""
    groups: dict[tuple, list[Species]] = {}
    for s in table:
        t = s.traits
        looks = (t.leaf_shape, t.margin, t.venation, t.leaf_color, t.flower_petals, t.flower_color)
        groups.setdefault(looks, []).append(s)
    return [g for g in groups.values() if len(g) > 1]


def select_species(table: list[Species], n: int, seed: int) -> list[Species]:
    """Pick n species deterministically; about a quarter come from whole texture groups (fine-grained)."""
    if n > len(table):
        raise PlantmixError(f"demo_world.species = {n} exceeds the {len(table)} species in {SPECIES_TABLE}")
    rng = np.random.default_rng([seed, 0])
    groups = texture_groups(table)
    grouped = {s.index for g in groups for s in g}
    singles = [s for s in table if s.index not in grouped]
    chosen: list[Species] = []
    for gi in rng.permutation(len(groups)):
        if len(chosen) >= max(2, n // 4):
            break
        chosen += groups[gi][: n - len(chosen)]
    rest = [singles[i] for i in rng.permutation(len(singles))]
    rest += [s for gi in rng.permutation(len(groups)) for s in groups[gi] if s not in chosen]
    chosen += rest[: n - len(chosen)]
    return sorted(chosen, key=lambda s: s.index)


# ---------------------------------------------------------------- captions


def plant_caption(sp: Species, view: dict, rng: np.random.Generator) -> str:
    """A descriptive caption in one of several styles, true to what the image shows."""
    sci, com, t = sp.scientific, sp.common_name, sp.traits
    shape = _SHAPE_WORDS.get(t.leaf_shape, t.leaf_shape)
    margin = _MARGIN_WORDS.get(t.margin, t.margin)
    options = [
        f"{com} ({sci})", f"a photo of {com}, a type of plant", f"{sci}", f"{sci} leaves",
        f"{com} leaves on {_BACKGROUND_WORDS[view['background']]}", f"{sci}, family {sp.taxonomy['family']}",
        f"{margin} {shape} leaves of {com}",
        {"closeup": f"close-up of a {com} leaf", "sprig": f"a sprig of {sci}",
         "rosette": f"{com} seen from above", "clump": f"a clump of {com} ({sci})"}[view["layout"]],
    ]
    if view["flowering"]:
        options += [f"{com} in flower", f"flowering {sci} ({com})"]
    return str(rng.choice(options))


def _garbage_caption(rng: np.random.Generator) -> str:
    digits = lambda k: "".join(str(d) for d in rng.integers(0, 10, k))  # noqa: E731
    return str(rng.choice(_GARBAGE)).format(n4=digits(4), n5=digits(5), n6=digits(6), n7=digits(7), n8=digits(8))


# ---------------------------------------------------------------- payloads


def _encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, "PNG", compress_level=1)
    else:
        image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _flat_png(width: int, height: int, band: tuple[int, int]) -> bytes:
    """A 1-bit PNG of huge dimensions but a few KB: white with one black band (written directly; PIL
    would spend half a second building the 100-megapixel raster first)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row_bytes = (width + 7) // 8
    white, black = b"\x00" + b"\xff" * row_bytes, b"\x00" + b"\x00" * row_bytes
    raw = white * band[0] + black * (band[1] - band[0]) + white * (height - band[1])
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")


def _truncated(image: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """Bytes that stop early in a way any decoder rejects: a cut PNG, or a JPEG cut inside its headers."""
    if rng.random() < 0.5:
        data = _encode(image, "png")
        return data[: int(len(data) * rng.uniform(0.3, 0.8))], "png"
    data = _encode(image, "jpeg")
    start_of_scan = data.find(b"\xff\xda")
    return data[: int(start_of_scan * rng.uniform(0.2, 0.9))], "jpg"


def _corrupt(rng: np.random.Generator) -> bytes:
    noise = rng.bytes(int(rng.integers(2000, 20000)))
    return (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + noise) if rng.random() < 0.5 else noise


def _html_page(title: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><title>{title}</title></head>\n<body><h1>{title}</h1>"
            "<p>This page has moved. Please enable JavaScript.</p></body></html>\n")


def _phash(data: bytes) -> imagehash.ImageHash:
    return imagehash.phash(Image.open(io.BytesIO(data)))


class _DiversityGuard:
    """Keeps distinct images apart in 64-bit pHash, so near-duplicate detection has something to find.

    A drawing within `min_distance` bits of an earlier one is redrawn with the next sub-seed (a few
    tries at most). The margin over the tested bound (8) absorbs the few bits JPEG encoding may flip.
    """

    def __init__(self, min_distance: int = 12, tries: int = 8):
        self.min_distance, self.tries = min_distance, tries
        self.bits = np.zeros((0, 64), bool)
        self.attempt = 0  # the attempt whose drawing the last draw() kept

    def draw(self, make, mirrored: bool = False, tries: int | None = None):
        """Call make(attempt) -> (image, extra) until the image is far from all kept ones; keep it.
        `mirrored`: its mirror image must be far from them too (near-duplicate detection checks mirrors);
        `tries` overrides the instance's number of attempts.
        With tries = 0 it keeps nothing apart: make(0), unchecked."""
        if not self.tries:
            return make(0)
        for attempt in range(tries or self.tries):
            self.attempt = attempt
            image, extra = make(attempt)
            bits = imagehash.phash(image).hash.reshape(1, 64)
            views = [bits, imagehash.phash(ImageOps.mirror(image)).hash.reshape(1, 64)] if mirrored else [bits]
            if not len(self.bits) or min((self.bits != v).sum(1).min() for v in views) > self.min_distance:
                break
        self.bits = np.concatenate([self.bits, bits])
        return image, extra


# ---------------------------------------------------------------- rows


@dataclass(eq=False)
class _Item:
    """One drawn image and its honest caption."""

    list: str
    image: Image.Image
    caption: str
    species: Species | None
    fmt: str  # "jpeg" or "png"
    quality: int
    view: dict = field(default_factory=dict)  # what a plant image shows (draw_plant's description)
    data: bytes = b""
    seed: list[int] | None = None  # the drawing's generator seed (plants): replaying it redraws the same plant
    eval_path: str | None = None  # held-out evaluation images: the file, relative to the world


@dataclass(eq=False)
class _Row:
    list: str
    item: _Item
    fault: str = "ok"
    origin: _Row | None = None  # the clean row a duplicate copies
    key: str = ""
    url: str = ""
    caption: str = ""
    taxa: Species | None = None  # taxonomy columns shown in the list (may lie for mismatched captions)
    license: str = ""
    attribution: str = ""
    route: dict | None = None  # None: not served (bad scheme) or served by its original (repeated row)
    payload: bytes | None = None  # bytes to store; None when there is none or it is the original's file
    file: str | None = None
    phash_distance: int | None = None  # duplicates: pHash distance to the original's served bytes
    mismatch: str | None = None  # MISMATCH_*: how the caption fails the image


def _plan_faults(n: int, rate: float, rng: np.random.Generator, cross_pool: list[int] | None = None):
    """Choose which items carry which fault. Returns ({item: in-place fault}, [(fault, item, from_plant)], pool).

    Every fault kind gets about rate/len(kinds) of the list (at least one while rate > 0), allocated
    round-robin so a small world still gets one of each. Each fault consumes a distinct item: an
    in-place fault spoils it; an extra-row fault keeps it clean as the original. At most half the
    items are spoiled in place. Half the exact duplicates of the general list copy plant images
    (taken from `cross_pool`, the plant list's unused items).
    """
    kinds = [*IN_PLACE_FAULTS, *EXTRA_ROW_FAULTS]
    if n == 0:
        return {}, [], []
    desired = {k: 0 if rate <= 0 else min(_FAULT_CAP.get(k, n), max(1, round(rate / len(kinds) * n))) for k in kinds}
    pool = [int(i) for i in rng.permutation(n)]
    in_place: dict[int, str] = {}
    extras: list[tuple[str, int, bool]] = []
    spoiled, progress = 0, True
    while progress:
        progress = False
        for k in kinds:
            have = sum(1 for f in in_place.values() if f == k) + sum(1 for f, _, _ in extras if f == k)
            if have >= desired[k]:
                continue
            cross = k == "exact_dup" and cross_pool and have % 2 == 0
            if cross:
                extras.append((k, cross_pool.pop(), True))
            elif not pool or (k in IN_PLACE_FAULTS and spoiled >= n // 2):
                continue
            elif k in IN_PLACE_FAULTS:
                in_place[pool.pop()] = k
                spoiled += 1
            else:
                extras.append((k, pool.pop(), False))
            progress = True
    return in_place, extras, pool


def _build_rows(items: dict[str, list[_Item]], config: DemoWorldConfig,
                rng: np.random.Generator) -> tuple[dict[str, list[_Row]], dict[str, list[_Row]], dict[str, list[int]]]:
    """The crawl faults and curation cases: (rows per list, the drawn items' own rows, unused item indices)."""
    plan_plant = _plan_faults(len(items["plant"]), config.fault_rate, rng)
    plan_general = _plan_faults(len(items["general"]), config.fault_rate, rng, cross_pool=plan_plant[2])
    rows: dict[str, list[_Row]] = {}
    base: dict[str, list[_Row]] = {}
    for name, (in_place, extras, _) in zip(LISTS, (plan_plant, plan_general)):
        base[name] = [_Row(name, it, in_place.get(i, "ok")) for i, it in enumerate(items[name])]
        lst = list(base[name])
        for fault, i, from_plant in extras:
            origin = base["plant"][i] if from_plant else base[name][i]
            # A copy comes after its original in the list (the original is what the crawl met first).
            lo = lst.index(origin) + 1 if origin.list == name else 0
            lst.insert(int(rng.integers(lo, len(lst) + 1)), _Row(name, origin.item, fault, origin=origin))
        rows[name] = lst
    spare = {"plant": plan_plant[2], "general": plan_general[2]}
    _plant_curation_cases(base, rows, spare, config, np.random.default_rng([config.seed, 5]))
    return rows, base, spare


def _assign_keys(rows: dict[str, list[_Row]]) -> None:
    """Keys in final list order; a repeated row reuses its original's key."""
    for name in LISTS:
        n = 0
        for r in rows[name]:
            if r.fault != "repeated_row":
                r.key = f"{name}-{n:06d}"
                n += 1


def _plant_curation_cases(base: dict[str, list[_Row]], rows: dict[str, list[_Row]], spare: dict[str, list[int]],
                          config: DemoWorldConfig, rng: np.random.Generator) -> None:
    """Add the curation cases (CURATION_FAULTS) on items no crawl fault used; copies follow originals."""
    kinds = len(IN_PLACE_FAULTS) + len(EXTRA_ROW_FAULTS)
    for name in LISTS:
        pool = spare[name]
        n = len(base[name])
        mirrors = 0 if config.fault_rate <= 0 else max(1, round(2 * config.fault_rate / kinds * n))
        plan = [("mirror", mirrors), ("group", 1 if config.fault_rate > 0 else 0),
                ("conflict", 1 if name == "plant" and config.fault_rate > 0 else 0)]
        for case, count in plan:
            for _ in range(min(count, len(pool))):
                origin = base[name][pool.pop()]
                copies = {"mirror": ["near_dup_mirror"], "group": ["group_garbage_caption", "group_good_copy"],
                          "conflict": ["conflict_other_species"]}[case]
                if case == "group":
                    origin.fault = "group_empty_caption"
                lst = rows[name]
                for fault in copies:
                    lo = lst.index(origin) + 1
                    lst.insert(int(rng.integers(lo, len(lst) + 1)), _Row(name, origin.item, fault, origin=origin))


def _model_case_count(config: DemoWorldConfig) -> int:
    """Planted cases per model-curation kind: one per species (enough for a recall figure), none in a
    fault-free world."""
    return config.species if config.fault_rate > 0 else 0


def _insert(lst: list[_Row], row: _Row, rng: np.random.Generator, after: _Row | None = None) -> None:
    lo = lst.index(after) + 1 if after is not None else 0  # a copy comes after its original
    lst.insert(int(rng.integers(lo, len(lst) + 1)), row)


def _plant_model_cases(base: dict[str, list[_Row]], rows: dict[str, list[_Row]], spare: dict[str, list[int]],
                       selected: list[Species], eval_items: list[_Item], config: DemoWorldConfig,
                       guard: _DiversityGuard) -> list[tuple[_Row, str]]:
    """Add the model-curation cases (MODEL_CURATION_FAULTS). New drawings go through the diversity guard;
    the in-place caption cases are returned as (row, fault), applied once every other row is filled (until
    then they are clean rows, so the crawl faults' random draws stay what they were)."""
    k = _model_case_count(config)
    rng = np.random.default_rng([config.seed, _MODEL_CASE_STREAM])
    size = config.image_size
    for i in range(k):  # plants crawled as general images, and general images crawled as plants
        sp = selected[i % len(selected)]
        rng_of = _seeded(config.seed, _MODEL_PLANT_STREAM, sp.index, i)
        image, (view, r) = guard.draw(lambda a: _with_rng(draw_plant(sp.traits, x := rng_of(a), size), x), mirrored=True)
        item = _Item("plant", image, "", sp, "jpeg", int(r.integers(80, 96)), view)
        _insert(rows["general"], _Row("general", item, "plant_in_general_list"), rng)
        rng_of = _seeded(config.seed, _MODEL_SCENE_STREAM, i)
        image, (caption, r) = guard.draw(lambda a: _with_rng(draw_scene(x := rng_of(a), size), x), mirrored=True)
        item = _Item("general", image, caption, None, "jpeg", int(r.integers(80, 96)))
        _insert(rows["plant"], _Row("plant", item, "non_plant_in_plant_list"), rng)
    n_eval = min(len(eval_items), max(len(EVAL_COPY_FAULTS), k)) if k else 0
    for n, e in enumerate(rng.choice(len(eval_items), n_eval, replace=False)):
        _insert(rows["plant"], _Row("plant", eval_items[int(e)], EVAL_COPY_FAULTS[n % len(EVAL_COPY_FAULTS)]), rng)
    made, tried = 0, 0
    while made < k and spare["plant"]:
        origin = base["plant"][spare["plant"].pop()]
        rephoto = _seeded(config.seed, _REPHOTO_STREAM, tried)
        tried += 1
        it = origin.item
        image, view = guard.draw(
            lambda a: draw_plant(it.species.traits, np.random.default_rng(it.seed), size, restyle=rephoto(a)), mirrored=True,
            tries=_REPHOTO_TRIES)
        if imagehash.phash(image) - imagehash.phash(it.image) <= guard.min_distance:
            continue  # a plant that hardly changes when moved (a few thin leaves): take another
        item = _Item("plant", image, "", it.species, "jpeg", int(rng.integers(80, 96)), view)
        _insert(rows["plant"], _Row("plant", item, "semantic_dup", origin=origin), rng, after=origin)
        made += 1
    for item in (r.item for lst in rows.values() for r in lst if r.fault in MODEL_CURATION_FAULTS):
        if not item.data:
            item.data = _encode(item.image, item.fmt, item.quality)
    pending = [(base[name][spare[name].pop()], "cross_domain_caption")
               for name in LISTS for _ in range(min(k // 2, len(spare[name])))]
    pending += [(base["plant"][spare["plant"].pop()], "species_swap_caption") for _ in range(min(k // 2, len(spare["plant"])))]
    return pending


def _fill_row(r: _Row, honest: dict[str, list[str]], selected: list[Species], config: DemoWorldConfig,
              rng: np.random.Generator) -> None:
    """Decide a row's URL, caption, taxonomy, provenance, payload and server route from its fault."""
    if r.fault == "repeated_row":  # the very same row again: nothing new to serve
        o = r.origin
        r.key, r.url, r.caption, r.taxa = o.key, o.url, o.caption, o.taxa
        r.license, r.attribution, r.file = o.license, o.attribution, o.file
        return
    r.license = str(rng.choice(_LICENSES))
    r.attribution = f"photographer {int(rng.integers(1, 400)):03d} (demo world)"
    _set_caption(r, honest, selected, rng)
    route, payload, ext = _serve(r, config, rng)
    path = f"/{r.list}/{r.key}.{ext}"
    if r.fault == "bad_scheme":  # never served
        r.url = f"ftp://plantmix-demo.invalid{path}" if rng.random() < 0.5 else f"file:///srv/plantmix-demo{path}"
        return
    r.url = DEMO_BASE_URL + path
    if payload is not None:
        r.file = route["body_file"] = f"files/{r.list}/{r.key}.{ext}"
    r.route, r.payload = route, payload


def _set_caption(r: _Row, honest: dict[str, list[str]], selected: list[Species], rng: np.random.Generator) -> None:
    """The row's caption and taxonomy columns. `honest` holds, per list, captions some other row
    carries truthfully: the material for mismatched ones."""
    it, f = r.item, r.fault
    r.caption, r.taxa = it.caption, it.species if r.list == "plant" else None
    if f in FRESH_CAPTION_FAULTS and it.species is not None:
        # A repost: a fresh caption in the plant list, a vague one when it lands in the general list.
        if r.list == "plant":
            r.caption = plant_caption(it.species, it.view, rng)
        else:
            r.caption = str(rng.choice(_CROSS_LIST_CAPTIONS))
    elif f == "mismatched_caption" and r.list == "plant":
        if rng.random() < 0.5 or not honest["general"]:  # another species' caption, with its taxonomy
            _other_species(r, selected, _LIE_VIEW, rng)
        else:
            r.caption, r.taxa, r.mismatch = str(rng.choice(honest["general"])), None, MISMATCH_CROSS_DOMAIN
    elif f == "mismatched_caption":
        pool = [c for c in honest["general"] if c != it.caption] if rng.random() < 0.5 else []
        r.caption = str(rng.choice(pool or honest["plant"]))
        r.mismatch = MISMATCH_SCENES if pool else MISMATCH_CROSS_DOMAIN
    elif f == "cross_domain_caption":  # a plant list carries no taxonomy for a scene's caption
        r.caption = str(rng.choice(honest["general" if r.list == "plant" else "plant"]))
        r.taxa, r.mismatch = (None if r.list == "plant" else r.taxa), MISMATCH_CROSS_DOMAIN
    elif f == "non_plant_in_plant_list":  # a scene filed under a species
        _other_species(r, selected, _LIE_VIEW, rng)
        r.mismatch = MISMATCH_CROSS_DOMAIN
    elif f in ("empty_caption", "group_empty_caption"):
        r.caption = ""
    elif f in ("conflict_other_species", "species_swap_caption"):  # the same photo filed under another species
        _other_species(r, selected, it.view, rng)
    elif f == "non_english_caption":
        r.caption = str(rng.choice(_NON_ENGLISH[r.list]))
    elif f in ("garbage_caption", "group_garbage_caption"):
        r.caption = _garbage_caption(rng)


def _other_species(r: _Row, selected: list[Species], view: dict, rng: np.random.Generator) -> None:
    """Caption and taxonomy of a species the row's image is not."""
    others = [s for s in selected if s is not r.item.species]
    lie = others[int(rng.integers(0, len(others)))]
    r.caption, r.taxa, r.mismatch = plant_caption(lie, view, rng), lie, MISMATCH_SPECIES


def _serve(r: _Row, config: DemoWorldConfig, rng: np.random.Generator) -> tuple[dict, bytes | None, str]:
    """What the server does for the row: (route, payload bytes to store or None, URL extension)."""
    it, f = r.item, r.fault
    def image_route(ctype: str, **more) -> dict:
        return {"status": 200, "content_type": ctype, "headers": {}, "delay": 0.0, **more}

    def html_route(status: int, title: str) -> dict:
        return {"status": status, "content_type": "text/html; charset=utf-8", "headers": {}, "delay": 0.0,
                "body": _html_page(title)}

    own = "png" if it.fmt == "png" else "jpg"
    own_type = "image/png" if it.fmt == "png" else "image/jpeg"
    if f == "http_404":
        return html_route(404, "404 Not Found"), None, "jpg"
    if f == "http_500":
        return html_route(500, "500 Internal Server Error"), None, "jpg"
    if f == "html":
        return html_route(200, r.caption or "photo"), None, "jpg"
    if f == "timeout":
        return image_route(own_type, delay=float(config.timeout_delay_s)), it.data, own
    if f == "noai":
        robots = str(rng.choice(["noai", "noai, noimageai", "noimageai"]))
        return image_route(own_type, headers={"X-Robots-Tag": robots}), it.data, own
    if f in ("exact_dup", "group_garbage_caption"):
        r.phash_distance = 0
        return image_route(own_type, body_file=r.origin.file), None, r.origin.file.rsplit(".", 1)[1]
    if f == "truncated":
        data, ext = _truncated(it.image, rng)
        return image_route("image/png" if ext == "png" else "image/jpeg"), data, ext
    if f == "corrupt":
        return image_route("image/jpeg"), _corrupt(rng), "jpg"
    if f == "huge":
        w, h = (10000, 10000) if rng.random() < 0.5 else (12000, 10000)
        y0 = int(rng.integers(0, h - 2000))
        return image_route("image/png"), _flat_png(w, h, (y0, y0 + int(rng.integers(500, 2000)))), "png"
    if f in EVAL_COPY_FAULTS:  # the evaluation file's own bytes, or a near copy of them
        data = it.data if f == "eval_copy_exact" else _derived_jpeg(f.replace("eval_copy_", "near_dup_"), it, rng)
        r.phash_distance = int(_phash(data) - _phash(it.data))
        return image_route("image/png" if f == "eval_copy_exact" else "image/jpeg"), data, "png" if f == "eval_copy_exact" else "jpg"
    if f == "semantic_dup":
        r.phash_distance = int(_phash(it.data) - _phash(r.origin.item.data))
    if f in ("tiny", "extreme_aspect", "near_dup_reencode", "near_dup_resize", "near_dup_crop", "near_dup_mirror",
             "group_good_copy", "conflict_other_species"):
        data = _derived_jpeg(f, it, rng)
        if r.origin is not None:
            r.phash_distance = int(_phash(data) - _phash(it.data))
        return image_route("image/jpeg"), data, "jpg"
    return image_route(own_type), it.data, own  # the image itself; any fault is in the caption


def _derived_jpeg(fault: str, it: _Item, rng: np.random.Generator) -> bytes:
    """A JPEG made from the item's image: shrunk to a thumbnail, cut into a strip, or a near-duplicate
    of the served bytes (re-encoded, resized 60-85 %, or lightly cropped, 1-3 % per side)."""
    if fault == "tiny":
        side = int(rng.integers(8, 25))
        return _encode(it.image.resize((side, side), Image.LANCZOS), "jpeg")
    if fault == "extreme_aspect":
        w, h = [(640, 90), (90, 640), (800, 100)][int(rng.integers(0, 3))]
        band = it.image.height * min(w, h) // max(w, h)
        at = int(rng.integers(0, it.image.height - band))
        box = (0, at, it.image.width, at + band) if w > h else (at, 0, at + band, it.image.height)
        return _encode(it.image.crop(box).resize((w, h), Image.LANCZOS), "jpeg")
    src = Image.open(io.BytesIO(it.data)).convert("RGB")
    if fault == "near_dup_mirror":
        return _encode(ImageOps.mirror(src), "jpeg", int(rng.integers(85, 96)))
    if fault == "group_good_copy":
        k = rng.uniform(0.75, 0.9)
        return _encode(src.resize((round(src.width * k), round(src.height * k)), Image.LANCZOS), "jpeg", 90)
    if fault == "conflict_other_species":
        return _encode(src, "jpeg", int(rng.integers(70, 90)))
    if fault == "near_dup_reencode":
        return _encode(src, "jpeg", int(rng.integers(35, 60)))  # originals are PNG or JPEG at quality >= 80
    if fault == "near_dup_resize":
        k = rng.uniform(0.6, 0.85)
        return _encode(src.resize((round(src.width * k), round(src.height * k)), Image.LANCZOS), "jpeg", 90)
    m = np.round(rng.uniform(0.01, 0.03, 4) * np.array([src.width, src.height, src.width, src.height])).astype(int)
    return _encode(src.crop((m[0], m[1], src.width - m[2], src.height - m[3])), "jpeg", 90)


# ---------------------------------------------------------------- generation


# Seed streams of the world's generators: training items 1 and 2, row planning 3 and 5, eval 4, validation
# 5-7 (plantmix.demo.validation), and the model-curation cases:
_MODEL_PLANT_STREAM, _MODEL_SCENE_STREAM, _REPHOTO_STREAM, _MODEL_CASE_STREAM = 8, 9, 10, 11
_REPHOTO_TRIES = 32  # a small move often stays within the guard's distance of its original: more retakes


def _seed_of(key: tuple[int, ...], attempt: int) -> list[int]:
    """The seed of one image's generator: attempt 0 uses the plain key, redraws append the attempt."""
    return [*key, attempt] if attempt else list(key)


def _seeded(*key: int):
    return lambda attempt: np.random.default_rng(_seed_of(key, attempt))


def _draw_items(selected: list[Species], config: DemoWorldConfig, guard: _DiversityGuard) -> dict[str, list[_Item]]:
    items: dict[str, list[_Item]] = {"plant": [], "general": []}
    for sp in selected:
        for j in range(config.images_per_species):
            rng_of = _seeded(config.seed, 1, sp.index, j)
            image, (view, rng) = guard.draw(
                lambda a: _with_rng(draw_plant(sp.traits, r := rng_of(a), config.image_size), r))
            seed = _seed_of((config.seed, 1, sp.index, j), guard.attempt)
            fmt = "png" if rng.random() < 0.12 else "jpeg"
            caption = plant_caption(sp, view, rng)
            items["plant"].append(_Item("plant", image, caption, sp, fmt, int(rng.integers(80, 96)), view, seed=seed))
    for g in range(config.general_images):
        rng_of = _seeded(config.seed, 2, g)
        image, (caption, rng) = guard.draw(lambda a: _with_rng(draw_scene(r := rng_of(a), config.image_size), r))
        fmt = "png" if rng.random() < 0.12 else "jpeg"
        items["general"].append(_Item("general", image, caption, None, fmt, int(rng.integers(80, 96))))
    for it in items["plant"] + items["general"]:
        it.data = _encode(it.image, it.fmt, it.quality)
    return items


_PLANT_LIST_SCHEMA = pa.schema([(c, pa.string()) for c in ("key", "url", "caption", *TAXON_COLUMNS, "common_name",
                                                              "license", "attribution")])
_GENERAL_LIST_SCHEMA = pa.schema([(c, pa.string()) for c in ("key", "url", "caption", "license", "attribution")])
_TRUTH_SCHEMA = pa.schema([("list", pa.string()), ("row", pa.int64()), ("key", pa.string()), ("url", pa.string()),
                           ("fault", pa.string()), ("dup_of_url", pa.string()), ("species", pa.string()),
                           ("dup_phash_distance", pa.int64()), ("eval_image", pa.string()),
                           ("caption_mismatch", pa.string())])


def _url_tables(rows: dict[str, list[_Row]]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The two URL lists as a crawl would publish them, and the ground truth behind every row."""
    def listed(r: _Row) -> dict:
        taxa = {c: (r.taxa.taxonomy[rank] if r.taxa else None) for rank, c in zip(TAXON_RANKS, TAXON_COLUMNS)}
        return {"key": r.key, "url": r.url, "caption": r.caption, **taxa,
                "common_name": r.taxa.common_name if r.taxa else None, "license": r.license,
                "attribution": r.attribution}

    truth = [{"list": name, "row": i, "key": r.key, "url": r.url, "fault": r.fault,
              "dup_of_url": r.origin.url if r.origin is not None else None,
              "species": r.item.species.scientific if r.item.species else None,
              "dup_phash_distance": r.phash_distance, "eval_image": r.item.eval_path, "caption_mismatch": r.mismatch}
             for name in LISTS for i, r in enumerate(rows[name])]
    return (pa.Table.from_pylist([listed(r) for r in rows["plant"]], _PLANT_LIST_SCHEMA),
            pa.Table.from_pylist([listed(r) for r in rows["general"]], _GENERAL_LIST_SCHEMA),
            pa.Table.from_pylist(truth, _TRUTH_SCHEMA))


def _with_rng(drawn: tuple, rng: np.random.Generator) -> tuple:
    image, extra = drawn
    return image, (extra, rng)


def _draw_eval(selected: list[Species], config: DemoWorldConfig, guard: _DiversityGuard) -> list[_Item]:
    """The held-out evaluation images (eval/<species folder>/NNNN.png), as items the lists may copy."""
    items = []
    for sp in selected:
        for j in range(config.heldout_per_species):
            rng_of = _seeded(config.seed, 4, sp.index, j)
            image, view = guard.draw(lambda a: draw_plant(sp.traits, rng_of(a), config.image_size))
            it = _Item("eval", image, "", sp, "png", 0, view, eval_path=f"eval/{sp.folder}/{j:04d}.png")
            it.data = _encode(image, "png")
            items.append(it)
    return items


def _write_eval(root: Path, selected: list[Species], items: list[_Item]) -> int:
    for it in items:
        (root / it.eval_path).parent.mkdir(parents=True, exist_ok=True)
        (root / it.eval_path).write_bytes(it.data)
    classnames = {sp.folder: {"scientific": sp.scientific, "common": sp.common_name} for sp in selected}
    text = json.dumps(classnames, indent=1, sort_keys=True, ensure_ascii=False)
    (root / "eval" / "classnames.json").write_text(text + "\n", encoding="utf-8")
    return len(items)


def _fill_rows(root: Path, rows: dict[str, list[_Row]], pending: list[tuple[_Row, str]], selected: list[Species],
               config: DemoWorldConfig, rng: np.random.Generator) -> dict[str, dict]:
    """Fill every row and write its payload; return the server's routes. The crawl faults draw from `rng`
    in list order, as before the model-curation cases existed; those cases draw from a stream of their own."""
    honest = {name: [r.item.caption for r in rows[name] if r.origin is None and r.fault not in CAPTION_FAULTS
                     and r.fault not in MODEL_CURATION_FAULTS] for name in LISTS}  # fmt: skip
    cases = np.random.default_rng([config.seed, _MODEL_CASE_STREAM, 1])
    for name in LISTS:
        (root / "files" / name).mkdir(parents=True)
    for r in [r for name in LISTS for r in rows[name] if r.fault not in MODEL_CURATION_FAULTS]:
        _fill_row(r, honest, selected, config, rng)
    for r in [r for name in LISTS for r in rows[name] if r.fault in MODEL_CURATION_FAULTS]:
        _fill_row(r, honest, selected, config, cases)
    for r, fault in pending:
        r.fault = fault
        _set_caption(r, honest, selected, cases)
    routes: dict[str, dict] = {}
    for r in (r for name in LISTS for r in rows[name]):
        if r.payload is not None:
            (root / r.file).write_bytes(r.payload)
        if r.route is not None:
            routes[r.url[len(DEMO_BASE_URL):]] = r.route
    return routes


def _world_record(config: DemoWorldConfig) -> dict:
    return {"version": WORLD_VERSION, "config": config.model_dump(mode="json")}


def generate_world(out_dir: Path, config: DemoWorldConfig) -> Path:
    """Generate the demo world into `out_dir` (atomically); a no-op when it already holds this config+version."""
    out_dir = Path(out_dir)
    record = _world_record(config)
    marker = out_dir / "world.json"
    if marker.exists():
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
            if {k: old.get(k) for k in record} == record:
                return out_dir
        except (OSError, ValueError):
            pass
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # The new world replaces the directory wholesale: never do that to something else.
        raise PlantmixError(f"{out_dir}: exists and is not a demo world (no world.json); choose an empty directory")
    selected = select_species(load_species_table(), config.species, config.seed)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        guard = _DiversityGuard()  # every drawing passes it, in a fixed order: items, eval, validation, cases
        items = _draw_items(selected, config, guard)
        eval_items = _draw_eval(selected, config, guard)
        n_eval = _write_eval(tmp, selected, eval_items)
        from plantmix.demo.validation import write_pretrain, write_validation  # they draw with this module's helpers

        validation = write_validation(tmp, selected, config, guard)
        rng = np.random.default_rng([config.seed, 3])
        rows, base, spare = _build_rows(items, config, rng)
        pending = _plant_model_cases(base, rows, spare, selected, eval_items, config, guard)
        # Not kept apart in pHash (redraws get costly as the guard fills): their own seed streams make
        # them new drawings, which is all a pretraining stand-in needs.
        n_pretrain = write_pretrain(tmp, selected, config, _DiversityGuard(tries=0))
        _assign_keys(rows)
        routes = _fill_rows(tmp, rows, pending, selected, config, rng)
        text = json.dumps({"version": WORLD_VERSION, "routes": routes}, indent=1, sort_keys=True)
        (tmp / "routes.json").write_text(text + "\n", encoding="utf-8")
        plant, general, truth = _url_tables(rows)
        write_parquet(plant, tmp / "plant_urls.parquet")
        write_parquet(general, tmp / "general_urls.parquet")
        write_parquet(truth, tmp / "ground_truth.parquet")
        summary = {
            **record,
            "base_url": DEMO_BASE_URL,
            "species": [s.scientific for s in selected],
            "rows": {name: len(rows[name]) for name in LISTS},
            "faults": {name: dict(sorted(Counter(r.fault for r in rows[name]).items())) for name in LISTS},
            "eval_images": n_eval,
            "pretrain_pairs": n_pretrain,
            **validation,
        }
        text = json.dumps(summary, indent=1, sort_keys=True, ensure_ascii=False)
        (tmp / "world.json").write_text(text + "\n", encoding="utf-8")
    return out_dir
