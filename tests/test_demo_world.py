"""The demo world: species table, deterministic generation, ground truth, served faults, and what
img2dataset (the real downloader) makes of each fault."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from plantmix.demo import (
    DEMO_BASE_URL, EXPECTED_DOWNLOAD_OUTCOME, FAULTS, REFERENCE_DOWNLOAD_SETTINGS, generate_world, live_url,
    load_species_table, serve_world,
)
from plantmix.demo.draw import _finish, draw_plant, plant_layer
from plantmix.demo.world import (
    DUP_FAULTS, EVAL_COPY_FAULTS, EXTRA_ROW_FAULTS, IN_PLACE_FAULTS, LIST_ONLY_FAULTS, MISMATCH_CROSS_DOMAIN,
    MISMATCH_SCENES, MISMATCH_SPECIES, MODEL_CURATION_FAULTS, _plan_faults, select_species, species_table_path,
    texture_groups,
)
from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import DemoWorldConfig
from plantmix.core.schema import TAXON_COLUMNS, TAXON_RANKS

REPO = Path(__file__).resolve().parents[1]
# Small but complete: every fault kind appears at least once in each list.
SMALL = DemoWorldConfig(species=5, images_per_species=8, heldout_per_species=2, general_images=32, image_size=96,
                        seed=7, timeout_delay_s=4)
# Images whose bytes are a distinct, intact drawing (the fault, if any, is in the caption or headers).
INTACT_IMAGE_FAULTS = {"ok", "mismatched_caption", "empty_caption", "non_english_caption", "garbage_caption", "noai",
                       "timeout", "plant_in_general_list", "non_plant_in_plant_list", "cross_domain_caption",
                       "species_swap_caption", "semantic_dup"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_world(tmp_path_factory.mktemp("demo") / "world", SMALL)


@pytest.fixture(scope="module")
def truth(world) -> list[dict]:
    return pq.read_table(world / "ground_truth.parquet").to_pylist()


@pytest.fixture(scope="module")
def lists(world) -> dict[str, list[dict]]:
    return {name: pq.read_table(world / f"{name}_urls.parquet").to_pylist() for name in ("plant", "general")}


@pytest.fixture(scope="module")
def routes(world) -> dict[str, dict]:
    return json.loads((world / "routes.json").read_text())["routes"]


def _route_of(routes: dict, url: str) -> dict | None:
    return routes.get(url[len(DEMO_BASE_URL):]) if url.startswith(DEMO_BASE_URL + "/") else None


def _served(world: Path, routes: dict, url: str) -> bytes:
    return (world / _route_of(routes, url)["body_file"]).read_bytes()


def _first(truth: list[dict], fault: str, **where) -> dict:
    return next(g for g in truth if g["fault"] == fault and all(g[k] == v for k, v in where.items()))


# ---------------------------------------------------------------- species table


def test_packaged_species_table_is_identical_to_manifest():
    assert (REPO / "manifests" / "demo_species.csv").read_bytes() == species_table_path().read_bytes()


def test_species_table_has_real_taxonomy_and_texture_only_groups():
    table = load_species_table()
    assert len(table) >= 40
    assert len({s.scientific for s in table}) == len(table)
    for s in table:
        assert s.taxonomy["kingdom"] == "Plantae"
        assert re.fullmatch(r"[A-Z][a-z]+ [a-z]+(-[a-z]+)?", s.scientific)
        assert s.scientific.split()[0] == s.taxonomy["genus"]
        assert s.taxonomy["family"].endswith("aceae") and s.taxonomy["order"].endswith("ales")
    groups = texture_groups(table)
    assert len(groups) >= 3
    for g in groups:  # congeners that differ only in fine texture (vein density or pattern)
        assert len({s.taxonomy["genus"] for s in g}) == 1
        assert len({(s.traits.vein_pairs, s.traits.texture) for s in g}) == len(g)


def test_species_selection_is_deterministic_and_includes_a_texture_group():
    table = load_species_table()
    a, b = select_species(table, 16, seed=3), select_species(table, 16, seed=3)
    assert [s.scientific for s in a] == [s.scientific for s in b] and len(a) == 16
    grouped = {s.scientific for g in texture_groups(table) for s in g}
    assert sum(s.scientific in grouped for s in a) >= 4
    with pytest.raises(PlantmixError, match="exceeds"):
        select_species(table, len(table) + 1, seed=0)


def test_bad_species_table_names_row_and_column(tmp_path):
    text = species_table_path().read_text().splitlines()
    text[3] = text[3].replace(",obovate,", ",blob,", 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(text) + "\n")
    with pytest.raises(PlantmixError, match=r"row 4: column 'leaf_shape': unknown value 'blob'"):
        load_species_table(bad)


# ---------------------------------------------------------------- generation


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_and_idempotent(world, tmp_path):
    again = generate_world(tmp_path / "again", SMALL)
    a, b = _tree(world), _tree(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    stamp = (again / "world.json").stat().st_mtime_ns
    generate_world(again, SMALL)  # same config and version: nothing rewritten
    assert (again / "world.json").stat().st_mtime_ns == stamp
    changed = SMALL.model_copy(update={"general_images": 20})
    generate_world(again, changed)
    assert json.loads((again / "world.json").read_text())["config"]["general_images"] == 20
    assert not list(tmp_path.glob(".again*"))  # no temporary left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(PlantmixError, match="not a demo world"):
        generate_world(tmp_path / "other", SMALL)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_default_world_fault_share_is_realistic():
    config = DemoWorldConfig()
    n_plant = config.species * config.images_per_species
    for n in (n_plant, config.general_images):
        in_place, extras, _ = _plan_faults(n, config.fault_rate, np.random.default_rng(0), cross_pool=list(range(50)))
        share = (len(in_place) + len(extras)) / (n + len(extras))
        assert 0.2 <= share <= 0.3
        assert {f for f in in_place.values()} == set(IN_PLACE_FAULTS)
        assert {f for f, _, _ in extras} == set(EXTRA_ROW_FAULTS)


# curation copies → the fault of the row they copy
CURATION_COPIES = {"near_dup_mirror": "ok", "group_garbage_caption": "group_empty_caption",
                   "group_good_copy": "group_empty_caption", "conflict_other_species": "ok", "semantic_dup": "ok"}


def test_ground_truth_matches_url_lists(world, truth, lists, routes):
    summary = json.loads((world / "world.json").read_text())
    for name, rows in lists.items():
        gt = [g for g in truth if g["list"] == name]
        assert [g["row"] for g in gt] == list(range(len(rows))) and len(rows) == summary["rows"][name]
        assert [g["key"] for g in gt] == [r["key"] for r in rows]
        assert [g["url"] for g in gt] == [r["url"] for r in rows]
        assert all(re.fullmatch(rf"{name}-\d{{6}}", r["key"]) for r in rows)
        other = "general" if name == "plant" else "plant"
        assert {g["fault"] for g in gt} == set(FAULTS) - set(LIST_ONLY_FAULTS[other])
    assert set(pq.read_table(world / "plant_urls.parquet").column_names) == {
        "key", "url", "caption", *TAXON_COLUMNS, "common_name", "license", "attribution"}
    assert set(pq.read_table(world / "general_urls.parquet").column_names) == {
        "key", "url", "caption", "license", "attribution"}
    # Unique keys except the repeated rows, which repeat key, url and caption exactly.
    by_url = {g["url"]: g for g in truth if g["fault"] != "repeated_row"}
    assert len(by_url) == sum(g["fault"] != "repeated_row" for g in truth)
    for g in truth:
        if g["fault"] == "repeated_row":
            rows = [r for r in lists[g["list"]] if r["url"] == g["url"]]
            assert len(rows) == 2 and rows[0] == rows[1] and g["dup_of_url"] == g["url"]
        elif g["fault"] in DUP_FAULTS or g["fault"] in CURATION_COPIES:
            original = by_url[g["dup_of_url"]]
            assert original["fault"] == CURATION_COPIES.get(g["fault"], "ok") and original["species"] == g["species"]
        else:
            assert g["dup_of_url"] is None
        assert (g["eval_image"] is not None) == (g["fault"] in EVAL_COPY_FAULTS)
    # Some exact duplicates put a plant image into the general list.
    assert any(g["fault"] == "exact_dup" and g["list"] == "general" and g["species"] for g in truth)


def test_plant_rows_carry_taxonomy_and_caption_faults_are_what_they_say(truth, lists):
    table = {s.scientific: s for s in load_species_table()}
    names = [n for s in table.values() for n in (s.scientific, s.common_name)]
    for g in truth:
        row = lists[g["list"]][g["row"]]
        caption = row["caption"]
        lies = ("mismatched_caption", "conflict_other_species", "species_swap_caption", "cross_domain_caption",
                "non_plant_in_plant_list")
        if g["list"] == "plant" and g["fault"] not in lies:
            sp = table[g["species"]]
            assert [row[c] for c in TAXON_COLUMNS] == [sp.taxonomy[r] for r in TAXON_RANKS]
            assert row["common_name"] == sp.common_name
        if g["fault"] == "conflict_other_species":  # the same photo listed under another species
            assert row["taxon_species"] != g["species"] and row["common_name"] and g["species"] not in caption
        elif g["fault"] == "mismatched_caption":
            if g["list"] == "plant":
                assert row["taxon_species"] != g["species"]
                assert g["species"] not in caption and table[g["species"]].common_name not in caption
                named = any(n in caption for n in names)
                assert g["caption_mismatch"] == (MISMATCH_SPECIES if named else MISMATCH_CROSS_DOMAIN)
            else:  # another general row's caption, or a plant's
                others = [r["caption"] for r in lists["general"] if r["key"] != g["key"]]
                named = any(n in caption for n in names)
                assert named or caption in others, caption
                assert g["caption_mismatch"] == (MISMATCH_CROSS_DOMAIN if named else MISMATCH_SCENES)
        if g["fault"] not in (*lies, "plant_in_general_list"):
            assert g["caption_mismatch"] is None
        elif g["fault"] == "species_swap_caption":
            assert row["taxon_species"] != g["species"] and g["caption_mismatch"] == MISMATCH_SPECIES
            assert row["taxon_species"] in caption or row["common_name"] in caption
        elif g["fault"] == "non_plant_in_plant_list":  # a scene under a species' name
            assert g["species"] is None and row["taxon_species"] and g["caption_mismatch"] == MISMATCH_CROSS_DOMAIN
        elif g["fault"] == "cross_domain_caption":  # a plant list's scene caption, a general list's plant caption
            assert g["caption_mismatch"] == MISMATCH_CROSS_DOMAIN
            named = any(n in caption for n in names)
            assert named == (g["list"] == "general") and (g["list"] == "general" or row["taxon_species"] is None)
        elif g["fault"] == "plant_in_general_list":  # a plant photo under a vague general caption
            assert g["species"] and not any(n in caption for n in names) and g["caption_mismatch"] is None
        elif g["fault"] in ("empty_caption", "group_empty_caption"):
            assert caption == ""
        elif g["fault"] == "non_english_caption":
            assert caption and not re.search(r"[A-Za-z]", caption)
        elif g["fault"] in ("garbage_caption", "group_garbage_caption"):
            assert not re.search(r"[a-z]{3,} [a-z]{3,}", caption)
        else:
            assert re.search(r"[A-Za-z]{3,} [A-Za-z]{2,}|^[A-Z][a-z]+ [a-z]+$", caption), caption
        assert row["license"] and row["attribution"]


def test_payloads_routes_and_duplicates(world, truth, routes):
    referenced = set()
    for g in truth:
        route = _route_of(routes, g["url"])
        if g["fault"] == "bad_scheme":
            assert g["url"].split("://")[0] in ("ftp", "file") and route is None
            continue
        assert route is not None, g["url"]
        if "body_file" in route:
            assert (world / route["body_file"]).is_file()
            referenced.add(route["body_file"])
        assert route["delay"] <= 8 and (route["delay"] > 0) == (g["fault"] == "timeout")
    assert referenced == {str(p.relative_to(world)) for p in (world / "files").rglob("*") if p.is_file()}
    for g in truth:
        if g["fault"] not in DUP_FAULTS:
            continue
        data, original = _served(world, routes, g["url"]), _served(world, routes, g["dup_of_url"])
        if g["fault"] == "exact_dup":
            assert data == original and g["dup_phash_distance"] == 0
            continue
        assert data != original
        a, b = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(original))
        if g["fault"] == "near_dup_reencode":
            assert a.size == b.size
        elif g["fault"] == "near_dup_resize":
            assert 0.55 <= a.width / b.width <= 0.9
        else:
            assert 0.88 <= a.width / b.width <= 0.97 and 0.88 <= a.height / b.height <= 0.97
        assert g["dup_phash_distance"] == imagehash.phash(a) - imagehash.phash(b)


def test_eval_copies_are_copies_of_evaluation_images(world, truth, routes):
    copies = [g for g in truth if g["fault"] in EVAL_COPY_FAULTS]
    assert {g["fault"] for g in copies} == set(EVAL_COPY_FAULTS) and all(g["list"] == "plant" for g in copies)
    assert len({g["eval_image"] for g in copies}) == len(copies)  # one copy per evaluation image
    for g in copies:
        data, original = _served(world, routes, g["url"]), (world / g["eval_image"]).read_bytes()
        assert g["eval_image"].split("/")[1] == g["species"].lower().replace(" ", "_")
        a, b = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(original))
        assert g["dup_phash_distance"] == imagehash.phash(a) - imagehash.phash(b)
        if g["fault"] == "eval_copy_exact":
            assert data == original
            continue
        assert data != original and a.format == "JPEG"
        if g["fault"] == "eval_copy_mirror":  # far in plain pHash, near once mirrored back
            assert g["dup_phash_distance"] > 8 and imagehash.phash(ImageOps.mirror(a)) - imagehash.phash(b) <= 8
            continue
        assert g["dup_phash_distance"] <= 8
        if g["fault"] == "eval_copy_resize":
            assert 0.55 <= a.width / b.width <= 0.9
        elif g["fault"] == "eval_copy_crop":  # 1-3 % per side: at least a pixel on some side
            assert 0.88 <= a.width / b.width <= 1 and 0.88 <= a.height / b.height <= 1 and a.size != b.size
        else:
            assert a.size == b.size


def test_semantic_duplicates_are_the_same_plant_far_in_phash(world, truth, routes):
    dups = [g for g in truth if g["fault"] == "semantic_dup"]
    assert len(dups) == SMALL.species
    for g in dups:
        data, original = _served(world, routes, g["url"]), _served(world, routes, g["dup_of_url"])
        a, b = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(original))
        assert a.size == b.size and g["dup_phash_distance"] == imagehash.phash(a) - imagehash.phash(b) > 8


def test_restyle_redraws_the_same_plant_in_a_new_photo():
    """The same draws of the plant's generator give the same plant: composited back on the original
    background without a pose change, the restyled plant layer is the original drawing."""
    sp = load_species_table()[3]
    seed, size = [0, 1, 3, 0], 96
    original, view = draw_plant(sp.traits, np.random.default_rng(seed), size)
    again, view2 = draw_plant(sp.traits, np.random.default_rng(seed), size, restyle=np.random.default_rng(1))
    same, _ = draw_plant(sp.traits, np.random.default_rng(seed), size, restyle=np.random.default_rng(1))
    assert np.array_equal(np.asarray(again), np.asarray(same))  # deterministic
    assert view2 == view and not np.array_equal(np.asarray(again), np.asarray(original))
    rng = np.random.default_rng(seed)
    layer, background, _ = plant_layer(sp.traits, rng, size)  # the original's draws, up to its finish
    background.alpha_composite(layer)
    assert np.array_equal(np.asarray(_finish(background.convert("RGB"), rng, size)), np.asarray(original))


def test_model_curation_cases_per_list(truth, lists):
    per = lambda name, fault: sum(g["list"] == name and g["fault"] == fault for g in truth)  # noqa: E731
    k = SMALL.species
    assert per("general", "plant_in_general_list") == k and per("plant", "non_plant_in_plant_list") == k
    assert per("plant", "species_swap_caption") == per("plant", "cross_domain_caption") == k // 2
    assert per("general", "cross_domain_caption") == k // 2
    for g in truth:  # the image is a plant exactly when the truth names a species
        if g["fault"] == "plant_in_general_list":
            assert g["list"] == "general" and g["species"]
        if g["fault"] == "non_plant_in_plant_list":
            assert g["species"] is None
    assert all(g["caption_mismatch"] in (None, MISMATCH_CROSS_DOMAIN, MISMATCH_SPECIES, MISMATCH_SCENES) for g in truth)
    assert set(MODEL_CURATION_FAULTS) <= {g["fault"] for g in truth}


def test_eval_set_is_an_image_folder_of_the_selected_species(world):
    summary = json.loads((world / "world.json").read_text())
    classnames = json.loads((world / "eval" / "classnames.json").read_text())
    assert sorted(c["scientific"] for c in classnames.values()) == sorted(summary["species"])
    for folder, names in classnames.items():
        assert folder == names["scientific"].lower().replace(" ", "_")
        images = sorted((world / "eval" / folder).glob("*.png"))
        assert [p.name for p in images] == [f"{j:04d}.png" for j in range(SMALL.heldout_per_species)]
        assert Image.open(images[0]).size == (SMALL.image_size, SMALL.image_size)


def test_distinct_images_are_not_near_duplicates(world, truth, routes):
    """Distinct drawings (training and held-out) stay > 8 bits apart in 64-bit pHash."""
    files = sorted({_route_of(routes, g["url"])["body_file"] for g in truth if g["fault"] in INTACT_IMAGE_FAULTS})
    paths = [world / f for f in files] + sorted((world / "eval").rglob("*.png"))
    bits = np.array([imagehash.phash(Image.open(p)).hash.ravel() for p in paths])
    dist = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    np.fill_diagonal(dist, 64)
    assert len(paths) >= 50 and dist.min() > 8


# ---------------------------------------------------------------- the live server


def _get(url: str, method: str = "GET", timeout: float = 5.0):
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.headers, response.read()


def test_server_serves_each_fault_as_declared(world, truth, routes):
    with serve_world(world) as base:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base)
        url = lambda fault: live_url(_first(truth, fault)["url"], base)  # noqa: E731

        status, headers, body = _get(url("ok"))
        assert status == 200 and body == _served(world, routes, _first(truth, "ok")["url"])
        assert headers["Content-Type"] in ("image/jpeg", "image/png") and int(headers["Content-Length"]) == len(body)
        status, headers, body = _get(url("ok"), method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0

        for fault, code in (("http_404", 404), ("http_500", 500)):
            with pytest.raises(urllib.error.HTTPError) as e:
                _get(url(fault))
            assert e.value.code == code
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + "/no/such/path.jpg")
        assert e.value.code == 404

        with pytest.raises((TimeoutError, urllib.error.URLError)):
            _get(url("timeout"), timeout=0.5)

        _, headers, body = _get(url("html"))
        assert headers["Content-Type"].startswith("text/html") and body.startswith(b"<!DOCTYPE html>")
        _, headers, _ = _get(url("noai"))
        assert "noai" in headers["X-Robots-Tag"] or "noimageai" in headers["X-Robots-Tag"]

        for fault in ("truncated", "corrupt"):
            _, _, body = _get(url(fault))
            with pytest.raises(Exception):
                Image.open(io.BytesIO(body)).load()
        _, _, body = _get(url("tiny"))
        assert max(Image.open(io.BytesIO(body)).size) <= 24
        _, _, body = _get(url("extreme_aspect"))
        w, h = Image.open(io.BytesIO(body)).size
        assert max(w, h) / min(w, h) >= 6
        _, _, body = _get(url("huge"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = Image.open(io.BytesIO(body)).size  # header only
        assert w >= 10000 and h >= 10000 and len(body) < 200_000


def test_server_stops_without_serving_a_stalled_request(world, truth):
    """Leaving serve_world aborts a handler that is stalling a timeout row instead of finishing it."""
    outcome: list = []

    def client(url: str) -> None:
        try:
            outcome.append(_get(url, timeout=30)[0])
        except Exception as e:  # noqa: BLE001 - any failure is the expected outcome
            outcome.append(e)

    with serve_world(world) as base:
        thread = threading.Thread(target=client, args=(live_url(_first(truth, "timeout")["url"], base),))
        thread.start()
        time.sleep(0.3)  # let the request reach its handler (the assertion holds either way)
    thread.join(timeout=30)
    assert not thread.is_alive() and isinstance(outcome[0], Exception)


# ---------------------------------------------------------------- img2dataset against the live server


@pytest.mark.slow  # img2dataset spawns two processes that each import torch: 10-45 s here
def test_img2dataset_outcome_for_each_fault(world, truth, lists, tmp_path):
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    picks = [_first(truth, f) for f in FAULTS]
    picks.append(_first(truth, "exact_dup", list="general"))
    exact = _first(truth, "exact_dup")
    picks.append(next(g for g in truth if g["url"] == exact["dup_of_url"] and g["fault"] == "ok"))
    assert REFERENCE_DOWNLOAD_SETTINGS["timeout"] < SMALL.timeout_delay_s
    with serve_world(world) as base:
        rows = [{"url": live_url(g["url"], base), "caption": lists[g["list"]][g["row"]]["caption"], "pick": i}
                for i, g in enumerate(picks)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
        img2dataset.download(
            url_list=str(tmp_path / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
            output_format="webdataset", output_folder=str(tmp_path / "out"), processes_count=1, thread_count=8,
            compute_hash="sha256", save_additional_columns=["pick"], image_size=256, resize_mode="keep_ratio_largest",
            resize_only_if_bigger=True, enable_wandb=False, **REFERENCE_DOWNLOAD_SETTINGS,
        )
    results = {r["pick"]: r for r in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()}
    assert sorted(results) == list(range(len(picks)))
    for i, g in enumerate(picks):
        status, pattern = EXPECTED_DOWNLOAD_OUTCOME[g["fault"]]
        got = results[i]
        assert got["status"] == status, (g["fault"], got["status"], got["error_message"])
        if pattern is None:
            assert got["error_message"] is None, (g["fault"], got["error_message"])
        else:
            assert re.fullmatch(pattern, got["error_message"] or ""), (g["fault"], got["error_message"])
    sha = {picks[i]["url"]: r["sha256"] for i, r in results.items()}
    assert sha[exact["url"]] == sha[exact["dup_of_url"]] is not None
