"""Plant relevance (DESIGN §3, §7): how much an image looks like a plant, and what that means per domain.

Prototypes: plant — every distinct caption-template text of the build's plant taxa (e.g. "a photo of
Quercus robur."), the recipe's `plant_prompts`, and the images of `support_dir`; general — the
recipe's `general_prompts`. With s_p, s_g an image's largest cosine to a plant and a general
prototype, plant_score = softmax over the two sets at temperature T: 1 / (1 + exp(-(s_p - s_g) / T)).
Taking the best prototype of each set (not a sum over prototypes) keeps thousands of species names
from outvoting a handful of general prompts. Support images compare image to image, where cosines
run higher than image to text, so they widen the plant side: add them when the prompts miss a domain.

With `support_k` = k > 0 the score uses images alone, a k-nearest-neighbour vote that needs no prompt
to name what a domain looks like: (m_p - m_g + 1) / 2 with m_p, m_g the mean cosine of the image's k
nearest plant (`support_dir`) and non-plant (`general_support_dir`) support images.

Routing with `centroids` > 0 (DataComp's image-based filter): faiss k-means over the pool's image
embeddings; a cluster is plant when its centroid scores at least the threshold, or when it is the
nearest cluster of a support image; every row of the cluster follows it.

Policy per `check` domain: a general row counted as plant is `plant_in_general` (with `route: move` it
is moved to the plant domain instead); a plant row not counted as plant is `not_a_plant` (always a
drop: its caption names a species its image does not show).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plantmix.core.recipe import RelevanceConfig
from plantmix.core.schema import DROP_NOT_A_PLANT, DROP_PLANT_IN_GENERAL, TAXON_COLUMNS
from plantmix.stages.captions import caption_variants

TAXA_COLUMNS = [*TAXON_COLUMNS, "common_name"]
_CHUNK_CELLS = 1 << 24  # image × prototype similarities computed at once


def taxon_prompts(taxa: pa.Table) -> list[str]:
    """The distinct caption-template texts of the distinct taxa in `taxa` (taxon_* and common_name columns), sorted."""
    if not taxa.num_rows:
        return []
    import duckdb

    con = duckdb.connect()
    con.register("t", taxa.select(TAXA_COLUMNS))
    distinct = con.sql(f"SELECT DISTINCT {', '.join(TAXA_COLUMNS)} FROM t").to_arrow_table()
    texts: set[str] = set()
    for v in caption_variants({c: distinct[c].combine_chunks().cast(pa.string()) for c in TAXA_COLUMNS}).values():
        texts.update(x for x in v.to_pylist() if x)
    return sorted(texts)


def best_cosine(x: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Each row's largest cosine to any prototype (float32; -1 when there are none)."""
    out = np.full(len(x), -1.0, np.float32)
    if not len(prototypes) or not len(x):
        return out
    p = np.ascontiguousarray(prototypes, np.float32)
    step = max(1, _CHUNK_CELLS // len(p))
    for s in range(0, len(x), step):
        out[s : s + step] = (x[s : s + step].astype(np.float32) @ p.T).max(axis=1)
    return out


def plant_scores(x: np.ndarray, plant: np.ndarray, general: np.ndarray, temperature: float) -> np.ndarray:
    """plant_score in [0, 1] of each embedding (module doc)."""
    margin = (best_cosine(x, plant) - best_cosine(x, general)) / np.float32(temperature)
    return (1 / (1 + np.exp(-np.clip(margin, -80, 80)))).astype(np.float32)


def nearest_mean(x: np.ndarray, support: np.ndarray, k: int) -> np.ndarray:
    """Each row's mean cosine to its k nearest support vectors (all of them when there are fewer)."""
    k = min(k, len(support))
    out = np.empty(len(x), np.float32)
    p = np.ascontiguousarray(support, np.float32)
    step = max(1, _CHUNK_CELLS // max(1, len(p)))
    for s in range(0, len(x), step):
        sims = x[s : s + step].astype(np.float32) @ p.T
        out[s : s + step] = np.partition(sims, len(p) - k, axis=1)[:, len(p) - k :].mean(axis=1)
    return out


def knn_plant_scores(x: np.ndarray, plant_support: np.ndarray, general_support: np.ndarray, k: int) -> np.ndarray:
    """plant_score in [0, 1] by the k nearest support images of each side (module doc)."""
    return ((nearest_mean(x, plant_support, k) - nearest_mean(x, general_support, k) + 1) / 2).astype(np.float32)


def plant_clusters(
    x: np.ndarray, k: int, seed: int, score: Callable[[np.ndarray], np.ndarray], support: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each row, whether each cluster counts as plant) for `centroids` routing (module doc);
    `score` gives embeddings their plant_score."""
    from plantmix.curate.semdedup import kmeans

    centroids, cluster = kmeans(x, k, seed)
    is_plant = score(centroids) >= np.float32(threshold)
    if len(support):
        is_plant[np.argmax(np.ascontiguousarray(support, np.float32) @ centroids.T, axis=1)] = True
    return cluster, is_plant


def relevance_reasons(domain: np.ndarray, counted_plant: np.ndarray, scored: np.ndarray, cfg: RelevanceConfig):
    """(reason, route_to) per row as object arrays (None where nothing is proposed)."""
    reason = np.full(len(domain), None, object)
    route_to = np.full(len(domain), None, object)
    if "general" in cfg.check:
        hit = scored & (domain == "general") & counted_plant
        reason[hit] = DROP_PLANT_IN_GENERAL
        if cfg.route == "move":
            route_to[hit] = "plant"
    if "plant" in cfg.check:
        reason[scored & (domain == "plant") & ~counted_plant] = DROP_NOT_A_PLANT
    return reason, route_to


def leakage_report(rows: pa.Table, out_dir: Path) -> Path:
    """reports/relevance/leakage.csv: per source, scored rows, flagged rows and their share, moved rows,
    and the plant-score quartiles; plus plant_scores.png (score histograms per source)."""
    import duckdb
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.csv as pacsv

    from plantmix.report import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.register("r", rows.select(["source", "domain", "plant_score", "relevance_reason", "route_to"]))
    table = con.sql(
        """SELECT source, domain, count(plant_score) AS scored,
                  count(relevance_reason) AS flagged,
                  coalesce(count(relevance_reason) / nullif(count(plant_score), 0), 0) AS flagged_share,
                  count(route_to) AS moved,
                  quantile_cont(plant_score, 0.25) AS plant_score_q25, median(plant_score) AS plant_score_median,
                  quantile_cont(plant_score, 0.75) AS plant_score_q75
           FROM r GROUP BY 1, 2 ORDER BY 2 DESC, 1"""
    ).to_arrow_table()
    path = out_dir / "leakage.csv"
    pacsv.write_csv(table, path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for source in table["source"].to_pylist():
        s = rows.filter(pc.equal(rows["source"], source))["plant_score"].drop_null().to_numpy()
        if len(s):
            ax.hist(s, bins=40, range=(0, 1), histtype="step", label=source)
    ax.set(title="plant_score per source", xlabel="plant_score", ylabel="rows")
    if table.num_rows:
        ax.legend()
    save_figure(fig, out_dir / "plant_scores.png")
    return path

