"""How well a scorer bootstrapped on the demo separates the demo world's planted model-curation cases.

    .venv/bin/python benchmarks/scorer_feasibility.py BUILD EXPORT [--json out.json]

BUILD is a demo build (`plantmix build pipelines/demo.yaml`; rows its model checks dropped are scored
as if kept, since those checks run after the rule-based ones), EXPORT a `dalip export` directory of a
scorer (configs/dalip-scorer.yaml: trained on the world's pretraining pool). The script embeds every
downloaded image and caption of BUILD/download/ with plantmix.embed.scorer.load_scorer, and the
evaluation, validation and pretraining images of the demo world, then prints, against the world's
ground truth:

- relevance: plant-vs-general zero-shot score (text prototypes: taxon names in caption templates plus
  prompts; image prototypes: the world's validation images, or its pretraining pool's, k nearest per
  domain), AUC and the best threshold with recall >= 90 % (its precision: read off the truth, so an
  upper bound) for plants in the general list and scenes in the plant list; for the pretraining-pool
  prototypes also the figures at thresholds chosen on the validation images (`calibrated:*`);
- CLIP score: image-caption cosine of captions naming the other domain vs clean captions, per domain
  (AUC, threshold at recall >= 90 %, precision, the kept fraction it implies); between-species swaps
  apart; the best per-domain minimums read off the truth (`both:cross_domain`, an upper bound) and the
  figures of minimums chosen on the validation pairs (`clip_score_calibrated`: quantiles of clean pairs
  and of synthetic cross-domain pairs; pipelines/demo.yaml uses clean_p02);
- SemDeDup: cosine of each re-photographed plant to its original vs to the nearest other individual of
  its species; pair precision and recall per epsilon (cosine > 1 - epsilon, no k-means split);
- decontamination: cosine of each evaluation-image copy to its source vs the highest cosine of any other
  training image to an evaluation image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

from plantmix.core.recipe import RelevanceConfig, ScorerConfig  # noqa: E402
from plantmix.core.schema import (  # noqa: E402
    DROP_CLIP_SCORE_LOW, DROP_DUPLICATE_SEMANTIC, DROP_EVAL_OVERLAP, DROP_NOT_A_PLANT, DROP_PLANT_IN_GENERAL,
)
from plantmix.demo.validation import SCENE_CLASSNAMES, read_pairs  # noqa: E402
from plantmix.demo.world import MISMATCH_CROSS_DOMAIN, MISMATCH_SPECIES  # noqa: E402
from plantmix.embed.scorer import load_scorer  # noqa: E402
from plantmix.stages.ingest import make_uid  # noqa: E402

SOURCE_OF = {"plant": "demo_plant", "general": "demo_general"}
MODEL_REASONS = {DROP_CLIP_SCORE_LOW, DROP_DUPLICATE_SEMANTIC, DROP_EVAL_OVERLAP, DROP_NOT_A_PLANT, DROP_PLANT_IN_GENERAL}
EPSILONS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
RECALL_AT = 0.9
# Prompts in the demo's own words (the general scenes' classes), beside RelevanceConfig's defaults.
DEMO_GENERAL_PROMPTS = [p for names in SCENE_CLASSNAMES.values() for p in names]
NAME_TEMPLATES = ("{common} ({scientific})", "a photo of {common}, a type of plant", "{scientific}", "{common} leaves")


# ---------------------------------------------------------------- reading


def read_downloads(build: Path) -> list[dict]:
    """Every successfully downloaded sample: uid, source, image (PIL), caption."""
    return [{"uid": meta["uid"], "source": source, "image": _rgb(jpg), "caption": meta["caption"] or ""}
            for source in sorted(SOURCE_OF.values())
            for tar_path in sorted((build / "download" / source).glob("*.tar"))
            for _, meta, jpg in read_pairs(tar_path)]


def _rgb(jpg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpg)).convert("RGB")


def world_pairs(path: Path) -> list[dict]:
    """(image, caption, domain) of every sample of a world pair shard (validation/, pretrain/)."""
    if not path.is_file():
        return []
    return [{"image": _rgb(jpg), "caption": meta["caption"], "domain": meta["domain"]} for _, meta, jpg in read_pairs(path)]


def read_validation_images(world: Path, domain: str) -> list[Image.Image]:
    return [s["image"] for s in world_pairs(world / "validation" / domain / "00000.tar")]


# ---------------------------------------------------------------- metrics


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half): the ROC AUC."""
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = rankdata(np.r_[pos, neg])
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def at_recall(pos: np.ndarray, neg: np.ndarray, recall: float = RECALL_AT) -> dict:
    """Flag scores >= t, with t the highest threshold catching `recall` of the positives."""
    if not len(pos):
        return {}
    t = float(np.sort(pos)[::-1][int(np.ceil(recall * len(pos))) - 1])
    tp, fp = int((pos >= t).sum()), int((neg >= t).sum())
    return {"threshold": round(t, 4), "recall": round(tp / len(pos), 3), "precision": round(tp / max(1, tp + fp), 3),
            "flagged": tp + fp, "positives": len(pos), "negatives": len(neg)}


def separation(pos: np.ndarray, neg: np.ndarray) -> dict:
    return {"auc": round(auc(pos, neg), 4), **at_recall(pos, neg)}


# ---------------------------------------------------------------- studies


def knn_score(x: np.ndarray, support: dict[str, np.ndarray], k: int) -> np.ndarray:
    """(mean cosine of the k nearest plant support images - the same for general ones + 1) / 2."""
    near = {d: np.sort(x @ support[d].T, 1)[:, -k:].mean(1) for d in ("plant", "general")}
    return (near["plant"] - near["general"] + 1) / 2


def calibrated(v_plant: np.ndarray, v_general: np.ndarray) -> dict[str, float]:
    """Thresholds from held-out domain-pure images, never from the build: the 5th percentile of the
    plants' scores (about 95 % of plants above it) and the equal-error point."""
    grid = np.unique(np.r_[v_plant, v_general])
    err = [abs((v_plant < t).mean() - (v_general >= t).mean()) for t in grid]
    return {"plant_p05": float(np.quantile(v_plant, 0.05)), "equal_error": float(grid[int(np.argmin(err))])}


def flagged_at(v: np.ndarray, is_target: np.ndarray, t: float) -> dict:
    tp, fp = int((v[is_target] >= t).sum()), int((v[~is_target] >= t).sum())
    return {"threshold": round(t, 4), "recall": round(tp / max(1, int(is_target.sum())), 3),
            "precision": round(tp / max(1, tp + fp), 3), "flagged": tp + fp}


def relevance_study(img: np.ndarray, rows: list[dict], text_protos: dict[str, np.ndarray],
                    supports: dict[str, dict[str, np.ndarray]], calib: dict[str, np.ndarray]) -> dict:
    """plant_in_general (general list, plant image) and not_a_plant (plant list, scene) by zero-shot scores.

    `supports`: image prototype sets per name (plant and general images); `calib`: held-out images per
    domain (the world's validation pairs) on which a support set's thresholds are chosen (`calibrated`),
    unless the support set is that very set."""
    scores, thresholds = {}, {}
    for name, (plant, general) in text_protos.items():
        sims = np.c_[img @ plant.T, img @ general.T] * 100.0  # a CLIP-like logit scale
        p = np.exp(sims - sims.max(1, keepdims=True))
        scores[f"text:{name}"] = p[:, : len(plant)].sum(1) / p.sum(1)  # p(plant) in [0, 1]
    for set_name, support in supports.items():
        if not (len(support["plant"]) and len(support["general"])):
            continue
        for k in (1, 5, 20):  # mean cosine of the k nearest support images per domain
            key = f"images:{set_name}:knn{k}"
            scores[key] = knn_score(img, support, k)
            if set_name != "validation" and len(calib["plant"]) and len(calib["general"]):
                thresholds[key] = calibrated(knn_score(calib["plant"], support, k), knn_score(calib["general"], support, k))
    out = {}
    for kind, listed, flag_plant in (("plant_in_general", "general", True), ("not_a_plant", "plant", False)):
        idx = [i for i, r in enumerate(rows) if r["list"] == listed]
        is_target = np.array([(rows[i]["species"] is not None) == flag_plant for i in idx])
        out[kind] = {}
        for name, s in scores.items():
            v = s[idx] if flag_plant else 1 - s[idx]  # high = flagged
            out[kind][name] = separation(v[is_target], v[~is_target])
            for t_name, t in thresholds.get(name, {}).items():  # a plant scores >= t; a scene below it
                t_flag = t if flag_plant else 1 - t
                out[kind][name][f"calibrated:{t_name}"] = flagged_at(v, is_target, t_flag)
    return out


def clip_score_study(img: np.ndarray, txt: np.ndarray, rows: list[dict]) -> dict:
    cos = (img * txt).sum(1)
    out = {}
    for listed in ("plant", "general"):
        own = [i for i, r in enumerate(rows) if r["list"] == listed and r["eligible"]]
        clean = np.array([cos[i] for i in own if rows[i]["mismatch"] is None])
        for kind, pick in (("cross_domain", lambda r: r["mismatch"] == MISMATCH_CROSS_DOMAIN and r["image_in_list"]),
                           ("between_species", lambda r: r["mismatch"] == MISMATCH_SPECIES),
                           ("scene_in_plant_list", lambda r: r["mismatch"] == MISMATCH_CROSS_DOMAIN and not r["image_in_list"])):
            pos = np.array([cos[i] for i in own if pick(rows[i])])
            if len(pos):  # low cosine = flagged
                res = separation(-pos, -clean)
                res["threshold"] = -res["threshold"]  # back to a cosine minimum
                res["kept_fraction"] = round(float((np.r_[clean, pos] > res["threshold"]).mean()), 3)
                out[f"{listed}:{kind}"] = res
    out["both:cross_domain"] = pooled_thresholds(cos, rows)
    return out


def clip_calibration(scorer, pairs: list[dict], seed: int = 0) -> dict[str, dict[str, float]]:
    """Per-domain cosine minimums chosen on held-out pairs, never on the build: each image with its own
    caption (clean) and with a caption of the other domain (a synthetic cross-domain mismatch). q90 /
    q95: the q-quantile of the mismatches' cosines (about q of them fall below it); clean_p02: the 2nd
    percentile of the clean cosines (2 % of clean pairs fall below it); equal_error: where the share of
    clean pairs below equals the share of mismatches above."""
    by = {d: [p for p in pairs if p["domain"] == d] for d in ("plant", "general")}
    if not (by["plant"] and by["general"]):
        return {}
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    for d, other in (("plant", "general"), ("general", "plant")):
        img = scorer.encode_images([p["image"] for p in by[d]])
        wrong = scorer.encode_text([by[other][int(i)]["caption"] for i in rng.integers(0, len(by[other]), len(by[d]))])
        mism = (img * wrong).sum(1)
        clean = (img * scorer.encode_text([p["caption"] for p in by[d]])).sum(1)
        for q in (0.9, 0.95):
            out.setdefault(f"q{int(q * 100)}", {})[d] = round(float(np.quantile(mism, q)), 4)
        out.setdefault("clean_p02", {})[d] = round(float(np.quantile(clean, 0.02)), 4)
        grid = np.unique(np.r_[clean, mism])
        err = [abs((clean < t).mean() - (mism >= t).mean()) for t in grid]
        out.setdefault("equal_error", {})[d] = round(float(grid[int(np.argmin(err))]), 4)
    return out


def clip_calibrated_figures(cos: np.ndarray, rows: list[dict], minimums: dict[str, dict[str, float]]) -> dict:
    """Recall of the cross-domain captions and precision (any planted mismatch is a right flag) of
    each calibrated pair of minimums on the build."""
    out = {}
    for name, t in minimums.items():
        own = [i for i, r in enumerate(rows) if r["eligible"]]
        hit = [i for i in own if cos[i] < t[rows[i]["list"]]]
        target = [i for i in own if rows[i]["mismatch"] == MISMATCH_CROSS_DOMAIN and rows[i]["image_in_list"]]
        swaps = [i for i in own if rows[i]["mismatch"] == MISMATCH_SPECIES]
        right = sum(rows[i]["mismatch"] is not None for i in hit)
        out[name] = {"min": t, "recall": round(sum(cos[i] < t[rows[i]["list"]] for i in target) / max(1, len(target)), 3),
                     "precision": round(right / max(1, len(hit)), 3), "flagged": len(hit), "positives": len(target),
                     "between_species_recall": round(sum(cos[i] < t[rows[i]["list"]] for i in swaps) / max(1, len(swaps)), 3)}
    return out


def pooled_thresholds(cos: np.ndarray, rows: list[dict]) -> dict:
    """Per-domain cosine minimums flagging >= RECALL_AT of the cross-domain captions of both lists
    together, at the best precision (any planted mismatch counts as a right flag): what a recipe's
    clip_score.min per domain can reach."""
    lists = ("plant", "general")
    own = {d: [i for i, r in enumerate(rows) if r["list"] == d and r["eligible"]] for d in lists}
    target = {d: {i for i in own[d] if rows[i]["mismatch"] == MISMATCH_CROSS_DOMAIN and rows[i]["image_in_list"]} for d in lists}
    total = sum(len(t) for t in target.values())
    if not total:
        return {}
    cands = {d: sorted({float(cos[i]) + 1e-6 for i in target[d]} | {-1.0}) for d in lists}  # flag cos < t
    best = None
    for tp_ in cands["plant"]:
        for tg in cands["general"]:
            t = {"plant": tp_, "general": tg}
            hit = [i for d in lists for i in own[d] if cos[i] < t[d]]
            caught = sum(i in target[rows[i]["list"]] for i in hit)
            right = sum(rows[i]["mismatch"] is not None for i in hit)
            if caught >= RECALL_AT * total:
                key = (right / max(1, len(hit)), -len(hit))
                if best is None or key > best[0]:
                    kept = {d: round(float(np.mean([cos[i] >= t[d] for i in own[d]])), 3) for d in lists}
                    best = (key, {"min": {d: round(v, 4) for d, v in t.items()}, "recall": round(caught / total, 3),
                                  "precision": round(right / max(1, len(hit)), 3), "flagged": len(hit),
                                  "top_fraction": kept, "positives": total})
    return best[1] if best else {}


def semantic_study(img: np.ndarray, rows: list[dict]) -> dict:
    uid_index = {r["uid"]: i for i, r in enumerate(rows)}
    pairs = [(uid_index[r["uid"]], uid_index[r["dup_of"]]) for r in rows
             if r["fault"] == "semantic_dup" and r["dup_of"] in uid_index]  # fmt: skip
    pool = [i for i, r in enumerate(rows) if r["first_pass_keep"] and r["species"] is not None]
    sims = img[pool] @ img[pool].T
    np.fill_diagonal(sims, -1)
    where = {i: n for n, i in enumerate(pool)}
    same, other = [], []
    for a, b in pairs:
        same.append(float(img[a] @ img[b]))
        cands = [j for j in pool if j not in (a, b) and rows[j]["species"] == rows[a]["species"]]
        other.append(float(max(img[a] @ img[j] for j in cands)) if cands else float("nan"))
    planted = {frozenset((a, b)) for a, b in pairs}
    by_eps = {}
    for eps in EPSILONS:
        ii, jj = np.nonzero(np.triu(sims > 1 - eps, 1))
        found = {frozenset((pool[i], pool[j])) for i, j in zip(ii, jj)}
        right = len(found & planted)
        by_eps[str(eps)] = {"pairs": len(found), "recall": round(right / max(1, len(planted)), 3),
                            "precision": round(right / max(1, len(found)), 3)}
    return {"pairs": len(pairs), "in_pool": all(a in where and b in where for a, b in pairs),
            "cos_to_original": summary(same), "max_cos_same_species_other_individual": summary(other),
            "original_is_nearest": int(sum(s > o for s, o in zip(same, other))), "by_epsilon": by_eps}


def eval_study(img: np.ndarray, rows: list[dict], eval_emb: np.ndarray, eval_paths: list[str]) -> dict:
    index = {p: n for n, p in enumerate(eval_paths)}
    sims = img @ eval_emb.T
    copies = [(i, index[r["eval_image"]]) for i, r in enumerate(rows) if r["eval_image"]]
    copy_cos = {}
    for i, e in copies:
        copy_cos.setdefault(rows[i]["fault"], []).append(round(float(sims[i, e]), 4))
    others = [i for i, r in enumerate(rows) if not r["eval_image"]]
    return {"copy_cos": copy_cos, "max_cos_other_training_to_eval": round(float(sims[others].max()), 4),
            "copies": len(copies)}


def summary(v: list[float]) -> dict:
    a = np.asarray(v, float)
    return {"min": round(float(np.nanmin(a)), 4), "median": round(float(np.nanmedian(a)), 4),
            "max": round(float(np.nanmax(a)), 4)} if len(a) else {}


# ---------------------------------------------------------------- main


def joined_rows(build: Path) -> list[dict]:
    """Downloaded samples with their ground truth and first-pass decision."""
    world = build / "demo_world"
    truth = {make_uid(SOURCE_OF[g["list"]], key=g["key"]): g for g in pq.read_table(world / "ground_truth.parquet").to_pylist()}
    uid_of_url = {g["url"]: u for u, g in truth.items()}
    manifest = {r["uid"]: r for r in pq.read_table(build / "manifest.parquet", columns=["uid", "keep", "drop_reason"]).to_pylist()}
    rows = []
    for d in read_downloads(build):
        g, m = truth[d["uid"]], manifest[d["uid"]]
        # passed the rule-based row checks: kept, a duplicate, or dropped by a model check (decided after them)
        row_level_ok = m["drop_reason"] is None or m["drop_reason"].startswith("duplicate_") or m["drop_reason"] in MODEL_REASONS
        rows.append({**d, "list": g["list"], "fault": g["fault"], "species": g["species"], "eval_image": g["eval_image"],
                     "mismatch": g["caption_mismatch"], "dup_of": uid_of_url.get(g["dup_of_url"]),
                     "image_in_list": (g["species"] is not None) == (g["list"] == "plant"),
                     "eligible": row_level_ok, "first_pass_keep": bool(m["keep"]) or m["drop_reason"] in MODEL_REASONS})
    return rows


def text_prototypes(scorer, world: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = json.loads((world / "eval" / "classnames.json").read_text())
    taxa = [t.format(**n) for n in names.values() for t in NAME_TEMPLATES]
    defaults = RelevanceConfig()
    plant_default = scorer.encode_text(taxa + defaults.plant_prompts)
    return {"default_prompts": (plant_default, scorer.encode_text(defaults.general_prompts)),
            "demo_scene_prompts": (plant_default, scorer.encode_text(DEMO_GENERAL_PROMPTS))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build", type=Path, help="a demo build without model curation")
    ap.add_argument("export", type=Path, help="a `dalip export` directory (the scorer)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    world = args.build / "demo_world"
    t0 = time.perf_counter()
    rows = joined_rows(args.build)
    scorer = load_scorer(ScorerConfig(model=str(args.export.resolve()), batch_size=256))
    t1 = time.perf_counter()
    img = scorer.encode_images([r["image"] for r in rows])
    txt = scorer.encode_text([r["caption"] for r in rows])
    t_embed = time.perf_counter() - t1
    eval_paths = sorted(str(p.relative_to(world)) for p in (world / "eval").rglob("*.png"))
    eval_emb = scorer.encode_images([Image.open(world / p).convert("RGB") for p in eval_paths])
    validation = {d: scorer.encode_images(read_validation_images(world, d)) for d in ("plant", "general")}
    pretrain = world_pairs(world / "pretrain" / "00000.tar")
    supports = {"validation": validation,
                "pretrain": {d: scorer.encode_images([p["image"] for p in pretrain if p["domain"] == d]) for d in ("plant", "general")}}
    report = {
        "rows": len(rows), "embed_seconds": round(t_embed, 1), "total_seconds": None,
        "relevance": relevance_study(img, rows, text_prototypes(scorer, world), supports, validation),
        "clip_score": clip_score_study(img, txt, rows),
        "clip_score_calibrated": clip_calibrated_figures(
            (img * txt).sum(1), rows, clip_calibration(scorer, world_pairs(world / "validation" / "plant" / "00000.tar")
                                                       + world_pairs(world / "validation" / "general" / "00000.tar"))),
        "semantic_dedup": semantic_study(img, rows),
        "decontamination": eval_study(img, rows, eval_emb, eval_paths),
    }
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
