"""`plantmix mine` on a small real build: the URL list's format and scores, image queries, a recipe
reading the list, the CLI's help and errors."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedbuild import copy_build, plantmix, shared_build
from plantmix.core.recipe import RelevanceConfig, ScorerConfig
from plantmix.core.schema import TAXON_COLUMNS
from plantmix.embed.mine import mine, plant_prompts
from plantmix.embed.scorer import load_scorer
from plantmix.embed.store import normalise, read_embeddings

pytestmark = pytest.mark.slow
COLUMNS = ["url", "caption", "uid", "mined_from", "mine_score", "query", *TAXON_COLUMNS, "common_name", "taxon_from"]
POOL = "demo_general"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return copy_build(shared_build(tmp_path_factory), tmp_path_factory.mktemp("mine") / "b")


def scorer(build: Path):
    import json

    record = json.loads((build / "embeddings" / "scorer.json").read_text())
    return load_scorer(ScorerConfig.model_validate({**record["scorer"], "model": record["model"]}))


def test_plant_prompts_url_list_format_and_scores(build, tmp_path):
    emb = read_embeddings(build, [POOL])
    n = len(emb)
    t = mine(build, POOL, "plant-prompts", k=n, min_score=-1, out=tmp_path / "all.parquet")
    assert t.column_names == COLUMNS and pq.read_table(tmp_path / "all.parquet").equals(t)
    # k = pool size and no threshold: every pool image, at its best cosine over all prompts
    assert sorted(t["uid"].to_pylist()) == sorted(emb.uid.to_pylist())
    cand = pq.read_table(build / "candidates.parquet")
    texts, taxa = plant_prompts(cand, None)
    assert texts[: len(RelevanceConfig().plant_prompts)] == RelevanceConfig().plant_prompts
    species = {s for s in cand["taxon_species"].to_pylist() if s}
    assert species and all(any(s in x for x in texts) for s in species)
    sims = emb.image.astype(np.float32) @ scorer(build).encode_text(texts).T
    row = {u: i for i, u in enumerate(emb.uid.to_pylist())}
    for r in t.to_pylist():
        assert r["mined_from"] == POOL and r["url"].startswith("http://")
        assert r["mine_score"] == pytest.approx(sims[row[r["uid"]]].max(), abs=2e-3)
        assert r["mine_score"] == pytest.approx(sims[row[r["uid"]], texts.index(r["query"])], abs=2e-3)
        taxon = taxa.slice(texts.index(r["query"]), 1).to_pylist()[0]
        assert r["taxon_species"] == taxon["taxon_species"]  # a general pool row has no taxon of its own
        assert r["taxon_from"] == ("query" if taxon["taxon_species"] else None)
    scores = t["mine_score"].to_pylist()
    assert scores == sorted(scores, reverse=True)

    cut = float(np.median(scores))
    kept = mine(build, POOL, "plant-prompts", k=n, min_score=cut, out=tmp_path / "cut.parquet")
    assert kept["uid"].to_pylist() == [r["uid"] for r in t.to_pylist() if r["mine_score"] >= cut]
    few = mine(build, POOL, "plant-prompts", k=1, min_score=-1, out=tmp_path / "k1.parquet")
    assert 1 <= few.num_rows <= len(texts)


def test_image_queries_find_their_own_rows(build, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    tar = sorted((build / "download" / POOL).glob("*.tar"))[0]
    with tarfile.open(tar) as t:
        jpgs = [m for m in t if m.name.endswith(".jpg")][:3]
        for m in jpgs:
            (queries / m.name).write_bytes(t.extractfile(m).read())
    got = mine(build, POOL, str(queries), k=3, min_score=0.999, out=tmp_path / "img.parquet").to_pylist()
    meta = pq.read_table(build / "embeddings" / POOL / "metadata" / f"metadata_{tar.stem}.parquet").to_pylist()
    uid_of = {r["image_path"]: r["uid"] for r in meta}
    for m in jpgs:
        mine_row = next(r for r in got if r["uid"] == uid_of[m.name.split(".")[0]])
        assert mine_row["mine_score"] >= 0.999 and mine_row["query"].endswith(".jpg")


def test_mean_combine_ranks_the_pool_by_the_mean_query(build, tmp_path):
    emb = read_embeddings(build, [POOL])
    texts, _ = plant_prompts(pq.read_table(build / "candidates.parquet"), None)
    centroid = scorer(build).encode_text(texts).mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    t = mine(build, POOL, "plant-prompts", k=len(emb), min_score=-1, out=tmp_path / "mean.parquet", combine="mean")
    cos = dict(zip(emb.uid.to_pylist(), normalise(emb.image) @ centroid))
    assert t.num_rows == len(emb) and set(t["query"].to_pylist()) == {f"mean of {len(texts)} queries"}
    np.testing.assert_allclose(t["mine_score"].to_numpy(), [cos[u] for u in t["uid"].to_pylist()], atol=2e-3)
    assert t["taxon_from"].null_count == sum(r is None for r in t["taxon_species"].to_pylist())  # no query taxon


def test_a_recipe_ingests_the_mined_list(build, tmp_path):
    from plantmix.build import run_build
    from plantmix.core.recipe import load_recipe

    mined = mine(build, POOL, "plant-prompts", k=5, min_score=-1, out=tmp_path / "mined.parquet")
    (tmp_path / "recipe.yaml").write_text(
        "name: mined\nsources:\n  - name: mined\n    domain: plant\n    format: url_list\n    path: mined.parquet\n"
    )
    run_build(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", until="ingest", recipe_path=tmp_path / "recipe.yaml")
    cand = pq.read_table(tmp_path / "out" / "candidates.parquet")
    assert cand.num_rows == mined.num_rows
    by_url = {r["url"]: r for r in cand.to_pylist()}
    for r in mined.to_pylist():
        c = by_url[r["url"]]
        assert c["caption"] == r["caption"] and c["taxon_species"] == r["taxon_species"] and c["domain"] == "plant"


def test_cli_help_and_one_line_errors(build, tmp_path):
    help_text = plantmix("mine", "--help", cwd=tmp_path).stdout
    for option in ("--pool", "--queries", "--k", "--min-score", "--out", "--scorer", "--combine"):
        assert option in help_text
    for args, words in (
        (["--pool", "nowhere"], "holds no embeddings"),
        (["--pool", POOL, "--scorer", str(tmp_path / "missing")], "scorer.model"),
        (["--pool", POOL, "--queries", str(tmp_path / "no_such_dir")], "neither plant-prompts nor an image folder"),
        (["--pool", POOL, "--combine", "median"], "--combine must be one of best, mean"),
    ):
        p = plantmix("mine", str(build), *args, "--out", str(tmp_path / "x.parquet"), cwd=tmp_path, check=False)
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        assert p.returncode == 2 and lines[-1].startswith("error:") and words in lines[-1], p.stderr[-1500:]
