"""Model-based proposals (CLIP score, plant relevance and routing, SemDeDup) on synthetic embeddings with
planted cases, and their place in the decision step: the row-level order, routing, semantic groups
against a brute-force reference (the dedup reference of tests/test_dedup.py plus the semantic step
written out the slow obvious way), invariants, and a model-free run that changes nothing."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import ClipScoreConfig, DedupConfig, RelevanceConfig, load_recipe
from plantmix.core.schema import (
    DROP_CLIP_SCORE_LOW, DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR, DROP_DUPLICATE_SEMANTIC, DROP_EVAL_OVERLAP,
    DROP_HELD_OUT, DROP_NOT_A_PLANT, DROP_PLANT_IN_GENERAL, MODEL_DECISION_FIELDS,
)  # fmt: skip
from plantmix.curate.clip_score import clip_low, clip_scores, domain_thresholds, top_fraction_threshold
from plantmix.curate.decide import ModelProposals, check_invariants, decide
from plantmix.curate.model_steps import MODEL_SCORE_SCHEMA
from plantmix.curate.relevance import knn_plant_scores, plant_clusters, plant_scores, relevance_reasons, taxon_prompts
from plantmix.curate.semdedup import SEMANTIC_PAIR_SCHEMA, epsilon_sweep, kmeans, pair_table, semantic_pairs

sys.path.insert(0, str(Path(__file__).parent))
from test_dedup import (  # noqa: E402
    PRIORITY, TOO_SHORT, TOO_SMALL, _bits, filter_table, full, proposals, random_rows, ref_rank, reference, row, table,
)  # fmt: skip


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def basis(d: int, *i: int) -> np.ndarray:
    x = np.zeros((len(i), d), np.float32)
    x[np.arange(len(i)), list(i)] = 1
    return x


# ---- CLIP score -------------------------------------------------------------------------------------------


def test_clip_score_is_the_cosine_and_min_applies_per_domain():
    d = 8
    angles = np.array([0.0, 60.0, 80.0, 85.0, 89.0, 30.0])  # cos 1, 0.5, 0.17, 0.087, 0.017, 0.87
    image = basis(d, *[0] * 6)
    text = np.stack([np.cos(np.radians(angles)), np.sin(np.radians(angles)), *np.zeros((d - 2, 6))], axis=1).astype(np.float16)
    scores = clip_scores(image.astype(np.float16), text)
    np.testing.assert_allclose(scores, np.cos(np.radians(angles)), atol=2e-3)
    domain = np.array(["plant", "plant", "plant", "general", "general", "general"], object)
    t = domain_thresholds(scores, domain, ClipScoreConfig(min={"plant": 0.3}))
    assert t == {"plant": 0.3, "general": None}
    assert clip_low(scores, domain, t).tolist() == [False, False, True, False, False, False]
    t = domain_thresholds(scores, domain, ClipScoreConfig(min={"plant": 0.3, "general": 0.05}))
    assert clip_low(scores, domain, t).tolist() == [False, False, True, False, True, False]


def test_top_fraction_gives_the_sorted_threshold():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-0.2, 0.6, 1000).astype(np.float32)
    domain = np.array(["general"] * 700 + ["plant"] * 300, object)
    t = domain_thresholds(scores, domain, ClipScoreConfig(top_fraction={"general": 0.3, "plant": 1.0}))
    assert t["general"] == float(np.sort(scores[:700])[::-1][math.ceil(0.3 * 700) - 1])
    assert t["plant"] == float(scores[700:].min())
    low = clip_low(scores, domain, t)
    assert (~low[:700]).sum() == 210 and not low[700:].any()  # distinct scores: exactly the top 30 % stay
    tied = np.array([0.5, 0.4, 0.4, 0.4, 0.1], np.float32)  # ties at the threshold all stay
    assert top_fraction_threshold(tied, 0.4) == pytest.approx(0.4)
    assert clip_low(tied, np.array(["plant"] * 5, object), {"plant": top_fraction_threshold(tied, 0.4)}).tolist() == [False] * 4 + [True]
    with_nan = np.array([np.nan, 0.2, 0.1], np.float32)  # unscored rows neither count nor drop
    assert top_fraction_threshold(with_nan, 0.5) == pytest.approx(0.2)
    assert clip_low(with_nan, np.array(["plant"] * 3, object), {"plant": 0.2}).tolist() == [False, False, True]


@pytest.mark.parametrize("fraction", [0, 1.5, -0.1])
def test_top_fraction_outside_zero_one_is_one_error_line(tmp_path, fraction):
    recipe = {"name": "r", "sources": [{"name": "s", "domain": "plant", "format": "image_folder", "path": "x"}],
              "scorer": {"model": "m"}, "clip_score": {"top_fraction": {"plant": fraction}}}  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(PlantmixError) as e:
        load_recipe(path)
    assert "\n" not in str(e.value) and "clip_score" in str(e.value) and "must lie in (0, 1]" in str(e.value)


def test_model_sections_need_a_scorer_and_demo_folders_need_a_world(tmp_path):
    base = {"name": "r", "sources": [{"name": "s", "domain": "plant", "format": "image_folder", "path": "x"}]}
    for extra, needle in (({"semantic_dedup": {}}, r"need\(s\) a scorer"),
                          ({"decontaminate": {"eval_sets": ["{demo}/heldout"], "embedding_cosine": None}}, "no demo_world")):  # fmt: skip
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({**base, **extra}))
        with pytest.raises(PlantmixError, match=needle):
            load_recipe(path)


# ---- plant relevance ---------------------------------------------------------------------------------------


def test_plant_score_is_the_two_set_softmax():
    d = 6
    plant, general = basis(d, 0, 1), basis(d, 2)
    half = np.array([[1, 0, 1, 0, 0, 0]], np.float32) / np.sqrt(2)
    x = np.concatenate([basis(d, 0), basis(d, 1), basis(d, 2), half, basis(d, 5)])
    s = plant_scores(x, plant, general, 0.01)
    assert s[0] == s[1] == pytest.approx(1.0) and s[2] == pytest.approx(0.0, abs=1e-6)
    assert s[3] == pytest.approx(0.5) and s[4] == pytest.approx(0.5)  # equidistant: undecided
    tilt = np.array([[0.6, 0, 0.5, 0, 0, 0]], np.float32)
    tilt /= np.linalg.norm(tilt)
    margin = (tilt[0, 0] - tilt[0, 2]) / 0.05
    assert plant_scores(tilt, plant, general, 0.05)[0] == pytest.approx(1 / (1 + np.exp(-margin)), rel=1e-5)


def test_knn_plant_score_is_the_nearest_images_vote():
    d = 6
    plant, general = basis(d, 0, 1), basis(d, 2, 3)
    half = np.array([[1, 0, 1, 0, 0, 0]], np.float32) / np.sqrt(2)
    x = np.concatenate([basis(d, 0), basis(d, 2), half, basis(d, 5)])
    assert knn_plant_scores(x, plant, general, 1) == pytest.approx([1.0, 0.0, 0.5, 0.5])
    # k = 2: (mean of the two plant cosines - mean of the two general ones + 1) / 2
    assert knn_plant_scores(x, plant, general, 2) == pytest.approx([0.75, 0.25, 0.5, 0.5])
    assert knn_plant_scores(x, plant, general, 50) == pytest.approx(knn_plant_scores(x, plant, general, 2))  # k > support
    rng = np.random.default_rng(0)
    x, plant, general = unit(rng, 300, 8), unit(rng, 40, 8), unit(rng, 30, 8)
    for k in (1, 7):
        want = (np.sort(x @ plant.T, 1)[:, -k:].mean(1) - np.sort(x @ general.T, 1)[:, -k:].mean(1) + 1) / 2
        assert knn_plant_scores(x, plant, general, k) == pytest.approx(want, abs=1e-6)


def test_knn_relevance_needs_both_support_folders():
    for bad, words in ((dict(support_k=5, support_dir="p"), "needs both"), (dict(general_support_dir="g"), "set support_k")):
        with pytest.raises(ValueError, match=words):
            RelevanceConfig(**bad)
    assert RelevanceConfig(support_k=5, support_dir="p", general_support_dir="g").support_dirs() == {"plant": "p", "general": "g"}


def test_relevance_policy_per_checked_domain_and_routing():
    domain = np.array(["general", "general", "plant", "plant", "general"], object)
    counted = np.array([True, False, False, True, True])
    scored = np.array([True, True, True, True, False])  # the last row has no embedding
    reason, route = relevance_reasons(domain, counted, scored, RelevanceConfig())
    assert reason.tolist() == [DROP_PLANT_IN_GENERAL, None, DROP_NOT_A_PLANT, None, None] and route.tolist() == [None] * 5
    reason, route = relevance_reasons(domain, counted, scored, RelevanceConfig(route="move"))
    assert reason.tolist() == [DROP_PLANT_IN_GENERAL, None, DROP_NOT_A_PLANT, None, None]
    assert route.tolist() == ["plant", None, None, None, None]  # a plant row that is no plant is never moved
    reason, _ = relevance_reasons(domain, counted, scored, RelevanceConfig(check=["general"]))
    assert reason.tolist() == [DROP_PLANT_IN_GENERAL, None, None, None, None]


def test_taxon_prompts_are_the_caption_templates_of_distinct_taxa():
    cols = ["taxon_kingdom", "taxon_phylum", "taxon_class", "taxon_order", "taxon_family", "taxon_genus", "taxon_species", "common_name"]
    rows = [dict.fromkeys(cols) | {"taxon_species": "Quercus robur", "taxon_family": "Fagaceae", "common_name": "English oak"}] * 3
    rows.append(dict.fromkeys(cols) | {"taxon_species": "Acer campestre"})
    prompts = taxon_prompts(pa.Table.from_pylist(rows))
    assert prompts == sorted({
        "a photo of Quercus robur.", "a photo of English oak, a type of plant.", "a photo of Quercus robur, family Fagaceae.",
        "a photo of English oak (Quercus robur), a plant of the family Fagaceae.", "a photo of Acer campestre.",
    })  # fmt: skip


def test_centroid_routing_follows_clusters_and_support_images():
    rng = np.random.default_rng(1)
    d = 16
    centres = basis(d, 0, 2, 5)  # blob A at the plant prompt, B at the general prompt, C leaning general
    centres[2, 2] = 0.4
    centres[2] /= np.linalg.norm(centres[2])
    x = np.concatenate([c + 0.05 * rng.normal(size=(40, d)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    plant, general = basis(d, 0), basis(d, 2)
    cfg = RelevanceConfig(centroids=3)
    cluster, is_plant = plant_clusters(x, 3, 0, lambda c: plant_scores(c, plant, general, cfg.temperature),
                                        np.zeros((0, d), np.float32), cfg.threshold)
    counted = is_plant[cluster]
    assert counted[:40].all() and not counted[40:].any()
    support = (centres[2:] + 0.05 * rng.normal(size=(1, d))).astype(np.float32)
    support /= np.linalg.norm(support)
    protos = np.concatenate([plant, support])
    cluster, is_plant = plant_clusters(x, 3, 0, lambda c: plant_scores(c, protos, general, cfg.temperature), support, cfg.threshold)
    counted = is_plant[cluster]
    assert counted[:40].all() and not counted[40:80].any() and counted[80:].all()  # DataComp's image-based rule


# ---- SemDeDup ------------------------------------------------------------------------------------------------


def test_semantic_pairs_equal_brute_force_within_clusters_and_find_every_planted_copy():
    rng = np.random.default_rng(2)
    d, base_n = 32, 300
    base = unit(rng, base_n, d)
    src = rng.choice(base_n, 120)
    copies = base[src] + 0.02 * rng.normal(size=(120, d)).astype(np.float32)  # cosine > 0.99
    x = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)]).astype(np.float16)
    rank = rng.permutation(len(x))
    _, cluster = kmeans(x.astype(np.float32), 8, seed=0)
    eps = 0.05
    a, b, cos, best = semantic_pairs(x, cluster, rank, eps)
    xf = x.astype(np.float32)
    sim = xf @ xf.T
    same = cluster[:, None] == cluster[None, :]
    i, j = np.nonzero(np.triu((sim > 1 - eps) & same, 1))
    want = {(int(p), int(q)) if rank[p] < rank[q] else (int(q), int(p)) for p, q in zip(i, j)}
    assert set(zip(a.tolist(), b.tolist())) == want and len(a) == len(want)
    assert all(rank[p] < rank[q] for p, q in want)
    np.testing.assert_allclose(cos, sim[a, b], atol=1e-5)
    planted = {frozenset((int(s), base_n + k)) for k, s in enumerate(src)}
    assert planted <= {frozenset(p) for p in want}  # recall 100 % (copies land in their original's cluster)
    better = (rank[None, :] < rank[:, None]) & same
    ref_best = np.where(better.any(axis=1), np.where(better, sim, -np.inf).max(axis=1), -1)
    np.testing.assert_allclose(best, ref_best, atol=1e-5)
    epsilons = [0.013, 0.05, 0.5]
    assert all(np.abs(ref_best - (1 - e)).min() > 1e-5 for e in epsilons)  # no row on a boundary: rounding cannot flip it
    sweep = epsilon_sweep(best, epsilons).to_pydict()
    assert sweep["removed"] == [int((ref_best > 1 - e).sum()) for e in epsilons]
    assert sweep["removed"][1] >= 120 and sweep["fraction"][1] == sweep["removed"][1] / len(x)


# ---- the decision step with model proposals -----------------------------------------------------------------


def model_table(rows: list[dict], model: dict[str, dict]) -> pa.Table:
    """MODEL_SCORE_SCHEMA rows: model[uid] may set clip (a reason), relevance, route_to, eval, cluster, scores."""
    out = []
    for r in rows:
        m = model.get(r["uid"], {})
        out.append({"uid": r["uid"], "clip_score": m.get("clip_score"), "plant_score": m.get("plant_score"),
                    "clip_reason": m.get("clip"), "relevance_reason": m.get("relevance"), "route_to": m.get("route_to"),
                    "eval_overlap": m.get("eval"), "eval_match": "exact" if m.get("eval") else None, "eval_file": None,
                    "semantic_cluster": m.get("cluster")})  # fmt: skip
    return pa.Table.from_pylist(out, schema=MODEL_SCORE_SCHEMA)


def pair_rows(pairs: list[tuple[str, str, float]]) -> pa.Table:
    return pa.Table.from_pylist([{"uid_a": a, "uid_b": b, "cosine": c} for a, b, c in pairs], schema=SEMANTIC_PAIR_SCHEMA)


def run_model(rows, model, pairs, cfg=None, priority=PRIORITY, held=None):
    cfg = cfg or DedupConfig()
    joined = table(rows).append_column("domain", pa.array([r.get("domain", "general") for r in rows], pa.string()))
    return decide(joined, filter_table(rows), proposals(joined, cfg), cfg, priority, held,
                  ModelProposals(model_table(rows, model), pair_rows(pairs)))  # fmt: skip


def test_row_level_order_and_routing():
    far = [int(h) for h in np.random.default_rng(5).integers(0, 2**63, 10)]  # pairwise ≫ 8 bits apart
    names = ["held", "eval", "img", "cap", "clip", "rel", "moved", "moved_late", "plain", "evalonly"]
    rows = [row(u, sha=u, phash=p) for u, p in zip(names, far)]
    rows[2]["image_reason"] = TOO_SMALL
    rows[3]["caption_reason"] = TOO_SHORT
    rows[7]["caption_reason"] = TOO_SHORT
    model = {
        "held": {"eval": "set1", "clip": DROP_CLIP_SCORE_LOW},
        "eval": {"eval": "set1", "clip": DROP_CLIP_SCORE_LOW},  # eval overlap comes before the filters
        "img": {"clip": DROP_CLIP_SCORE_LOW, "relevance": DROP_NOT_A_PLANT},
        "cap": {"clip": DROP_CLIP_SCORE_LOW},
        "clip": {"clip": DROP_CLIP_SCORE_LOW, "relevance": DROP_PLANT_IN_GENERAL, "clip_score": 0.1},
        "rel": {"relevance": DROP_PLANT_IN_GENERAL, "plant_score": 0.9},
        "moved": {"relevance": DROP_PLANT_IN_GENERAL, "route_to": "plant", "plant_score": 0.8, "cluster": 3},
        "moved_late": {"relevance": DROP_PLANT_IN_GENERAL, "route_to": "plant"},  # a caption reason comes first
        "evalonly": {"eval": "set2"},
    }
    held = pa.table({"uid": ["held"], "split": ["s"], "role": ["held_out"]})
    out = run_model(rows, model, [], DedupConfig(mirror=False), held=held)
    got = {u: (k, r) for u, k, r in zip(*(out[c].to_pylist() for c in ("uid", "keep", "drop_reason")))}
    assert got == {"held": (False, DROP_HELD_OUT), "eval": (False, DROP_EVAL_OVERLAP), "img": (False, TOO_SMALL),
                   "cap": (False, TOO_SHORT), "clip": (False, DROP_CLIP_SCORE_LOW), "rel": (False, DROP_PLANT_IN_GENERAL),
                   "moved": (True, None), "moved_late": (False, TOO_SHORT), "plain": (True, None),
                   "evalonly": (False, DROP_EVAL_OVERLAP)}  # fmt: skip
    d = {u: r for u, r in zip(out["uid"].to_pylist(), out.to_pylist())}
    assert d["moved"]["domain"] == "plant" and d["moved"]["routed_from"] == "general"
    assert d["moved_late"]["domain"] == "general" and d["moved_late"]["routed_from"] is None
    assert d["plain"]["domain"] == "general" and d["plain"]["routed_from"] is None
    assert d["eval"]["eval_overlap"] == "set1" and d["evalonly"]["eval_overlap"] == "set2" and d["plain"]["eval_overlap"] is None
    assert d["moved"]["semantic_cluster"] == 3 and d["moved"]["plant_score"] == pytest.approx(0.8)
    assert d["clip"]["clip_score"] == pytest.approx(0.1)
    assert out.schema.names[-3:] == [f.name for f in MODEL_DECISION_FIELDS]
    assert out.schema.field("clip_score").type == pa.float32() and out.schema.field("semantic_cluster").type == pa.int32()
    assert check_invariants(out, radius=8) == []


def test_eval_overlap_rows_are_never_kept_twins_nor_attached():
    rows = [row("evalcopy", sha="s", phash=0, w=900), row("twin", sha="s", phash=0, w=500), row("near", sha="t", phash=1)]
    out = full(run_model(rows, {"evalcopy": {"eval": "set"}}, []))
    assert out["evalcopy"][:4] == (False, DROP_EVAL_OVERLAP, None, None)
    assert out["twin"] == (True, None, None, None, ["caption of twin", "caption of near"], False)
    assert out["near"][:4] == (False, DROP_DUPLICATE_NEAR, "twin", 1)


def test_semantic_groups_keep_rule_repointing_and_captions():
    h = [int(x) for x in np.random.default_rng(6).integers(0, 2**63, 7)]  # pairwise ≫ 2 bits apart
    rows = [row("best", sha="1", phash=h[0], w=900, caption="best"), row("sem", sha="2", phash=h[1], w=500, caption="sem"),
            row("semnear", sha="3", phash=h[1] ^ 0b11, caption="semnear"),  # near twin of sem, which loses to best
            row("semexact", sha="2", phash=h[1], caption="semexact"),  # exact twin of sem
            row("other", sha="4", phash=h[2], w=800, caption="other"),
            row("chain", sha="5", phash=h[3], caption="chain"),  # twin of sem only: kept (sem is lost), less similar than best
            row("both", sha="6", phash=h[4], caption="both"),  # twin of best (0.97) and other (0.99): other
            row("clipped", sha="7", phash=h[5], caption="bad caption")]  # fmt: skip
    pairs = [("best", "sem", 0.97), ("sem", "chain", 0.96), ("both", "best", 0.97), ("both", "other", 0.99),
             ("clipped", "best", 0.99)]  # fmt: skip
    out = run_model(rows, {"clipped": {"clip": DROP_CLIP_SCORE_LOW}}, pairs, DedupConfig(phash_radius=2))
    got = full(out)
    bits = lambda a, b: _bits(a ^ b)  # noqa: E731
    assert got["sem"][:4] == (False, DROP_DUPLICATE_SEMANTIC, "best", bits(h[1], h[0]))
    assert got["semnear"][:4] == (False, DROP_DUPLICATE_SEMANTIC, "best", bits(h[1] ^ 0b11, h[0]))  # re-pointed: sem lost
    assert got["semexact"][:4] == (False, DROP_DUPLICATE_SEMANTIC, "best", bits(h[1], h[0]))
    assert got["chain"][0] and got["other"][0]
    assert got["both"][:4] == (False, DROP_DUPLICATE_SEMANTIC, "other", bits(h[4], h[2]))
    assert got["clipped"][:4] == (False, DROP_CLIP_SCORE_LOW, None, None)  # row-level rejections join no semantic group
    assert got["best"][4] == ["best", "sem", "semexact", "semnear"]
    assert got["other"][4] == ["other", "both"]
    assert check_invariants(out, radius=2, semantic_pairs=pair_rows(pairs)) == []


def semantic_reference(rows, cfg, priority, model, pairs) -> dict[str, tuple]:
    """The documented semantics: the dedup reference on rows where eval overlap reads as unusable and a
    low CLIP score as a caption rejection (same places in the order, same caption rule), then the
    semantic step over its kept rows, greedy in keep-rule order, written out directly."""
    folded = []
    for r in rows:
        m, r = model.get(r["uid"], {}), dict(r)
        if r["keep"] and m.get("eval"):
            r.update(keep=False, drop_reason=DROP_EVAL_OVERLAP)
        elif r["keep"] and m.get("clip") and r["caption_reason"] is None:
            r["caption_reason"] = DROP_CLIP_SCORE_LOW
        folded.append(r)
    base = reference(folded, cfg, priority)
    idx = {r["uid"]: i for i, r in enumerate(rows)}
    rank = {u: ref_rank(folded[i], i, priority) for u, i in idx.items() if folded[i]["keep"]}
    cos = {}
    for a, b, c in pairs:
        if a != b and base[a][0] and base[b][0]:
            cos[a, b] = cos[b, a] = c
    kept: list[str] = []
    for u in sorted((u for u, v in base.items() if v[0]), key=rank.get):
        if not any((u, k) in cos for k in kept):
            kept.append(u)
    twin = {u: min((k for k in kept if (u, k) in cos), key=lambda k: (-cos[u, k], rank[k]))
            for u, v in base.items() if v[0] and u not in kept}  # fmt: skip
    target: dict[str, tuple[str, int]] = {}
    semantic = set()
    for u, v in base.items():
        t = twin.get(u) or (twin.get(v[2], v[2]) if v[2] else None)
        if t is None:
            continue
        if t != v[2]:
            semantic.add(u)
            target[u] = (t, _bits(rows[idx[u]]["phash"] ^ rows[idx[t]]["phash"]))
        else:
            target[u] = (t, v[3])
    valid = {r["uid"]: r["keep"] and r["caption_reason"] is None and bool(r["caption"]) for r in folded}
    members: dict[str, list[str]] = {}
    for u, (t, _) in target.items():
        members.setdefault(t, []).append(u)
    out, conflict = {}, set()
    for k in kept:
        group = [k, *sorted(members.get(k, []), key=lambda u: (target[u][1], u))]
        if len({rows[idx[u]]["taxon_species"] for u in group if rows[idx[u]]["taxon_species"]}) > 1:
            conflict.update(group)
        out[k] = (True, None, None, None, list(dict.fromkeys(rows[idx[u]]["caption"] for u in group if valid[u])), False)
    for u, v in base.items():
        if u in kept:
            out[u] = (*out[u][:5], u in conflict)
            continue
        reason = v[1]
        if u in target and reason in (DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR) or u in twin:
            same = rows[idx[u]]["sha256"] is not None and rows[idx[u]]["sha256"] == rows[idx[target[u][0]]]["sha256"]
            reason = DROP_DUPLICATE_EXACT if same else DROP_DUPLICATE_SEMANTIC if u in semantic else reason
        dup, dist = target.get(u, (None, None))
        out[u] = (False, reason, dup, dist, None, u in conflict)
    return out


def random_model(rows, seed):
    rng = np.random.default_rng(seed)
    uids = [r["uid"] for r in rows]
    model = {}
    for u in uids:
        v = rng.random()
        if v < 0.04:
            model[u] = {"eval": "set"}
        elif v < 0.10:
            model[u] = {"clip": DROP_CLIP_SCORE_LOW}
    pairs = []
    for _ in range(len(rows) // 2):  # random semantic pairs, chains included
        a, b = rng.choice(len(rows), 2, replace=False)
        pairs.append((uids[a], uids[b], float(np.float32(rng.uniform(0.95, 1.0)))))
    for i in range(0, len(rows) - 3, 9):
        pairs.append((uids[i], uids[i + 1], 0.99))
        pairs.append((uids[i + 1], uids[i + 2], 0.98))
    return model, pairs


@pytest.mark.parametrize("seed,n,radius,dense", [(31, 500, 4, False), (32, 500, 3, True), (33, 400, 6, False), (34, 300, 0, True)])
def test_semantic_decisions_match_brute_force_reference(seed, n, radius, dense):
    rows = random_rows(seed, n, radius, dense)
    model, pairs = random_model(rows, seed)
    cfg = DedupConfig(phash_radius=radius)
    out = run_model(rows, model, pairs, cfg)
    got, want = full(out), semantic_reference(rows, cfg, PRIORITY, model, pairs)
    reasons = [v[1] for v in want.values()]
    assert reasons.count(DROP_DUPLICATE_SEMANTIC) > 20 and reasons.count(DROP_EVAL_OVERLAP) > 5 and reasons.count(DROP_CLIP_SCORE_LOW) > 5
    assert {u: (v, want[u]) for u, v in got.items() if v != want[u]} == {}
    assert check_invariants(out, radius=radius, semantic_pairs=pair_rows(pairs)) == []


def test_no_model_sections_change_nothing():
    rows = random_rows(40, 300, 4, False)
    cfg = DedupConfig(phash_radius=4)
    joined = table(rows)
    plain = decide(joined, filter_table(rows), proposals(joined, cfg), cfg, PRIORITY)
    assert not set(plain.schema.names) & {f.name for f in MODEL_DECISION_FIELDS}
    with_domain = joined.append_column("domain", pa.array(["general"] * len(rows)))
    empty = decide(with_domain, filter_table(rows), proposals(joined, cfg), cfg, PRIORITY, None,
                   ModelProposals(model_table(rows, {}), pair_rows([])))  # fmt: skip
    assert empty.select(plain.schema.names).equals(plain)  # null proposals: the same decisions, bit for bit


def test_model_proposals_must_match_the_joined_rows():
    rows = [row("a", sha="1", phash=0), row("b", sha="2", phash=1 << 40)]
    joined = table(rows).append_column("domain", pa.array(["general"] * 2))
    with pytest.raises(PlantmixError, match="rerun the score stage"):
        decide(joined, filter_table(rows), proposals(joined, DedupConfig()), DedupConfig(), PRIORITY, None,
               ModelProposals(model_table(rows[::-1], {}), pair_rows([])))  # fmt: skip


def test_pair_table_is_sorted_and_uid_keyed():
    uid = pa.array(["u0", "u1", "u2", "u3"])
    t = pair_table(uid, np.array([2, 0, 0]), np.array([3, 3, 1]), np.array([0.97, 0.99, 0.98], np.float32))
    assert t.schema == SEMANTIC_PAIR_SCHEMA
    assert t.to_pylist() == [{"uid_a": "u0", "uid_b": "u1", "cosine": pytest.approx(0.98)},
                             {"uid_a": "u0", "uid_b": "u3", "cosine": pytest.approx(0.99)},
                             {"uid_a": "u2", "uid_b": "u3", "cosine": pytest.approx(0.97)}]  # fmt: skip
