"""`dalip adapt` cost: computing the features (first run) against reading them from the cache
(rerun), and the time of each method per fold and shot count, on an ImageFolder with a random-init
open_clip model (or any MODEL).

    python benchmarks/bench_adapt.py [--model ViT-B-32] [--classes 10] [--per-class 12] [--folds 2]
        [--shots 1,2,4] [--threads 2]

Prints the seconds of each phase and the ratio computed / cached.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_data import CLASSES, shape_image  # noqa: E402

from dalip.adapt import AdaptConfig, cached_embedding, fold_orders, make_test_split  # noqa: E402
from dalip.encoders import load_encoder  # noqa: E402
from dalip.fewshot import METHODS, Task  # noqa: E402
from dalip.labelled import DatasetSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=24)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--shots", default="1,2,4,8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        rng = random.Random(0)
        for i in range(args.classes):
            colour, shape = CLASSES[i % len(CLASSES)]
            folder = root / f"{i:02d}_{colour}_{shape}"
            folder.mkdir(parents=True)
            for j in range(args.per_class):
                shape_image(colour, shape, rng).save(folder / f"{j}.png")
        shots = [int(k) for k in args.shots.split(",")]
        cfg = AdaptConfig(dataset=DatasetSpec(name="shapes", path=str(root)), shots=shots, folds=args.folds, device="cpu")
        encoder = load_encoder(args.model, "cpu")
        cache = Path(tmp) / "features"
        start = time.perf_counter()
        data, (text, _) = cached_embedding(encoder, cfg.dataset, cfg, "cpu", cache)
        computed = time.perf_counter() - start
        start = time.perf_counter()
        cached_embedding(encoder, cfg.dataset, cfg, "cpu", cache)
        cached = time.perf_counter() - start
        print(f"{args.classes} classes x {args.per_class} images, model {args.model}, feature width {data.z1.shape[1]}")
        print(f"features computed: {computed:.2f} s   from the cache: {cached:.3f} s   ratio {computed / cached:.0f}x")
        pool, test = make_test_split(data, cfg.test_fraction, cfg.seed)
        orders = fold_orders(pool, data.labels, args.folds, cfg.seed)
        for k in shots:
            tasks = [Task(data.z1[s], data.labels[s], data.z1[test], text) for s in
                     ([i for c in sorted(o) for i in o[c][:k]] for o in orders)]  # fmt: skip
            for method, run in METHODS.items():
                start = time.perf_counter()
                for task in tasks:
                    run(task)
                print(f"  {k}-shot {method:>12}: {(time.perf_counter() - start) / len(tasks):.2f} s per fold")


if __name__ == "__main__":
    main()
