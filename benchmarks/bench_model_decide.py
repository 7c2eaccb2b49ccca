"""The decision step's added cost of model-based proposals, on a synthetic manifest.

    python benchmarks/bench_model_decide.py --rows 13000000

Builds N joined rows with planted exact / near / mirrored copies and filter rejections (the dedup
benchmark's generator, benchmarks/bench_dedup.py), their near-pair proposals, and synthetic model
proposals as the score stage writes them: a CLIP score per downloaded row with `clip_score_low` on a
share, a plant score with `plant_in_general` / `not_a_plant` on a share (half of the general ones
moved by `route: move`), eval overlaps on a share, a SemDeDup cluster per row, and semantic pairs
(each a random row with a near-identical random partner, plus chains). All are written to parquet.
Then `decide_to_parquet` — the build's decide stage, reading the joined parquet and streaming the
manifest out — runs in a fresh process without and with the model proposals, each timed (wall) with
its own peak RSS (wait4), and the same-run ratios are printed. Memory: the joined table and the
proposals are built in this process and freed before the timed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dedup import PRIORITY, synthetic_manifest  # noqa: E402

from plantmix.core.recipe import DedupConfig  # noqa: E402
from plantmix.core.schema import DROP_CLIP_SCORE_LOW, DROP_NOT_A_PLANT, DROP_PLANT_IN_GENERAL  # noqa: E402
from plantmix.core.stage import write_parquet  # noqa: E402
from plantmix.curate.dedup import near_pair_proposals  # noqa: E402
from plantmix.curate.model_steps import MODEL_SCORE_SCHEMA  # noqa: E402
from plantmix.curate.semdedup import SEMANTIC_PAIR_SCHEMA  # noqa: E402


def model_proposals(joined: pa.Table, args, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    """Synthetic score-stage proposals for `joined` (module doc)."""
    n = joined.num_rows
    usable = joined["keep"].to_numpy(zero_copy_only=False)
    domain = rng.random(n) < 0.77  # plant share of PlantMix-13M

    def strings(mask: np.ndarray, value: str) -> pa.Array:
        return pc.if_else(pa.array(mask & usable), pa.scalar(value), pa.nulls(n, pa.string()))

    u = rng.random(n)
    relevance = (u >= args.clip_share) & (u < args.clip_share + args.relevance_share)
    moved = relevance & ~domain & (rng.random(n) < 0.5)
    reason = pc.if_else(pa.array(domain), strings(relevance, DROP_NOT_A_PLANT), strings(relevance & ~domain, DROP_PLANT_IN_GENERAL))
    eval_rows = rng.random(n) < args.eval_share
    scores = pa.table([
        joined["uid"],
        pa.array(rng.uniform(-0.1, 0.5, n).astype(np.float32), mask=~usable),
        pa.array(rng.random(n).astype(np.float32), mask=~usable),
        strings(u < args.clip_share, DROP_CLIP_SCORE_LOW),
        reason,
        strings(moved, "plant"),
        strings(eval_rows, "eval_set"),
        strings(eval_rows, "phash"),
        strings(eval_rows, "c/0001.jpg"),
        pa.array(rng.integers(0, max(1, int(np.sqrt(n / 20))), n).astype(np.int32), mask=~usable),
    ], schema=MODEL_SCORE_SCHEMA)  # fmt: skip
    rows = np.nonzero(usable)[0]
    k = int(n * args.semantic_share)
    a, b = rng.choice(rows, k), rng.choice(rows, k)
    chain = rng.choice(rows, k // 4)  # chains: a → b → c
    a, b = np.r_[a, chain, b[: k // 4]], np.r_[b, b[: k // 4], rng.choice(rows, k // 4)]
    ok = a != b
    uid = joined["uid"].combine_chunks()
    pairs = pa.table([uid.take(pa.array(a[ok])), uid.take(pa.array(b[ok])),
                      pa.array(rng.uniform(0.95, 1.0, ok.sum()).astype(np.float32))], schema=SEMANTIC_PAIR_SCHEMA)  # fmt: skip
    return scores, pairs


def prepare(folder: Path, args) -> dict:
    t = time.perf_counter()
    joined, filters, _, _, _ = synthetic_manifest(args.rows, args.radius, 0.05, 0.08, 0.02, 0.06, args.seed)
    joined = joined.append_column("domain", pa.array(np.where(np.random.default_rng(1).random(joined.num_rows) < 0.77, "plant", "general")))
    usable = joined.filter(pc.and_(joined["keep"], pc.is_valid(joined["phash"])))
    pairs = near_pair_proposals(usable["phash"].to_numpy(), usable["phash_mirror"].to_numpy(), args.radius)
    scores, semantic = model_proposals(joined, args, np.random.default_rng(args.seed + 1))
    for name, table in (("joined", joined), ("filters", filters), ("near_pairs", pairs), ("model_scores", scores), ("semantic_pairs", semantic)):
        write_parquet(table, folder / f"{name}.parquet")
    return {"rows": joined.num_rows, "near_pairs": pairs.num_rows, "semantic_pairs": semantic.num_rows,
            "prepare_s": round(time.perf_counter() - t, 1)}  # fmt: skip


def child(folder: Path, with_model: bool, radius: int) -> None:
    """One timed decide_to_parquet run (in its own process: its peak RSS is its own)."""
    from plantmix.curate.decide import MODEL_DECIDE_COLUMNS, ModelProposals, decide_to_parquet

    t = time.perf_counter()
    filters, pairs = pq.read_table(folder / "filters.parquet"), pq.read_table(folder / "near_pairs.parquet")
    model = None
    if with_model:  # read as the decide stage reads them
        model = ModelProposals(pq.read_table(folder / "model_scores.parquet", columns=MODEL_DECIDE_COLUMNS),
                               pq.read_table(folder / "semantic_pairs.parquet"))  # fmt: skip
    out = folder / ("manifest_model.parquet" if with_model else "manifest.parquet")
    decide_to_parquet(folder / "joined.parquet", filters, pairs, DedupConfig(phash_radius=radius), PRIORITY, None, out, model)
    m = pq.read_table(out, columns=["drop_reason"])
    counts = {r["values"]: r["counts"] for r in m["drop_reason"].value_counts().to_pylist()}
    print(json.dumps({"wall_s": time.perf_counter() - t, "reasons": {str(k): v for k, v in counts.items()}}))


def run_child(argv: list[str]) -> dict:
    """Run this script with `argv` in a fresh process: its JSON output line plus its own peak RSS."""
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"child {argv} failed ({status})")
    return {**json.loads(out), "peak_rss_gib": usage.ru_maxrss / 2**20}


def timed_child(folder: Path, with_model: bool, radius: int) -> dict:
    return run_child(["--child", str(folder), "--radius", str(radius), *(["--with-model"] if with_model else [])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--clip-share", type=float, default=0.05, help="share of rows proposed clip_score_low")
    ap.add_argument("--relevance-share", type=float, default=0.03, help="share of rows proposed plant_in_general / not_a_plant")
    ap.add_argument("--eval-share", type=float, default=0.001, help="share of rows overlapping an eval set")
    ap.add_argument("--semantic-share", type=float, default=0.04, help="semantic pairs per row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--with-model", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.with_model, args.radius)
        return
    if args.prepare:
        print(json.dumps(prepare(args.prepare, args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_model_decide_") as tmp:
        folder = Path(tmp)
        # each step in its own process: the synthetic tables are gone before the timed runs start
        info = run_child([*sys.argv[1:], "--prepare", str(folder)])
        print(f"{info['rows']:,} rows, {info['near_pairs']:,} near pairs, {info['semantic_pairs']:,} semantic pairs "
              f"(prepared in {info['prepare_s']} s, peak RSS {info['peak_rss_gib']:.2f} GiB)")  # fmt: skip
        without = timed_child(folder, False, args.radius)
        with_model = timed_child(folder, True, args.radius)
    for name, r in (("without model proposals", without), ("with model proposals", with_model)):
        print(f"decide {name:<24} {r['wall_s']:8.1f} s   peak RSS {r['peak_rss_gib']:6.2f} GiB")
    print(f"ratio with / without: time {with_model['wall_s'] / without['wall_s']:.2f}x, "
          f"peak RSS {with_model['peak_rss_gib'] / without['peak_rss_gib']:.2f}x")
    print("drop reasons with model proposals:", json.dumps(dict(sorted(with_model["reasons"].items(), key=lambda kv: -kv[1]))))


if __name__ == "__main__":
    main()
