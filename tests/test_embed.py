"""The embed stage on a small real build (demo world, img2dataset tars, random tiny dalip scorer):
layout, agreement with the in-process scorer, clip-retrieval index + kNN service on the folder as it
is, reruns (skip / changed / removed tars, changed scorer), SIGKILL and resume, pyspark, fallback."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from braceexpand import braceexpand

from embedbuild import copy_build, shared_build
from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import ScorerConfig
from plantmix.core.stage import remove_stale_temporaries
from plantmix.embed.infer import TarJob, _brace, _groups, choose_engine, embed_sources, tar_keys
from plantmix.embed.scorer import load_scorer, parse_model, register
from plantmix.embed.store import finished_shards, read_embeddings, shard_files, source_dir
from scorer_fixtures import write_tiny_scorer

SOURCES = ["demo_plant", "demo_general"]
F16_ATOL = 2e-3  # float16 keeps ~3 decimal digits: |x| ≤ 1 rounds within 4.9e-4; two engines may differ by a few ulps


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return shared_build(tmp_path_factory)


def scorer_cfg(build: Path) -> ScorerConfig:
    """The build's scorer as recorded by the embed stage (absolute model name)."""
    record = json.loads((build / "embeddings" / "scorer.json").read_text())
    return ScorerConfig.model_validate({**record["scorer"], "model": record["model"]})


def arrays(build: Path, sources: list[str] = SOURCES) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, list]]:
    out = {}
    for source in sources:
        folder = source_dir(build, source)
        for shard in finished_shards(folder):
            f = shard_files(folder, shard)
            out[source, shard] = (np.load(f.image), np.load(f.text), pq.read_table(f.metadata)["uid"].to_pylist())
    return out


def tars(build: Path, source: str) -> list[Path]:
    return sorted((build / "download" / source).glob("*.tar"))


# ---- unit ---------------------------------------------------------------------------------------------


def test_brace_pattern_names_exactly_the_paths():
    paths = ["/a/b/00000.tar", "/we{ird},dir/00001.tar", "/x/{00..02}.tar"]
    assert list(braceexpand(_brace(paths))) == paths
    assert list(braceexpand(_brace(paths[1:2]))) == paths[1:2]
    with pytest.raises(PlantmixError, match="brace pattern"):
        _brace(["/back\\slash/00000.tar"])


def test_groups_never_mix_sources():
    jobs = [TarJob(s, str(i), Path(f"{s}/{i}.tar"), Path(s), "", ()) for s, n in (("a", 3), ("b", 2)) for i in range(n)]
    assert [[(j.source, j.shard) for j in g] for g in _groups(jobs, 2)] == [
        [("a", "0"), ("a", "1")], [("a", "2")], [("b", "0"), ("b", "1")]]  # fmt: skip


def test_engine_choice_on_this_machine():
    import torch

    if torch.cuda.is_available():
        assert choose_engine(ScorerConfig(model="x", device="cpu"))[0] == "open_clip"
    else:
        assert choose_engine(ScorerConfig(model="x", device="cpu", precision="fp16")) == ("clip-retrieval", None)
        with pytest.raises(PlantmixError, match="no CUDA device"):
            choose_engine(ScorerConfig(model="x", device="cuda"))


# ---- on the build -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_triple_per_tar_every_stored_sample_accounted(build):
    cand = pq.read_table(build / "candidates.parquet", columns=["uid"])["uid"].to_pylist()
    total = 0
    for source in SOURCES:
        folder = source_dir(build, source)
        shard_names = [t.stem for t in tars(build, source)]
        assert shard_names and finished_shards(folder) == shard_names
        for tar in tars(build, source):
            f = shard_files(folder, tar.stem)
            image, text = np.load(f.image), np.load(f.text)
            meta = pq.read_table(f.metadata)
            marker = json.loads(f.marker.read_text())
            assert image.dtype == text.dtype == np.float16 and image.shape == text.shape and image.shape[0] == meta.num_rows
            np.testing.assert_allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1, atol=2e-3)
            np.testing.assert_allclose(np.linalg.norm(text.astype(np.float32), axis=1), 1, atol=2e-3)
            assert {"uid", "image_path", "caption"} <= set(meta.column_names)
            assert meta["image_path"].to_pylist() == meta["key"].to_pylist()
            # every stored sample is embedded or named in the marker: none lost silently
            keys = tar_keys(tar, "jpg")
            assert sorted(meta["image_path"].to_pylist() + marker["not_embedded"]) == sorted(keys)
            assert marker["rows"] == meta.num_rows and marker["engine"] == "clip-retrieval"
            total += meta.num_rows
    emb = read_embeddings(build)
    assert len(emb) == total > 0
    assert len(set(emb.uid.to_pylist())) == total and set(emb.uid.to_pylist()) <= set(cand)


@pytest.mark.slow
def test_embeddings_equal_the_scorer_on_the_stored_images(build):
    from PIL import Image

    scorer = load_scorer(scorer_cfg(build))
    for tar in tars(build, "demo_plant")[:2]:
        f = shard_files(source_dir(build, "demo_plant"), tar.stem)
        meta = pq.read_table(f.metadata).to_pylist()
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t if m.isreg()}
        images = [Image.open(io.BytesIO(members[f"{r['image_path']}.jpg"])) for r in meta]
        captions = [members[f"{r['image_path']}.txt"].decode() for r in meta]
        assert captions == [r["caption"] for r in meta]
        np.testing.assert_allclose(np.load(f.image).astype(np.float32), scorer.encode_images(images), atol=F16_ATOL)
        np.testing.assert_allclose(np.load(f.text).astype(np.float32), scorer.encode_text(captions), atol=F16_ATOL)


@pytest.mark.slow
def test_clip_retrieval_index_and_knn_service_read_the_folder_as_it_is(build, tmp_path):
    from clip_retrieval.clip_back import ClipOptions, KnnService, load_clip_index

    folder = source_dir(build, "demo_general")
    index = tmp_path / "index"
    cli = Path(sys.executable).with_name("clip-retrieval")
    p = subprocess.run([str(cli), "index", "--embeddings_folder", str(folder), "--index_folder", str(index)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert (index / "image.index").is_file() and (index / "text.index").is_file()

    cfg = scorer_cfg(build)
    spec = parse_model(cfg.model)
    register(spec)  # clip_back loads the model through all_clip in this process
    options = ClipOptions(
        indice_folder=str(index), clip_model=spec.clip_retrieval_model, enable_hdf5=False, enable_faiss_memory_mapping=False,
        columns_to_return=["uid", "image_path", "caption"], reorder_metadata_by_ivf_index=False, enable_mclip_option=False,
        use_jit=False, use_arrow=False, provide_safety_model=False, provide_violence_detector=False,
        provide_aesthetic_embeddings=False,
    )  # fmt: skip
    knn = KnnService(clip_resources={"pool": load_clip_index(options)})
    emb = read_embeddings(build, ["demo_general"])
    uids = emb.uid.to_pylist()
    x = emb.image.astype(np.float32)
    for i in range(0, len(uids), 3):
        # the row itself and its exact copies (the demo world plants some) come first, in any order
        twins = {uids[j] for j in np.flatnonzero(x @ x[i] >= 1 - 1e-3)}
        hits = knn.query(embedding_input=x[i].tolist(), modality="image", num_images=len(twins) + 2, indice_name="pool", deduplicate=False)
        assert {h["uid"] for h in hits[: len(twins)]} == twins and uids[i] in twins
        assert hits[0]["similarity"] == pytest.approx(1, abs=2e-3) and hits[len(twins)]["similarity"] < 1 - 1e-3
    # a caption typed as text goes through clip-retrieval's own model loading and finds its row
    meta = [r for s in finished_shards(folder) for r in pq.read_table(shard_files(folder, s).metadata).to_pylist()]
    caption = next(r["caption"] for r in meta if sum(m["caption"] == r["caption"] for m in meta) == 1)
    hits = knn.query(text_input=caption, modality="text", num_images=1, indice_name="pool", deduplicate=False)
    assert hits[0]["caption"] == caption and hits[0]["similarity"] == pytest.approx(1, abs=2e-3)


def _drop_last_sample(tar: Path) -> None:
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t if m.isreg()]
    last = members[-1][0].name.split(".")[0]
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            if m.name.split(".")[0] != last:
                t.addfile(m, io.BytesIO(data))


@pytest.mark.slow
def test_rerun_skips_redoes_changed_removes_gone_and_a_new_scorer_redoes_all(build, tmp_path):
    copy = copy_build(build, tmp_path / "b")
    cfg = scorer_cfg(build)
    n_tars = sum(len(tars(build, s)) for s in SOURCES)
    s = embed_sources(copy, SOURCES, cfg)
    assert (s.tars, s.skipped, s.embedded, s.removed, s.did_work) == (n_tars, n_tars, 0, 0, False)

    plant, general = tars(copy, "demo_plant"), tars(copy, "demo_general")
    before = arrays(copy)
    untouched = shard_files(source_dir(copy, "demo_plant"), plant[1].stem).image.stat().st_mtime_ns
    _drop_last_sample(plant[0])
    general[-1].unlink()
    tarfile.open(copy / "download" / "demo_general" / "00099.tar", "w").close()  # a shard whose every sample failed
    s = embed_sources(copy, SOURCES, cfg)
    assert (s.embedded, s.removed, s.skipped) == (2, 1, n_tars - 2)
    after = arrays(copy)
    assert after["demo_plant", plant[0].stem][2] == before["demo_plant", plant[0].stem][2][:-1]
    np.testing.assert_array_equal(after["demo_plant", plant[0].stem][0], before["demo_plant", plant[0].stem][0][:-1])
    gone = shard_files(source_dir(copy, "demo_general"), general[-1].stem)
    assert not any(p.exists() for p in gone.all())
    assert after["demo_general", "00099"][0].shape == (0, before["demo_plant", plant[1].stem][0].shape[1])
    assert shard_files(source_dir(copy, "demo_plant"), plant[1].stem).image.stat().st_mtime_ns == untouched

    other = write_tiny_scorer(tmp_path / "scorer2", seed=1)
    s = embed_sources(copy, SOURCES, cfg.model_copy(update={"model": str(other)}))
    assert s.embedded == n_tars and s.skipped == 0
    redone = arrays(copy)
    key = ("demo_plant", plant[1].stem)
    assert redone[key][2] == after[key][2] and not np.allclose(redone[key][0], after[key][0], atol=0.05)


_EMBED_SCRIPT = """
import json, sys
from plantmix.core.recipe import ScorerConfig
from plantmix.embed.infer import embed_sources
cfg = ScorerConfig.model_validate(json.loads(sys.argv[2]))
embed_sources(sys.argv[1], ["demo_plant", "demo_general"], cfg)
"""


@pytest.mark.slow
def test_sigkill_mid_embed_then_rerun_gives_identical_embeddings(build, tmp_path):
    copy = copy_build(build, tmp_path / "b")
    shutil.rmtree(copy / "embeddings")
    cfg = scorer_cfg(build)
    cmd = [sys.executable, "-c", _EMBED_SCRIPT, str(copy), json.dumps(cfg.model_dump(mode="json"))]
    # SIGKILL just before shard 00001's marker is renamed into place: its data files are in the layout
    env = {**os.environ, "PLANTMIX_KILL_AT": "00001.done.json"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    plant = source_dir(copy, "demo_plant")
    assert "00001" not in finished_shards(plant) and shard_files(plant, "00001").image.exists()
    assert remove_stale_temporaries(copy) >= 1  # the killed run's work folder and marker temporary

    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    ref, got = arrays(build), arrays(copy)
    assert ref.keys() == got.keys()
    for k in ref:  # same batches through the same model on CPU: bit-identical
        np.testing.assert_array_equal(got[k][0], ref[k][0])
        np.testing.assert_array_equal(got[k][1], ref[k][1])
        assert got[k][2] == ref[k][2]


@pytest.mark.slow
def test_pyspark_distributor_gives_the_sequential_embeddings(build, tmp_path):
    copy = copy_build(build, tmp_path / "b")
    shutil.rmtree(copy / "embeddings")
    # dalip-tiny is not a stock open_clip architecture: the Spark workers must register it themselves.
    # One source: each Spark task pays a Python worker start and model load, and one source shows it all.
    one = SOURCES[:1]
    s = embed_sources(copy, one, scorer_cfg(build), distributor="pyspark", workers=2)
    assert s.embedded == len(tars(build, one[0])) > 1
    ref, got = arrays(build, one), arrays(copy, one)
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k][2] == ref[k][2]
        np.testing.assert_allclose(got[k][0].astype(np.float32), ref[k][0].astype(np.float32), atol=F16_ATOL)
        np.testing.assert_allclose(got[k][1].astype(np.float32), ref[k][1].astype(np.float32), atol=F16_ATOL)


@pytest.mark.slow
def test_open_clip_fallback_writes_the_same_layout_and_values(build, tmp_path):
    copy = copy_build(build, tmp_path / "b")
    shutil.rmtree(copy / "embeddings")
    s = embed_sources(copy, SOURCES, scorer_cfg(build), engine="open_clip")
    assert s.engine == "open_clip" and s.embedded == sum(len(tars(build, x)) for x in SOURCES)
    ref, got = arrays(build), arrays(copy)
    for k in ref:
        assert got[k][2] == ref[k][2]
        np.testing.assert_allclose(got[k][0].astype(np.float32), ref[k][0].astype(np.float32), atol=F16_ATOL)
        np.testing.assert_allclose(got[k][1].astype(np.float32), ref[k][1].astype(np.float32), atol=F16_ATOL)
    meta = shard_files(source_dir(copy, "demo_plant"), "00000").metadata
    ref_meta = shard_files(source_dir(build, "demo_plant"), "00000").metadata
    assert pq.read_table(meta).column_names == pq.read_table(ref_meta).column_names


@pytest.mark.slow
def test_unloadable_scorer_is_one_error_line(build, tmp_path):
    copy = copy_build(build, tmp_path / "b")
    shutil.rmtree(copy / "embeddings")
    bad = write_tiny_scorer(tmp_path / "bad")
    (bad / "open_clip_model.safetensors").write_bytes(b"not a safetensors file")
    for engine in ("clip-retrieval", "open_clip"):
        with pytest.raises(PlantmixError) as e:
            embed_sources(copy, SOURCES, ScorerConfig(model=str(bad)), engine=engine)
        assert "cannot load" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PlantmixError, match="export directory lacks"):
        (bad / "dalip-tiny.json").unlink()
        embed_sources(copy, SOURCES, ScorerConfig(model=str(bad)))
