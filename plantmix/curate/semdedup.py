"""SemDeDup (Abbas et al., 2023): semantic duplicate proposals from image embeddings.

faiss k-means (spherical, seeded) clusters the image embeddings; within a cluster every pair with
cosine > 1 - epsilon is proposed as (uid_a, uid_b, cosine). The decision step keeps one row per
group by the keep rule. The ε report counts, per ε, the rows that have a better row (keep-rule order)
in their cluster within cosine 1 - ε: SemDeDup's own removal count, which is an upper bound on what
the greedy decision removes (a row whose better twin was itself removed may stay).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

SEMANTIC_PAIR_SCHEMA = pa.schema([pa.field("uid_a", pa.string()), pa.field("uid_b", pa.string()), pa.field("cosine", pa.float32())])
KMEANS_ITERATIONS = 20
KMEANS_POINTS_PER_CENTROID = 256  # faiss' default training sample per centroid
_ASSIGN_CHUNK = 1 << 18
_BLOCK_CELLS = 1 << 24  # similarity-matrix cells computed at once (64 MiB of float32)


def default_clusters(n: int) -> int:
    """About sqrt(n / 20) clusters (SemDeDup's clusters hold thousands of rows at web scale), at least 1."""
    return max(1, round(math.sqrt(n / 20)))


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k', d) L2-normalised, cluster of each row) by faiss spherical k-means; k' = min(k, n).

    Trained on a seeded sample of at most 256 rows per centroid (what faiss would sample itself), then
    every row is assigned in float32 chunks, so float16 embeddings are never copied whole to float32.
    """
    import faiss

    k = max(1, min(k, len(x)))
    sample = KMEANS_POINTS_PER_CENTROID * k
    train = x if len(x) <= sample else x[np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False))]
    km = faiss.Kmeans(x.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=KMEANS_POINTS_PER_CENTROID)  # fmt: skip
    km.train(np.ascontiguousarray(train, np.float32))
    assign = np.empty(len(x), np.int32)
    for s in range(0, len(x), _ASSIGN_CHUNK):
        _, a = km.index.search(np.ascontiguousarray(x[s : s + _ASSIGN_CHUNK], np.float32), 1)
        assign[s : s + _ASSIGN_CHUNK] = a[:, 0]
    return km.centroids.copy(), assign


def semantic_pairs(
    image: np.ndarray, cluster: np.ndarray, rank: np.ndarray, epsilon: float,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs within a cluster with cosine > 1 - epsilon, and each row's largest cosine to a better row.

    `rank`: keep-rule rank of each row (smaller = better). Returns (a, b, cosine, best_better) with a, b
    row positions (a the better of the two) and best_better = max cosine to a better row of the same
    cluster (-1 when none), for the ε report.
    """
    order = np.lexsort((rank, cluster))
    bounds = np.r_[0, np.nonzero(np.diff(cluster[order]))[0] + 1, len(order)]
    best = np.full(len(image), -1.0, np.float32)
    out_a, out_b, out_c = [], [], []
    limit = np.float32(1 - epsilon)
    for c, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        members = order[s:e]  # best first
        x = image[members].astype(np.float32)
        step = max(1, _BLOCK_CELLS // len(members))
        for q0 in range(1, len(members), step):
            q = np.arange(q0, min(q0 + step, len(members)))
            sim = x[q] @ x[: q[-1]].T  # row q against the better rows 0..q-1 (masked below)
            sim[np.arange(q[-1])[None, :] >= q[:, None]] = -np.inf
            best[members[q]] = sim.max(axis=1)
            qi, pi = np.nonzero(sim > limit)
            out_a.append(members[pi])
            out_b.append(members[q[qi]])
            out_c.append(sim[qi, pi])
        if progress:
            progress(c + 1, len(bounds) - 1)
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), best
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_c).astype(np.float32), best


def pair_table(uid: pa.Array, a: np.ndarray, b: np.ndarray, cosine: np.ndarray) -> pa.Table:
    """The proposals file: uid pairs, sorted by (a, b) row position so reruns give the same bytes."""
    o = np.lexsort((b, a))
    return pa.table([uid.take(pa.array(a[o])), uid.take(pa.array(b[o])), pa.array(cosine[o], pa.float32())],
                    schema=SEMANTIC_PAIR_SCHEMA)  # fmt: skip


def epsilon_sweep(best_better: np.ndarray, epsilons: list[float]) -> pa.Table:
    """Rows SemDeDup would remove at each ε: those with a better row in their cluster above 1 - ε."""
    n = len(best_better)
    removed = [int(np.sum(best_better > np.float32(1 - e))) for e in epsilons]
    return pa.table({"epsilon": pa.array(epsilons, pa.float64()), "rows": pa.array([n] * len(epsilons), pa.int64()),
                     "removed": pa.array(removed, pa.int64()),
                     "fraction": pa.array([r / n if n else 0.0 for r in removed], pa.float64())})  # fmt: skip


def write_sweep_report(sweep: pa.Table, out_dir: Path, epsilon: float) -> list[Path]:
    """reports/semdedup/epsilon_sweep.csv and .png (removal fraction against ε, the chosen ε marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.csv as pacsv

    from plantmix.report import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "epsilon_sweep.csv"
    pacsv.write_csv(sweep, csv)
    fig, ax = plt.subplots(figsize=(6, 4))
    d = sweep.to_pydict()
    ax.plot(d["epsilon"], d["fraction"], marker="o")
    ax.axvline(epsilon, color="tab:red", linestyle="--", label=f"recipe ε = {epsilon:g}")
    ax.set(title="SemDeDup: share of rows with a better twin within 1 − ε", xlabel="ε", ylabel="fraction removed")
    ax.legend()
    return [csv, save_figure(fig, out_dir / "epsilon_sweep.png")]
