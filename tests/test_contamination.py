"""Eval decontamination on real photographs (scikit-learn's sample photos and quarter crops): exact,
pHash (re-encoded, resized, mirrored, cropped) and embedding copies of eval images are all found, with
the right kind, and unrelated images are not; `plantmix contamination` on a manifest, and on a build
with its embeddings and with a scorer over its download tars; one error line for bad input."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance, ImageOps

from plantmix.core.errors import PlantmixError
from plantmix.core.hashing import hamming, phash_pair_bytes
from plantmix.core.recipe import ScorerConfig
from plantmix.curate.decontaminate import Pool, decontaminate, load_eval_set
from plantmix.embed.scorer import load_scorer
from plantmix.embed.store import shard_files

sys.path.insert(0, str(Path(__file__).parent))
from mixbuild import make_build  # noqa: E402
from scorer_fixtures import write_tiny_scorer  # noqa: E402
from test_mixlaw import one_error_line, run_cli  # noqa: E402

RADIUS = 10


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photos() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_images

    out = {}
    for name, pixels in zip(("china", "flower"), load_sample_images().images):
        image = Image.fromarray(pixels)
        w, h = image.size
        out[name] = image.resize((w // 2, h // 2))
        for i, box in enumerate([(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]):
            out[f"{name}-q{i}"] = image.crop(box).resize((w // 4, h // 4))
    return out


HASH_VARIANTS = {  # copies the hashes must find, with their kind
    "exact": ("exact", lambda im, data: data),
    "reencode_q60": ("phash", lambda im, data: jpeg(im, 60)),
    "resize_60": ("phash", lambda im, data: jpeg(im.resize((im.width * 3 // 5, im.height * 3 // 5)), 90)),
    "mirror": ("phash", lambda im, data: jpeg(ImageOps.mirror(im), 90)),
    "crop_2pct": ("phash", lambda im, data: jpeg(im.crop((im.width // 50, im.height // 50, im.width - im.width // 50,
                                                          im.height - im.height // 50)), 90)),  # fmt: skip
    "brighter": ("phash", lambda im, data: jpeg(ImageEnhance.Brightness(im).enhance(1.2), 90)),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An eval set of 6 photos in class folders (the others stay out of it), and a pool of rows: every
    hash variant of every eval photo, a heavy crop + rotation of each (beyond the pHash radius: an
    embedding copy), and the other photos, unrelated."""
    root = tmp_path_factory.mktemp("contamination")
    images = photos()
    in_eval = ["china", "flower", "china-q0", "china-q3", "flower-q1", "flower-q2"]
    files = {}
    for name in in_eval:
        folder = root / "eval" / name.split("-")[0]
        folder.mkdir(parents=True, exist_ok=True)
        data = jpeg(images[name])
        (folder / f"{name}.jpg").write_bytes(data)
        files[name] = (f"{name.split('-')[0]}/{name}.jpg", data)
    rows = []  # (uid, bytes, expected kind or None, expected eval file)
    for name in in_eval:
        image, (rel, data) = images[name], files[name]
        for variant, (kind, make) in HASH_VARIANTS.items():
            rows.append((f"{name}.{variant}", make(image, data), kind, rel))
        w, h = image.size
        heavy = image.crop((w // 4, h // 4, w, h)).rotate(25)  # far in pHash: only the embedding sees it
        rows.append((f"{name}.heavy", jpeg(heavy), "embedding", rel))
    for name in sorted(set(images) - set(in_eval)):
        rows.append((f"{name}.unrelated", jpeg(images[name]), None, None))
    return root, rows


def pool_of(rows, eval_embedding: dict[str, np.ndarray] | None = None, d: int = 64) -> Pool:
    """Hashes of the rows' bytes as the build records them; embeddings planted: a heavy copy gets its
    eval image's embedding plus noise (cosine ≈ 0.99), every other row a random direction."""
    rng = np.random.default_rng(0)
    sha = [hashlib.sha256(data).hexdigest() for _, data, _, _ in rows]
    ph = np.array([phash_pair_bytes(data)[0] for _, data, _, _ in rows], np.uint64)
    pool = Pool(pa.array([u for u, *_ in rows]), pa.array(sha), ph, np.ones(len(rows), bool))
    if eval_embedding is not None:
        vectors = rng.normal(size=(len(rows), d)).astype(np.float32)
        for i, (uid, _, kind, rel) in enumerate(rows):
            if kind == "embedding":
                vectors[i] = eval_embedding[rel] + 0.1 * vectors[i] / np.linalg.norm(vectors[i]) * 0.8
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        pool.embedded, pool.embedding = np.arange(len(rows)), vectors.astype(np.float16)
    return pool


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return load_scorer(ScorerConfig(model=str(write_tiny_scorer(tmp_path_factory.mktemp("scorer")))))


def test_every_copy_is_found_with_its_kind_and_nothing_else(world, scorer):
    root, rows = world
    es = load_eval_set(root / "eval", "eval", scorer)
    assert len(es.files) == 6 and es.decoded.all() and es.embedding.shape == (6, 64)
    for uid, data, kind, rel in rows:  # the planted cases are what they claim to be
        if kind in ("embedding", None):
            far = hamming(np.uint64(phash_pair_bytes(data)[0]), np.r_[es.phash, es.mirror]).min()
            assert far > RADIUS, (uid, far)
    pool = pool_of(rows, dict(zip(es.files, es.embedding)))
    exclude, per_row, report = decontaminate(pool, [es], RADIUS, 0.95)
    got = {u: (m, f) for u, m, f in zip(*(exclude[c].to_pylist() for c in ("uid", "match", "eval_file")))}
    want = {uid: (kind, rel) for uid, _, kind, rel in rows if kind}
    assert got == want  # recall 100 %, the right kind and file, and no unrelated row
    assert per_row["eval_overlap"].to_pylist() == ["eval" if kind else None for _, _, kind, _ in rows]
    [r] = report
    assert r == {"eval_set": "eval", "path": str(root / "eval"), "eval_images": 6, "undecodable": 0, "rows_matched": len(want),
                 "exact": 6, "phash": 30, "embedding": 6, "eval_images_matched": 6}  # fmt: skip


def test_hashes_only_and_precedence_across_eval_sets(world, tmp_path):
    root, rows = world
    es = load_eval_set(root / "eval", "eval")
    assert es.embedding is None
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "x.jpg").write_bytes(rows[0][1])  # the first row's bytes: in both sets
    (tmp_path / "second" / "broken.jpg").write_bytes(b"not an image")
    second = load_eval_set(tmp_path / "second", "second")
    exclude, per_row, report = decontaminate(pool_of(rows), [es, second], RADIUS, None)
    kinds = [m for m in exclude.filter(pa.compute.equal(exclude["eval_set"], "eval"))["match"].to_pylist()]
    assert kinds.count("exact") == 6 and kinds.count("phash") == 30 and "embedding" not in kinds
    assert exclude.filter(pa.compute.equal(exclude["eval_set"], "second"))["uid"].to_pylist()[:1] == [rows[0][0]]
    assert per_row["eval_overlap"][0].as_py() == "eval"  # the first set that matches names the row
    assert report[1]["undecodable"] == 1 and report[1]["eval_images"] == 2
    with pytest.raises(PlantmixError, match="distinct folder names"):
        decontaminate(pool_of(rows), [es, es], RADIUS, None)


def test_missing_or_empty_eval_set_is_one_error(tmp_path):
    with pytest.raises(PlantmixError, match="does not exist") as e:
        load_eval_set(tmp_path / "nowhere", "nowhere")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlantmixError, match="holds no images"):
        load_eval_set(tmp_path / "empty", "empty")


def test_cli_on_a_manifest_file_hashes_only(world, tmp_path, capsys, monkeypatch):
    root, rows = world
    pool = pool_of(rows)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uid": pool.uid, "sha256": pool.sha256, "phash": pa.array(pool.phash, pa.uint64())}), manifest)
    code, _, err = run_cli(["contamination", manifest, "--against", root / "eval", "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code in (0, None), err
    exclude = pq.read_table(tmp_path / "out" / "exclude.parquet")
    assert sorted(exclude["match"].to_pylist()) == ["exact"] * 6 + ["phash"] * 30
    report = (tmp_path / "out" / "report.csv").read_text()
    assert report.splitlines()[0].startswith('"eval_set","path","eval_images"') and "exact 6, pHash 30, embedding 0" in err
    code, _, err = run_cli(["contamination", manifest, "--against", tmp_path / "missing", "--out", tmp_path / "o2"], capsys, monkeypatch)
    one_error_line(code, err, "does not exist")
    code, _, err = run_cli(["contamination", tmp_path, "--against", root / "eval", "--out", tmp_path / "o3"], capsys, monkeypatch)
    one_error_line(code, err, "no manifest.parquet")
    code, _, err = run_cli(["contamination", manifest, "--against", root / "eval", "--scorer", "open_clip:nothing", "--out",
                            tmp_path / "o4"], capsys, monkeypatch)  # fmt: skip
    one_error_line(code, err, "scorer.model")


def test_cli_on_a_build_with_embeddings_or_a_scorer_over_its_tars(tmp_path, scorer, capsys, monkeypatch):
    """A build's own embeddings (its lock names the scorer), and a scorer given on the command line: then
    the rows are encoded from the download tars, exactly as the scorer encodes the images itself."""
    import tarfile

    build = make_build(tmp_path / "b", rows={"plant_a": 40, "web": 20}, per_tar=20)
    m = pq.read_table(build / "manifest.parquet")
    ok = [r for r in m.to_pylist() if r["status"] == "success"]
    data = {}
    for tar_name in sorted({r["shard"] for r in ok}):
        with tarfile.open(build / tar_name) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    data[(tar_name, member.name[:-4])] = tar.extractfile(member).read()
    rows = [(r, data[r["shard"], r["key"]]) for r in ok]
    images = [Image.open(io.BytesIO(b)).convert("RGB") for _, b in rows]
    vectors = scorer.encode_images(images)
    (tmp_path / "eval" / "c").mkdir(parents=True)
    # an exact copy, and the 5th row's image at 8x: sha256 differs, and the pHash radius is 0
    (tmp_path / "eval" / "c" / "exact.jpg").write_bytes(rows[0][1])
    images[4].resize((128, 128), Image.NEAREST).save(tmp_path / "eval" / "c" / "big.png")
    # the build's own embeddings: row 10 planted as the big eval image's embedding (the model of the lock)
    big = scorer.encode_images([Image.open(tmp_path / "eval" / "c" / "big.png")])[0]
    planted = vectors.copy()
    planted[4] = -planted[4]  # the build's embedding of row 4 no longer matches it ...
    planted[10] = big  # ... but row 10's does
    folder = build / "embeddings" / "plant_a"
    files = shard_files(folder, "00000")
    for p in files.all():
        p.parent.mkdir(parents=True, exist_ok=True)
    np.save(files.image, planted.astype(np.float16))
    np.save(files.text, planted.astype(np.float16))
    pq.write_table(pa.table({"uid": [r["uid"] for r, _ in rows]}), files.metadata)
    files.marker.write_text(json.dumps({"key": "test"}))
    model = str(scorer.spec.weights).rsplit("/", 1)[0]
    (build / "recipe.lock.yaml").write_text(json.dumps({"recipe": {"scorer": {"model": model}}}))
    args = ["contamination", build, "--against", tmp_path / "eval", "--phash-radius", "0", "--embedding-cosine", "0.999"]
    code, _, err = run_cli([*args, "--out", tmp_path / "o1"], capsys, monkeypatch)
    assert code in (0, None), err
    got = {u: k for u, k in zip(*(pq.read_table(tmp_path / "o1" / "exclude.parquet")[c].to_pylist() for c in ("uid", "match")))}
    assert got[rows[0][0]["uid"]] == "exact" and got[rows[10][0]["uid"]] == "embedding" and rows[4][0]["uid"] not in got
    # a scorer on the command line that the lock does not name: rows encoded from the tars
    other = tmp_path / "copy_of_scorer"
    import shutil

    shutil.copytree(model, other)
    code, _, err = run_cli([*args, "--scorer", str(other), "--out", tmp_path / "o2"], capsys, monkeypatch)
    assert code in (0, None), err
    got = {u: k for u, k in zip(*(pq.read_table(tmp_path / "o2" / "exclude.parquet")[c].to_pylist() for c in ("uid", "match")))}
    assert got[rows[0][0]["uid"]] == "exact"
    assert got[rows[4][0]["uid"]] in ("phash", "embedding")  # its own pixels again
    assert rows[10][0]["uid"] not in got
