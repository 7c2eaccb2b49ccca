"""`dalip adapt`: k-shot adaptation of a frozen model, over seeded folds, against the usual baselines.

Protocol (DESIGN §9): features are computed once and cached (`features/` in the output directory,
keyed by the model's fingerprint and the dataset's file listing). The test split is either given
(`--test`) or made by a seeded, per-class split of the dataset; the split works on groups of identical
images (same sha256), so no image can be both support and test, and a given test split removes its
images from the support pool. Fold f draws, per class, a seeded random order of the pool; the k-shot
support set is its first k images (so supports nest across k within a fold). Every method sees the
same features, supports and test images. Outputs: `adapt.json` (per method and k: top-1 mean, std and
per fold, chosen hyperparameters), `adapt.md` (a table with the chance level), `adapt.png`
(accuracy vs shots) and `splits.json` (the sha256 of every test and support image).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field, field_validator

from dalip.atomic import atomic_path, check_output_dir, write_text_atomic
from dalip.config import MAX_BATCH, MAX_SEED, MAX_WORKERS, Device, StrictConfig
from dalip.data import stable_seed
from dalip.encoders import Encoder, fingerprint_of, load_encoder
from dalip.errors import DalipError
from dalip.evaluate import SCORE_LABELS
from dalip.fewshot import METHOD_LABELS, METHODS, Task, accuracy
from dalip.labelled import DatasetSpec, Embedded, class_embeddings, describe, embed_labelled

log = logging.getLogger(__name__)

FEATURES = ("first", "second", "combined")
CACHE_VERSION = 1  # bump when what a feature cache holds changes


class AdaptConfig(StrictConfig):
    dataset: DatasetSpec
    test: Optional[DatasetSpec] = Field(None, description="explicit test split [a seeded split of the dataset]")
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    folds: int = Field(5, ge=1, le=1000)
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    features: Literal["first", "second", "combined"] = "first"
    alpha: float = Field(0.5, ge=0, le=1, description="combined features: weight of the first order")
    test_fraction: float = Field(0.5, gt=0, lt=1, description="share of each class held out as test (no --test)")
    seed: int = Field(0, ge=0, lt=MAX_SEED)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    workers: int = Field(0, ge=0, le=MAX_WORKERS)
    device: Device = "auto"

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        return list(dict.fromkeys(methods))

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, shots: list[int]) -> list[int]:
        if not shots or any(k < 1 for k in shots):
            raise ValueError(f"shot counts must be positive integers, got {shots}")
        return sorted(set(shots))


# ---------------------------------------------------------------------------------------------------
# Features, cached


def listing_fingerprint(path: str) -> str:
    """(relative path, size, mtime) of every file under a dataset path: changes when its files do."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return fingerprint_of([f"{p.relative_to(root) if p != root else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files])


def cached_embedding(encoder: Encoder, spec: DatasetSpec, cfg: AdaptConfig, device, cache_dir: Path) -> tuple[Embedded, tuple]:
    """(embedded images, (W1, W2) class text embeddings), from the cache when the inputs are unchanged."""
    key = fingerprint_of([str(CACHE_VERSION), encoder.info["fingerprint"], str(encoder.preprocess), spec.model_dump_json(), listing_fingerprint(spec.path)])
    path = cache_dir / f"{spec.name}-{key[:16]}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return Embedded(**stored["embedded"]), tuple(stored["text"])
    log.info("embedding %s", spec.name)
    embedded = embed_labelled(encoder, spec, device, cfg.batch_size, cfg.workers)
    text = class_embeddings(encoder, embedded.classnames, embedded.templates, device)
    with atomic_path(path) as tmp:
        torch.save({"embedded": dataclasses.asdict(embedded), "text": list(text)}, tmp)
    return embedded, text


def select_features(z1, z2, kind: str, alpha: float, what: str) -> torch.Tensor:
    """First, second or combined features; combined = [√α z1, √(1−α) z2], whose dot product is the
    combined similarity α·s1 + (1−α)·s2 and whose rows stay unit-norm."""
    if kind == "first":
        return z1
    if z2 is None:
        raise DalipError(f"--features {kind}: the model has no second-order (MBDC) {what} embeddings; use --features first")
    if kind == "second":
        return z2
    return torch.cat([math.sqrt(alpha) * z1, math.sqrt(1 - alpha) * z2], dim=1)


# ---------------------------------------------------------------------------------------------------
# Splits


def _groups_by_class(sha256: list[str], labels: torch.Tensor) -> dict[int, list[list[int]]]:
    """Per class, groups of indices of identical images (a group goes to its first image's class)."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(sha256):
        groups.setdefault(h, []).append(i)
    by_class: dict[int, list[list[int]]] = {}
    for members in groups.values():
        by_class.setdefault(int(labels[members[0]]), []).append(members)
    return by_class


def make_test_split(embedded: Embedded, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(pool, test) indices: per class, a seeded share of its distinct images (all copies together)."""
    pool, test = [], []
    for c, groups in sorted(_groups_by_class(embedded.sha256, embedded.labels).items()):
        groups.sort(key=lambda g: stable_seed(seed, "test-split", embedded.sha256[g[0]]))
        n_test = min(len(groups) - 1, max(1, round(fraction * len(groups)))) if len(groups) > 1 else 0
        for j, members in enumerate(groups):
            (test if j < n_test else pool).extend(members)
    return sorted(pool), sorted(test)


def fold_orders(pool: list[int], labels: torch.Tensor, folds: int, seed: int) -> list[dict[int, list[int]]]:
    """Per fold, per class: the pool's images of that class in a seeded random order."""
    by_class: dict[int, list[int]] = {}
    for i in pool:
        by_class.setdefault(int(labels[i]), []).append(i)
    orders = []
    for f in range(folds):
        fold = {}
        for c, members in sorted(by_class.items()):
            members = list(members)
            random.Random(stable_seed(seed, "fold", f, c)).shuffle(members)
            fold[c] = members
        orders.append(fold)
    return orders


def _check_layout(embedded: Embedded, pool: list[int], shots: list[int]) -> None:
    if embedded.num_classes < 2:
        raise DalipError(f"dataset {embedded.name} has {embedded.num_classes} class; few-shot classification needs at least 2")
    counts = {c: 0 for c in range(embedded.num_classes)}
    for i in pool:
        counts[int(embedded.labels[i])] += 1
    smallest = min(counts, key=counts.get)
    if max(shots) > counts[smallest]:
        raise DalipError(
            f"--shots {max(shots)} exceeds the smallest class of the support pool: {embedded.classes[smallest]!r} has "
            f"{counts[smallest]} image(s) after the test split; use --shots up to {counts[smallest]}"
        )


# ---------------------------------------------------------------------------------------------------
# Driver


def _device(name: str) -> torch.device:
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def _align_test(train: Embedded, test: Embedded) -> torch.Tensor:
    """The test set's labels in the training set's class order."""
    index = {c: i for i, c in enumerate(train.classes)}
    missing = sorted(set(test.classes) - set(index))
    if missing:
        raise DalipError(f"test set {test.name} has classes the dataset lacks: {missing[:5]}")
    return torch.tensor([index[test.classes[int(y)]] for y in test.labels], dtype=torch.long)


@dataclass
class TestSplit:
    pool: list[int]  # dataset indices the supports are drawn from
    features: torch.Tensor
    labels: torch.Tensor
    sha256: list[str]
    info: dict[str, Any]


def _test_split(encoder: Encoder, data: Embedded, feats: torch.Tensor, cfg: AdaptConfig, device, cache_dir: Path) -> TestSplit:
    """The given test set (its images removed from the pool) or a seeded split of the dataset."""
    if cfg.test is None:
        pool, test_idx = make_test_split(data, cfg.test_fraction, cfg.seed)
        info = {"source": f"seeded split (fraction {cfg.test_fraction}, seed {cfg.seed})", "num_samples": len(test_idx)}
        return TestSplit(pool, feats[test_idx], data.labels[test_idx], [data.sha256[i] for i in test_idx], info)
    test_set, _ = cached_embedding(encoder, cfg.test, cfg, device, cache_dir)
    held = set(test_set.sha256)
    pool = [i for i, h in enumerate(data.sha256) if h not in held]
    info = {**describe(test_set), "source": "given", "removed_from_pool": len(data.sha256) - len(pool)}
    features = select_features(test_set.z1, test_set.z2, cfg.features, cfg.alpha, "image")
    return TestSplit(pool, features, _align_test(data, test_set), test_set.sha256, info)


def _run_folds(data: Embedded, feats: torch.Tensor, text: torch.Tensor, split: TestSplit, cfg: AdaptConfig):
    """(results per method and shot count, splits.json content)."""
    from rich.progress import track

    orders = fold_orders(split.pool, data.labels, cfg.folds, cfg.seed)
    results: dict[str, dict[str, Any]] = {m: {} for m in cfg.methods}
    splits: dict[str, Any] = {"test": split.sha256, "folds": [{} for _ in orders]}
    jobs = [(f, k) for f in range(len(orders)) for k in cfg.shots]
    for f, k in track(jobs, description="adapt", disable=not sys.stderr.isatty(), console=None):
        support = [i for c in sorted(orders[f]) for i in orders[f][c][:k]]
        splits["folds"][f][str(k)] = [data.sha256[i] for i in support]
        task = Task(feats[support], data.labels[support], split.features, text, seed=stable_seed(cfg.seed, "train", f, k) % 2**31)
        for method in cfg.methods:
            logits, chosen = METHODS[method](task)
            entry = results[method].setdefault(str(k), {"per_fold": [], "chosen": []})
            entry["per_fold"].append(accuracy(logits.float(), split.labels))
            entry["chosen"].append(chosen)
        if k == cfg.shots[-1]:
            log.info("fold %d/%d done", f + 1, cfg.folds)
    for by_shot in results.values():
        for entry in by_shot.values():
            runs = entry["per_fold"]
            entry["mean"] = statistics.fmean(runs)
            entry["std"] = statistics.stdev(runs) if len(runs) > 1 else 0.0
    return results, splits


def run_adapt(model: str | Path, cfg: AdaptConfig, out_dir: Path) -> dict[str, Any]:
    """Run every method at every shot count over the folds; writes the outputs and returns adapt.json."""
    started = time.perf_counter()
    device = _device(cfg.device)
    out_dir = check_output_dir(out_dir)
    encoder = load_encoder(model, device)
    data, (w1, w2) = cached_embedding(encoder, cfg.dataset, cfg, device, out_dir / "features")
    text = select_features(w1, w2, cfg.features, cfg.alpha, "text")
    feats = select_features(data.z1, data.z2, cfg.features, cfg.alpha, "image")
    split = _test_split(encoder, data, feats, cfg, device, out_dir / "features")
    _check_layout(data, split.pool, cfg.shots)
    if not len(split.labels):
        raise DalipError(f"dataset {data.name}: the test split is empty (each class needs at least 2 distinct images)")
    results, splits = _run_folds(data, feats, text, split, cfg)
    report = {
        "model": encoder.info,
        "dataset": describe(data),
        "test": split.info,
        "features": cfg.features,
        "alpha": cfg.alpha if cfg.features == "combined" else None,
        "shots": cfg.shots,
        "folds": cfg.folds,
        "seed": cfg.seed,
        "num_classes": data.num_classes,
        "chance": 1 / data.num_classes,
        "pool_size": len(split.pool),
        "test_size": len(split.labels),
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_adapt(report, splits, out_dir)
    return report


# ---------------------------------------------------------------------------------------------------
# Outputs


def _features_label(report: dict[str, Any]) -> str:
    label = SCORE_LABELS[report["features"]]
    return f"{label} (α = {report['alpha']})" if report["features"] == "combined" else label


def adapt_table(report: dict[str, Any]) -> str:
    """Markdown: one row per method, one column per shot count, top-1 % mean ± std over folds."""
    shots = report["shots"]
    head = "| Method | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    lines = [head, "|---|" + "---:|" * len(shots)]
    for method, by_shot in report["results"].items():
        cells = [f"{100 * by_shot[str(k)]['mean']:.1f} ± {100 * by_shot[str(k)]['std']:.1f}" for k in shots]
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    lines.append("| Chance | " + " | ".join(f"{100 * report['chance']:.1f}" for _ in shots) + " |")
    model, data = report["model"], report["dataset"]
    caption = (
        f"Top-1 accuracy (%) on {data['name']} ({report['num_classes']} classes, {report['test_size']} test images, "
        f"{report['test']['source']}), mean ± std over {report['folds']} folds; model {model['name']} "
        f"({model['kind']}), {_features_label(report)} features."
    )
    return caption + "\n\n" + "\n".join(lines) + "\n"


def plot_adapt(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = report["shots"]
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = list(report["results"])
    for j, method in enumerate(methods):
        by_shot = report["results"][method]
        means = [100 * by_shot[str(k)]["mean"] for k in shots]
        stds = [100 * by_shot[str(k)]["std"] for k in shots]
        nudge = 1 + 0.04 * (j - (len(methods) - 1) / 2)  # methods with equal scores stay visible
        ax.errorbar([k * nudge for k in shots], means, yerr=stds, marker="o", capsize=3, label=METHOD_LABELS[method])
    ax.axhline(100 * report["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("labelled images per class (shots)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{report['dataset']['name']}: {report['model']['name']} ({_features_label(report)} features)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_adapt(report: dict[str, Any], splits: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("adapt.json", "adapt.md", "adapt.png", "splits.json")}
    write_text_atomic(paths["adapt.json"], json.dumps(report, indent=1))
    write_text_atomic(paths["adapt.md"], adapt_table(report))
    write_text_atomic(paths["splits.json"], json.dumps(splits))
    plot_adapt(report, paths["adapt.png"])
    return paths
