"""CLIP score (DESIGN §3): cosine of a row's image and caption embeddings, and its per-domain threshold.

A domain's threshold is a fixed minimum cosine (`min`) or comes from `top_fraction` the way DataComp
filters its pool: sort the domain's scored rows by score, descending, and take the score of the
ceil(fraction · n)-th; rows scoring at least that are kept, so ties at the threshold all stay. Rows
without embeddings (failed downloads) have no score and are never rejected here.
"""

from __future__ import annotations

import math

import numpy as np

from plantmix.core.recipe import ClipScoreConfig
from plantmix.core.schema import DOMAINS

_CHUNK = 1 << 18  # rows per dot product: bounds the float32 temporaries


def clip_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Row-wise cosine of L2-normalised image and text embeddings, as float32."""
    out = np.empty(len(image), np.float32)
    for s in range(0, len(image), _CHUNK):
        i = image[s : s + _CHUNK].astype(np.float32)
        t = text[s : s + _CHUNK].astype(np.float32)
        out[s : s + _CHUNK] = np.einsum("ij,ij->i", i, t)
    return out


def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float | None:
    """The score of the ceil(fraction · n)-th best row (None for no scored rows)."""
    scores = scores[~np.isnan(scores)]
    if not len(scores):
        return None
    k = max(1, math.ceil(fraction * len(scores)))
    return float(np.sort(scores)[::-1][k - 1])


def domain_thresholds(scores: np.ndarray, domain: np.ndarray, cfg: ClipScoreConfig) -> dict[str, float | None]:
    """Threshold per domain (None: the domain keeps every row). `scores` NaN where a row has none."""
    out: dict[str, float | None] = {}
    for d in DOMAINS:
        if d in cfg.min:
            out[d] = float(cfg.min[d])
        elif d in cfg.top_fraction:
            out[d] = top_fraction_threshold(scores[domain == d], cfg.top_fraction[d])
        else:
            out[d] = None
    return out


def clip_low(scores: np.ndarray, domain: np.ndarray, thresholds: dict[str, float | None]) -> np.ndarray:
    """True where a scored row lies below its domain's threshold."""
    low = np.zeros(len(scores), bool)
    for d, t in thresholds.items():
        if t is not None:
            low |= (domain == d) & (scores < np.float32(t))  # NaN compares False: unscored rows pass
    return low
