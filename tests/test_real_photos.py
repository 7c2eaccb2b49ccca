"""Curation decisions on real photographs (scikit-learn's sample photos and quarter crops of them):
copies made here (re-encode q60, resize 70 %, 2 % crop, brighter, mirrored, exact copies, one exact copy
with an empty caption, one re-encode in another source). The original must be the kept twin, its group's
captions must survive on it, and nothing with a good caption may be lost."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageEnhance, ImageOps

from plantmix.build import run_build
from plantmix.core.recipe import load_recipe
from plantmix.curate.decide import check_invariants

pytestmark = pytest.mark.slow

RADII = (4, 6, 8, 10, 12)


def _photos() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_images

    out = {}
    for name, pixels in zip(("china", "flower"), load_sample_images().images):
        image = Image.fromarray(pixels)
        out[name] = image
        w, h = image.size
        for i, box in enumerate([(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]):
            out[f"{name}-q{i}"] = image.crop(box)
    return out


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _variants(image: Image.Image) -> dict[str, bytes]:
    original = _jpeg(image, 95)
    w, h = image.size
    cw, ch = round(w * 0.02), round(h * 0.02)
    return {
        "original": original,
        "reencode_q60": _jpeg(image, 60),
        "resize_70": _jpeg(image.resize((round(w * 0.7), round(h * 0.7)), Image.LANCZOS), 90),
        "crop_2pct": _jpeg(image.crop((cw, ch, w - cw, h - ch)), 90),
        "brighter": _jpeg(ImageEnhance.Brightness(image).enhance(1.3), 90),
        "mirror": _jpeg(ImageOps.mirror(image), 85),
        "exact_copy": original,
        "exact_copy_empty_caption": original,
    }


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for src in ("a", "b"):
        (root / src).mkdir()
    for name, image in _photos().items():
        for variant, data in _variants(image).items():
            (root / "a" / f"{name}.{variant}.jpg").write_bytes(data)
            caption = "" if variant == "exact_copy_empty_caption" else f"a photo of {name} ({variant.replace('_', ' ')})"
            (root / "a" / f"{name}.{variant}.txt").write_text(caption)
        (root / "b" / f"{name}.other_source.jpg").write_bytes(_jpeg(image, 90))
        (root / "b" / f"{name}.other_source.txt").write_text(f"another site's photo of {name}")
    recipe = {
        "name": "photos",
        "sources": [
            {"name": "site_a", "domain": "general", "format": "image_text_folder", "path": str(root / "a")},
            {"name": "site_b", "domain": "general", "format": "image_text_folder", "path": str(root / "b")},
        ],
        "download": {"processes_count": 1, "thread_count": 4, "image_size": 512},
        "filters": {"caption_min_words": 2},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = root / "build"
    run_build(load_recipe(path), out, recipe_path=path)
    return out / "manifest.parquet"


@pytest.fixture(scope="module")
def rows(build) -> list[dict]:
    return pq.read_table(build).to_pylist()


def _name_variant(row: dict) -> tuple[str, str]:
    stem = row["source_key"].rsplit(".", 1)[0]
    return tuple(stem.split(".", 1))  # type: ignore[return-value]


def test_original_is_kept_and_group_captions_survive(rows):
    by_photo: dict[str, dict[str, dict]] = {}
    for r in rows:
        name, variant = _name_variant(r)
        by_photo.setdefault(name, {})[variant] = r
    kept_twin = {}
    for name, group in by_photo.items():
        kept = [v for v, r in group.items() if r["keep"]]
        kept_twin[name] = kept
        # exact copies are the same bytes as the original: either may stand for it
        assert len(kept) == 1 and kept[0] in ("original", "exact_copy"), (name, kept)
        head = group[kept[0]]
        good = {r["caption"] for r in group.values() if r["caption"] and r["dup_of"] == head["uid"]} | {head["caption"]}
        assert len(good) == len(group) - 1  # every caption but the empty one
        assert set(head["captions"]) == good and head["captions"][0] == head["caption"]
        for v, r in group.items():
            assert r["keep"] or r["dup_of"] == head["uid"], (name, v, r["drop_reason"], r["dup_of"])
    print({k: v[0] for k, v in kept_twin.items()})


def test_invariants_on_real_photos(build):
    assert check_invariants(pq.read_table(build), radius=8) == []


def test_variant_by_radius_table(rows):
    """Recall per variant and radius (distance to the original, mirror hash included); printed for the
    record; at the default radius 8 every variant must be found."""
    rows = {_name_variant(r): r for r in rows}
    variants = sorted({v for _, v in rows} - {"original"})
    table = {}
    for v in variants:
        d = []
        for (name, variant), r in rows.items():
            if variant != v:
                continue
            o = rows[(name, "original")]
            d.append(min(bin(r["phash"] ^ o["phash"]).count("1"), bin(r["phash"] ^ o["phash_mirror"]).count("1")))
        table[v] = [int(np.sum(np.array(d) <= radius)) for radius in RADII]
        print(f"{v:<26}", "  ".join(f"r{radius}: {n}/{len(d)}" for radius, n in zip(RADII, table[v])))
    n = len({name for name, _ in rows})
    for v, found in table.items():
        assert found[RADII.index(8)] == n, (v, found)
