"""DALIP loss vs the CLIP baseline: same data, steps, batch and learning-rate schedule, several seeds.

Trains the tiny config with `--loss dalip` and `--loss clip` for each seed on the same shards, then
evaluates zero-shot top-1 on a held-out ImageFolder (the demo world's `eval/` with classnames.json).
Prints mean ± std of top-1 per loss and score kind, and the wall time per run. No claim about which
wins: on a few minutes of CPU training the difference is noise-sized.

    python benchmarks/bench_dalip_vs_clip.py \\
        --train-data builds/demo/mixes/demo/shards --eval-dir builds/demo/demo_world/eval
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from dalip.config import load_train_config
from dalip.evaluate import DatasetSpec, EvalConfig, evaluate
from dalip.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-data", required=True, help="training shards (e.g. builds/demo/mixes/demo/shards)")
    ap.add_argument("--eval-dir", required=True, help="held-out ImageFolder with classnames.json")
    ap.add_argument("--model", default="dalip-tiny")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--runs-dir", default=None, help="keep the runs here [temporary directory]")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="bench-dalip-"))
    eval_cfg = EvalConfig(
        datasets=[DatasetSpec(name="heldout", path=args.eval_dir, kind="imagefolder", domain="plant")], alpha=args.alpha
    )
    results: dict[str, list[dict]] = {"dalip": [], "clip": []}
    for seed in args.seeds:
        for loss in ("dalip", "clip"):
            cfg = load_train_config(None, dict(
                train_data=args.train_data, model=args.model, name=f"{loss}-seed{seed}", runs_dir=str(runs_dir),
                loss=loss, alpha=args.alpha, seed=seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                warmup=args.warmup, workers=args.workers, save_every=args.steps, keep_checkpoints=1, progress=False,
            ))  # fmt: skip
            start = time.perf_counter()
            summary = train(cfg)
            train_s = time.perf_counter() - start
            scores = evaluate(cfg.run_dir, eval_cfg, label=cfg.name)["zero_shot"]["heldout"]
            row = {
                "seed": seed, "train_s": train_s, "final_loss": summary["loss"],
                **{kind: scores[kind]["top1"] for kind in ("first", "second", "combined")},
            }  # fmt: skip
            results[loss].append(row)
            print(f"{loss:5s} seed {seed}: top-1 first {row['first']:.3f} second {row['second']:.3f} "
                  f"combined {row['combined']:.3f}  final loss {row['final_loss']:.3f}  train {train_s:.0f} s", flush=True)

    def mean_std(xs: list[float]) -> str:
        return f"{100 * statistics.mean(xs):.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0.0):.1f}"

    print(f"\nzero-shot top-1 (%) on {args.eval_dir}, {args.steps} steps × {args.batch_size}, seeds {args.seeds}")
    print("| loss | first-order | second-order | combined | train s/run |")
    print("|---|---:|---:|---:|---:|")
    for loss, rows in results.items():
        cells = [mean_std([r[k] for r in rows]) for k in ("first", "second", "combined")]
        print(f"| {loss} | " + " | ".join(cells) + f" | {statistics.mean(r['train_s'] for r in rows):.0f} |")
    print("(the clip baseline never trains its MBDC heads: its second-order column is a random-head control)")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
