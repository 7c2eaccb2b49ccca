"""The score stage in a real build: local image folders through img2dataset, embeddings of the download
tars by the tiny random scorer (written in the embeddings layout, as the embed stage does), then score,
decide and report. Random weights judge nothing, so this checks plumbing and consistency: every
proposal lands in the manifest in the declared order, planted eval copies are found, invariants and
the funnel's accounting hold, and a rerun is a no-op."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from plantmix.build import BuildContext, run_build
from plantmix.core.recipe import Recipe
from plantmix.core.schema import DROP_CLIP_SCORE_LOW, DROP_EVAL_OVERLAP, MODEL_DECISION_FIELDS
from plantmix.core.stage import run_stage
from plantmix.curate.decide import check_invariants
from plantmix.curate.model_steps import score_stage
from plantmix.curate.steps import decide_stage, report_stage
from plantmix.embed.scorer import load_scorer
from plantmix.embed.store import shard_files
from plantmix.report import funnel, make_console

sys.path.insert(0, str(Path(__file__).parent))
from scorer_fixtures import write_tiny_scorer  # noqa: E402

pytestmark = pytest.mark.slow
SPECIES = {"Quercus_robur": (40, 140, 40), "Acer_campestre": (120, 160, 30), "Betula_pendula": (60, 110, 80)}


def leaf(colour, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (160, 160), (235, 230, 215))
    d = ImageDraw.Draw(im)
    x, y = rng.integers(20, 50, 2)
    d.ellipse([int(x), int(y), int(x) + 90, int(y) + 60 + int(rng.integers(0, 40))], fill=colour)
    d.line([int(x), int(y) + 40, int(x) + 90, int(y) + 40], fill=(20, 60, 20), width=3)
    return im.rotate(int(rng.integers(0, 360)))


def scene(seed: int) -> Image.Image:
    rng = np.random.default_rng(1000 + seed)
    im = Image.new("RGB", (160, 120), tuple(int(v) for v in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x, y = rng.integers(0, 120, 2)
        d.rectangle([int(x), int(y), int(x) + 30, int(y) + 25], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def write_embeddings(build: Path, scorer) -> int:
    """Image and caption embeddings of every download tar, in plantmix.embed.store's layout."""
    count = 0
    for tar_path in sorted((build / "download").glob("*/*.tar")):
        images, captions, uids = [], [], []
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar if m.isreg()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                key = name[:-4]
                images.append(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB"))
                captions.append(tar.extractfile(members[key + ".txt"]).read().decode() if key + ".txt" in members else "")
                uids.append(json.loads(tar.extractfile(members[key + ".json"]).read())["uid"])
        files = shard_files(build / "embeddings" / tar_path.parent.name, tar_path.stem)
        for p in files.all():
            p.parent.mkdir(parents=True, exist_ok=True)
        np.save(files.image, scorer.encode_images(images).astype(np.float16))
        np.save(files.text, scorer.encode_text(captions).astype(np.float16))
        pq.write_table(pa.table({"uid": uids}), files.metadata)
        files.marker.write_text(json.dumps({"tar": tar_path.name, "rows": len(uids)}))
        count += len(uids)
    return count


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorebuild")
    for s, (name, colour) in enumerate(SPECIES.items()):
        (root / "plant" / name).mkdir(parents=True)
        for i in range(6):
            leaf(colour, 10 * s + i).save(root / "plant" / name / f"{i}.png")
    (root / "taxonomy.csv").write_text("folder,common_name,taxon_family\nQuercus_robur,English oak,Fagaceae\n")
    (root / "general").mkdir()
    for i in range(12):
        scene(i).save(root / "general" / f"g{i}.png")
        (root / "general" / f"g{i}.txt").write_text(f"a scene with coloured boxes number {i}")
    (root / "eval" / "c").mkdir(parents=True)
    (root / "eval" / "c" / "copy.png").write_bytes((root / "general" / "g3.png").read_bytes())  # exact copy
    leaf(SPECIES["Acer_campestre"], 12).resize((120, 120)).save(root / "eval" / "c" / "near.png")  # near copy of a plant
    model = write_tiny_scorer(root / "scorer")
    base = {
        "name": "scored", "seed": 0,
        "sources": [
            {"name": "plants", "domain": "plant", "format": "image_folder", "path": "plant", "taxonomy": "taxonomy.csv",
             "caption": "combined", "priority": 1},
            {"name": "web", "domain": "general", "format": "image_text_folder", "path": "general"},
        ],
        "download": {"processes_count": 1, "thread_count": 4, "image_size": 256},
    }  # fmt: skip
    model_sections = {
        "scorer": {"model": str(model), "batch_size": 16},
        "clip_score": {"top_fraction": {"general": 0.75}},
        "relevance": {"check": ["general"], "route": "move", "threshold": 0.5},
        "semantic_dedup": {"epsilon": 0.01, "clusters": 2, "report_epsilons": [0.001, 0.005, 0.02]},
        "decontaminate": {"eval_sets": ["eval"], "phash_radius": 10, "embedding_cosine": 0.9999},
    }
    build = root / "build"
    run_build(Recipe.model_validate(base), build, until="dedup", recipe_path=root / "recipe.yaml", console=make_console())
    recipe = Recipe.model_validate({**base, **model_sections})
    embedded = write_embeddings(build, load_scorer(recipe.scorer, root))
    with contextlib.ExitStack() as stack:
        ctx = BuildContext(recipe, build, root, None, make_console(), stack)
        results = [run_stage(s) for s in (score_stage(ctx), decide_stage(ctx), report_stage(ctx))]
        again = [run_stage(s).ran for s in (score_stage(ctx), decide_stage(ctx))]
    return build, recipe, embedded, results, again


def test_every_downloaded_row_is_scored_and_the_rerun_is_a_noop(built):
    build, _, embedded, results, again = built
    assert [r.ran for r in results] == [True, True, True] and again == [False, False]
    m = pq.read_table(build / "manifest.parquet")
    ok = pc.equal(m["status"], "success")
    assert embedded == pc.sum(ok).as_py() == 30
    for col in ("clip_score", "plant_score", "semantic_cluster"):
        assert m.filter(ok)[col].null_count == 0 and m.filter(pc.invert(ok))[col].null_count == m.num_rows - 30
    assert m.schema.names[-3:] == [f.name for f in MODEL_DECISION_FIELDS]


def test_proposals_land_in_the_manifest_in_the_declared_order(built):
    build, recipe, _, _, _ = built
    s = pq.read_table(build / "proposals" / "model_scores.parquet").to_pylist()
    m = pq.read_table(build / "manifest.parquet").to_pylist()
    assert [r["uid"] for r in s] == [r["uid"] for r in m]
    web = sorted((r["clip_score"] for r in s if r["clip_score"] is not None and r["uid"] in {x["uid"] for x in m if x["source"] == "web"}), reverse=True)
    threshold = web[int(np.ceil(0.75 * len(web))) - 1]
    for p, r in zip(s, m):
        if r["source"] == "web" and p["clip_score"] is not None:
            assert (p["clip_reason"] == DROP_CLIP_SCORE_LOW) == (p["clip_score"] < threshold)
        if p["eval_overlap"]:
            assert r["drop_reason"] == DROP_EVAL_OVERLAP and r["eval_overlap"] == "eval"
        elif p["clip_reason"] and r["drop_reason"] not in (None,) and not r["drop_reason"].startswith(("caption_", "image_", "aspect")):
            assert r["drop_reason"] == DROP_CLIP_SCORE_LOW
        if r["routed_from"]:
            assert p["route_to"] == "plant" and r["domain"] == "plant" and r["routed_from"] == "general" and not p["clip_reason"]
        elif p["route_to"]:
            assert r["domain"] == "general" and r["drop_reason"] is not None  # an earlier reason came first
    assert sum(1 for p in s if p["clip_reason"]) == 3  # ceil(0.75 · 12) = 9 of the 12 general rows stay


def test_planted_eval_copies_are_found(built):
    build, *_ = built
    exclude = pq.read_table(build / "reports" / "decontamination" / "exclude.parquet").to_pylist()
    m = {r["uid"]: r for r in pq.read_table(build / "manifest.parquet").to_pylist()}
    found = {(m[e["uid"]]["path"].rsplit("/", 2)[-2] + "/" + Path(m[e["uid"]]["path"]).name, e["match"], e["eval_file"]) for e in exclude}
    assert ("general/g3.png", "exact", "c/copy.png") in found
    assert ("Acer_campestre/2.png", "phash", "c/near.png") in found  # leaf seed 12: species 1, image 2
    assert all(f[1] != "embedding" or f[0] == "Acer_campestre/2.png" for f in found)  # cosine 0.9999: only these copies
    report = (build / "reports" / "decontamination" / "report.csv").read_text()
    assert '"eval"' in report.splitlines()[1]


def test_invariants_funnel_and_reports(built):
    build, recipe, *_ = built
    m = pq.read_table(build / "manifest.parquet")
    pairs = pq.read_table(build / "proposals" / "semantic_pairs.parquet")
    assert check_invariants(m, radius=recipe.dedup.phash_radius, semantic_pairs=pairs) == []
    f = funnel(m).to_pylist()
    for source in ("plants", "web"):
        rows = [r for r in f if r["source"] == source]
        assert sum(r["rows"] for r in rows if r["stage"] == "in") == sum(r["rows"] for r in rows if r["stage"] not in ("in", "flag"))
        assert {r["domain"] for r in rows} == {"plant" if source == "plants" else "general"}  # moved rows count at their source
    moved = pc.sum(pc.is_valid(m["routed_from"])).as_py()
    assert sum(r["rows"] for r in f if r["reason"] == "routed_to_plant") == moved
    for p in ("relevance/leakage.csv", "relevance/plant_scores.png", "semdedup/epsilon_sweep.csv", "semdedup/epsilon_sweep.png",
              "decontamination/report.csv", "funnel.csv"):
        assert (build / "reports" / p).is_file(), p
    sweep = (build / "reports" / "semdedup" / "epsilon_sweep.csv").read_text().splitlines()
    assert len(sweep) == 5  # header + the three report epsilons + the recipe's
    semantic = pc.sum(pc.equal(m["drop_reason"], "duplicate_semantic")).as_py() or 0
    assert pairs.num_rows > 0 and semantic > 0


def test_knn_relevance_scores_by_the_support_folders(built):
    """support_k: plant_score from the nearest plant and general support images (here the sources' own
    folders, so every row's nearest support image is itself); a missing folder is one error line."""
    from plantmix.curate.model_steps import model_proposals
    from plantmix.embed.store import read_embeddings

    build, recipe, _, _, _ = built
    root = build.parent
    relevance = {"support_dir": "plant", "general_support_dir": "general", "support_k": 3, "threshold": 0.5,
                 "check": ["plant", "general"]}
    knn = Recipe.model_validate({**recipe.model_dump(), "relevance": relevance})
    joined = pq.read_table(build / "stages" / "joined.parquet")
    emb = read_embeddings(build, text=False)
    scorer = load_scorer(knn.scorer, root)
    scores, _ = model_proposals(joined, emb, knn.model_copy(update={"clip_score": None, "semantic_dedup": None,
                                                                   "decontaminate": None}),
                                scorer, supports={"plant": root / "plant", "general": root / "general"})
    s = pa.table({"domain": joined["domain"], "plant_score": scores["plant_score"]}).filter(pc.is_valid(scores["plant_score"]))
    plant = s.filter(pc.equal(s["domain"], "plant"))["plant_score"].to_numpy()
    general = s.filter(pc.equal(s["domain"], "general"))["plant_score"].to_numpy()
    assert len(plant) and len(general) and plant.min() > 0.5 > general.max()
    assert scores["relevance_reason"].null_count == scores.num_rows  # each row sits in its own side's folder
    with contextlib.ExitStack() as stack:
        missing = knn.model_copy(update={"relevance": knn.relevance.model_copy(update={"general_support_dir": "nowhere"})})
        ctx = BuildContext(missing, build, root, None, make_console(), stack)
        with pytest.raises(Exception, match="relevance.general_support_dir: .*nowhere does not exist"):
            score_stage(ctx).inputs()
