"""How well `plantmix mine` surfaces the demo world's plant images in its general pool (issue acceptance (c)).

    .venv/bin/python benchmarks/mine_demo.py BUILD [--queries plant-prompts pretrain-plants DIR ...] [--json out.json]

BUILD is a demo build with embeddings (`make demo`'s builds/demo). The general list holds plant images
the world planted there (fault plant_in_general_list) and copies of plant-list rows; the ground truth
(`demo_world/ground_truth.parquet`) names a species exactly for those. For each query set the script
and each `--combine` (best, mean) mines the whole pool (k = pool size, min_score -1: the full ranking)
and prints,
with P the number of plant images in the pool:

- precision@P (= recall@P, the R-precision): the share of plants among the top P rows;
- precision@k and recall@k for k = P/2, P, 2P;
- the rank depth needed for 90 % recall and the precision there; the ROC AUC of mine_score;

and exits 1 when a `mean` ranking misses BARS (precision@P, recall@2P).

`--queries pretrain-plants` mines with the plant images of the world's pretraining pool
(`demo_world/pretrain/`, written to a temporary image folder): images of the world's species that are
not rows of the pool. Any other value is an image folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from plantmix.demo.validation import read_pairs  # noqa: E402
from plantmix.embed.mine import COMBINE, PLANT_PROMPTS, mine  # noqa: E402
from plantmix.embed.store import read_embeddings  # noqa: E402
from plantmix.stages.ingest import make_uid  # noqa: E402

POOL = "demo_general"
RECALL_AT = 0.9
# The bars `--combine mean` must clear (exit status 1 otherwise), set below the measured 0.72 and 0.94-1.0
# of the bootstrapped 32-px scorer so run-to-run noise passes and a broken ranking does not.
BARS = {"precision_at_p": 0.6, "recall_at_two_p": 0.9}
PRETRAIN_PLANTS = "pretrain-plants"


def write_pretrain_plants(world: Path, out: Path) -> Path:
    """The plant images of the world's pretraining shard as an image folder (one file per sample)."""
    out.mkdir(parents=True, exist_ok=True)
    for key, meta, jpg in read_pairs(world / "pretrain" / "00000.tar"):
        if meta["domain"] == "plant":
            (out / f"{key}.jpg").write_bytes(jpg)
    return out


def plant_uids(build: Path) -> set[str]:
    """uids of the general list's rows whose image shows a plant (the truth names its species)."""
    truth = pq.read_table(build / "demo_world" / "ground_truth.parquet", columns=["list", "key", "species"]).to_pylist()
    return {make_uid(POOL, key=g["key"]) for g in truth if g["list"] == "general" and g["species"] is not None}


def ranking_figures(ranked: list[str], pool: set[str], plants: set[str]) -> dict:
    """Precision/recall at several depths of a ranking of the pool (rows missing from it rank last)."""
    ranked = ranked + sorted(pool - set(ranked))
    hit = np.array([u in plants for u in ranked])
    p = int(hit.sum())
    if not p:
        return {"plants": 0}
    cum = np.cumsum(hit)
    out = {"pool": len(ranked), "plants": p}
    for name, k in (("half_p", max(1, p // 2)), ("p", p), ("two_p", 2 * p)):
        k = min(k, len(ranked))
        out[f"at_{name}"] = {"k": k, "precision": round(cum[k - 1] / k, 3), "recall": round(cum[k - 1] / p, 3)}
    depth = int(np.searchsorted(cum, int(np.ceil(RECALL_AT * p)))) + 1
    out["depth_for_90_recall"] = {"k": depth, "precision": round(cum[depth - 1] / depth, 3)}
    ranks = np.nonzero(hit)[0]  # 0-based ranks of the plants; AUC = share of (plant, other) pairs in order
    out["auc"] = round(float(np.mean([(len(ranked) - r - 1 - (p - 1 - i)) / (len(ranked) - p) for i, r in enumerate(ranks)])), 4)
    return out


def run(build: Path, queries: str, combine: str) -> dict:
    pool = set(read_embeddings(build, [POOL], text=False).uid.to_pylist())
    with tempfile.TemporaryDirectory() as tmp:
        spec = str(write_pretrain_plants(build / "demo_world", Path(tmp) / "q")) if queries == PRETRAIN_PLANTS else queries
        t0 = time.perf_counter()
        table = mine(build, POOL, spec, k=len(pool), min_score=-1, out=Path(tmp) / "mined.parquet", combine=combine)
        seconds = time.perf_counter() - t0
    return {"queries": queries, "combine": combine, "seconds": round(seconds, 1),
            **ranking_figures(table["uid"].to_pylist(), pool, plant_uids(build) & pool)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build", type=Path, help="a demo build with embeddings")
    ap.add_argument("--queries", nargs="+", default=[PLANT_PROMPTS, PRETRAIN_PLANTS],
                    help=f"{PLANT_PROMPTS}, {PRETRAIN_PLANTS} and/or image folders")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    report = [run(args.build, q, c) for q in args.queries for c in COMBINE]
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    missed = [f"{r['queries']}: {name} {got} < {bar}" for r in report if r["combine"] == "mean"
              for name, bar, got in (("precision_at_p", BARS["precision_at_p"], r["at_p"]["precision"]),
                                     ("recall_at_two_p", BARS["recall_at_two_p"], r["at_two_p"]["recall"])) if got < bar]
    print("bars (combine mean):", "met" if not missed else "NOT MET: " + "; ".join(missed))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
