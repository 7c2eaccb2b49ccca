"""`dalip adapt` cost: a first run (features computed) against a rerun (features from the cache), and
the time per method, on an ImageFolder with a random-init open_clip model (or any MODEL).

    python benchmarks/bench_adapt.py [--model ViT-B-32] [--classes 10] [--per-class 24] [--folds 5]
        [--shots 1,2,4,8] [--threads 2]

Prints the seconds of each phase and the ratio first run / cached rerun.
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

from dalip.adapt import AdaptConfig, run_adapt  # noqa: E402
from dalip.fewshot import METHODS  # noqa: E402
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
        out = Path(tmp) / "out"
        start = time.perf_counter()
        first = run_adapt(args.model, cfg, out)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        run_adapt(args.model, cfg, out)
        cached_s = time.perf_counter() - start
        print(f"{args.classes} classes x {args.per_class} images, {args.folds} folds, shots {shots}, model {args.model}")
        print(f"first run (features computed): {first_s:.1f} s")
        print(f"rerun (features cached):       {cached_s:.1f} s   ratio first/cached {first_s / cached_s:.2f}x")
        for method in METHODS:
            one = AdaptConfig(dataset=cfg.dataset, shots=shots, folds=args.folds, methods=[method], device="cpu")
            start = time.perf_counter()
            run_adapt(args.model, one, out)
            print(f"  {method:>12}: {time.perf_counter() - start:.1f} s (cached features, model load included)")
        print(f"test images: {first['test_size']}, support pool: {first['pool_size']}")


if __name__ == "__main__":
    main()
