"""Fitting L(r) = c + k·exp(t·r) per validation domain (DESIGN §5, after Ye et al. 2024).

Two candidates per domain, the one with the smaller leave-one-ratio-out error is kept:
- two-stage (their released procedure): c from a grid of values in [0, min L) maximising
  |corr(r, log(L − c))|, then log(L − c) = t·r + log k by L-BFGS on a Huber loss from many starts;
- joint: (log c, log k, t) together by L-BFGS on a Huber loss of log-residuals, from many starts.
scipy's L-BFGS-B line search (Moré–Thuente) enforces the strong Wolfe conditions, as their
torch.optim.LBFGS(line_search_fn="strong_wolfe") does.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from plantmix.core.errors import PlantmixError
from plantmix.core.stage import atomic_write_text

LAW_FORM = "L(r) = c + k * exp(t * r)"
C_GRID = 1000
STARTS = 121  # 11 x 11 start grid
REFINED_STARTS = 8
HUBER_DELTA = 0.02
MIN_LOO_RATIOS = 4  # leaving one out must leave three points for three parameters
METHODS = ("two_stage", "joint")
_EXP_MAX = 50.0  # line-search probes far out must neither overflow nor reach a zero prediction
_LBFGS = {"maxiter": 300, "ftol": 1e-15, "gtol": 1e-10}


@dataclass(frozen=True)
class Law:
    """One domain's fitted law."""

    c: float
    k: float
    t: float

    def __call__(self, r: np.ndarray | float) -> np.ndarray | float:
        return self.c + self.k * np.exp(self.t * np.asarray(r, dtype=float))


def _huber(x: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber values and derivatives of residuals x."""
    a = np.abs(x)
    value = np.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))
    return value, np.clip(x, -delta, delta)


def _best_of_starts(objective: Callable, starts: np.ndarray, refine: int = REFINED_STARTS) -> np.ndarray:
    """L-BFGS from the `refine` starts with the lowest objective; the parameters of the lowest result.

    Every start is scored; only the most promising are refined, which keeps a leave-one-out pass
    over many starts fast without losing the basins the grid finds.
    """
    scores = np.array([objective(x0)[0] for x0 in starts])
    best, best_value = None, math.inf
    for x0 in starts[np.argsort(np.where(np.isfinite(scores), scores, np.inf), kind="stable")[:refine]]:
        res = minimize(objective, x0, jac=True, method="L-BFGS-B", options=_LBFGS)
        if np.all(np.isfinite(res.x)) and res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    if best is None:
        raise PlantmixError("mixing-law fit did not converge from any start")
    return best


def fit_two_stage(r: np.ndarray, loss: np.ndarray, delta: float = HUBER_DELTA, starts: int = STARTS) -> Law:
    """c by the correlation grid, then (t, log k) by Huber regression of log(L − c) on r."""
    grid = np.linspace(0.0, loss.min(), C_GRID, endpoint=False)
    logs = np.log(loss[None, :] - grid[:, None])
    rc, lc = r - r.mean(), logs - logs.mean(axis=1, keepdims=True)
    denom = np.sqrt((rc**2).sum() * (lc**2).sum(axis=1))
    corr = np.abs(lc @ rc) / np.where(denom > 0, denom, np.inf)
    c = float(grid[int(np.argmax(corr))])
    y = np.log(loss - c)

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        value, d = _huber(p[0] * r + p[1] - y, delta)
        return float(value.sum()), np.array([(d * r).sum(), d.sum()])

    side = int(round(math.sqrt(starts)))
    t0 = np.linspace(-5.0, 5.0, side)
    logk0 = np.linspace(y.min() - 2.0, y.max() + 2.0, side)
    t, log_k = _best_of_starts(objective, np.array([(a, b) for a in t0 for b in logk0]))
    return Law(c, float(math.exp(log_k)), float(t))


def fit_joint(r: np.ndarray, loss: np.ndarray, delta: float = HUBER_DELTA, starts: int = STARTS) -> Law:
    """(log c, log k, t) minimising the Huber loss of log(c + k·exp(t·r)) − log L."""
    log_loss = np.log(loss)

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        c, kexp = np.exp(np.clip(p[0], -_EXP_MAX, _EXP_MAX)), np.exp(np.clip(p[1] + p[2] * r, -_EXP_MAX, _EXP_MAX))
        pred = c + kexp
        value, d = _huber(np.log(pred) - log_loss, delta)
        w = d / pred
        return float(value.sum()), np.array([(w * c).sum(), (w * kexp).sum(), (w * kexp * r).sum()])

    side = int(round(math.sqrt(starts)))
    start_points = []
    for frac in np.linspace(0.02, 0.98, side):
        c0 = frac * loss.min()
        for t0 in np.linspace(-5.0, 5.0, side):
            e = np.exp(t0 * r)  # least-squares k for this (c, t), kept positive
            k0 = max(float(((loss - c0) * e).sum() / (e * e).sum()), 1e-6 * loss.min())
            start_points.append((math.log(c0), math.log(k0), t0))
    p = _best_of_starts(objective, np.array(start_points))
    return Law(float(math.exp(p[0])), float(math.exp(p[1])), float(p[2]))


FITTERS: dict[str, Callable[..., Law]] = {"two_stage": fit_two_stage, "joint": fit_joint}


def leave_one_ratio_out(method: str, r: np.ndarray, loss: np.ndarray) -> np.ndarray | None:
    """Prediction at each ratio from a fit on the other ratios (None with too few ratios)."""
    if len(np.unique(r)) < MIN_LOO_RATIOS:
        return None
    preds = np.empty(len(r))
    for i, ratio in enumerate(r):
        rest = r != ratio
        preds[i] = FITTERS[method](r[rest], loss[rest])(ratio)
    return preds


@dataclass
class DomainFit:
    """The kept law of one domain, its points and how well it predicts held-out ratios."""

    domain: str
    method: str
    c: float
    k: float
    t: float
    loo_mean_abs_rel_error: float | None
    residual_rmse: float
    points: list[dict[str, Any]]  # ratio, loss, loss_std, seeds, predicted, residual, loo_predicted
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def law(self) -> Law:
        return Law(self.c, self.k, self.t)


def _mean_abs_rel(pred: np.ndarray | None, loss: np.ndarray) -> float | None:
    return None if pred is None else float(np.mean(np.abs(pred - loss) / loss))


def fit_domain(domain: str, averaged: pd.DataFrame) -> DomainFit:
    """Both candidates on one domain's seed-averaged points (one row per ratio); the better kept."""
    rows = averaged.sort_values("ratio")
    r, loss = rows["ratio"].to_numpy(float), rows["loss"].to_numpy(float)
    candidates: dict[str, dict[str, Any]] = {}
    loo: dict[str, np.ndarray | None] = {}
    for method in METHODS:
        law = FITTERS[method](r, loss)
        loo[method] = leave_one_ratio_out(method, r, loss)
        candidates[method] = {**asdict(law), "loo_mean_abs_rel_error": _mean_abs_rel(loo[method], loss)}
    # held-out error decides; with too few ratios for it, the joint fit (no grid resolution limit)
    method = min(METHODS, key=lambda m: (candidates[m]["loo_mean_abs_rel_error"] or 0.0, m != "joint"))
    law = Law(candidates[method]["c"], candidates[method]["k"], candidates[method]["t"])
    pred = law(r)
    points = [
        {"ratio": float(a), "loss": float(b), "loss_std": float(s), "seeds": int(n), "predicted": float(p),
         "residual": float(b - p), "loo_predicted": None if loo[method] is None else float(loo[method][i])}
        for i, (a, b, s, n, p) in enumerate(zip(r, loss, rows["loss_std"], rows["seeds"], pred))
    ]  # fmt: skip
    return DomainFit(
        domain, method, law.c, law.k, law.t, candidates[method]["loo_mean_abs_rel_error"],
        float(np.sqrt(np.mean((loss - pred) ** 2))), points, candidates,
    )  # fmt: skip


@dataclass
class MixingLaw:
    """Per-domain laws plus what they were fitted on."""

    domains: dict[str, DomainFit]
    metric: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. points file, step law, plant pool

    def to_dict(self) -> dict[str, Any]:
        return {"form": LAW_FORM, "metric": self.metric, **self.info,
                "domains": {d: asdict(f) for d, f in self.domains.items()}}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MixingLaw":
        info = {k: v for k, v in data.items() if k not in ("form", "metric", "domains")}
        return cls({d: DomainFit(**f) for d, f in data["domains"].items()}, data.get("metric"), info)

    def write(self, path: Path) -> Path:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def read(cls, path: Path) -> "MixingLaw":
        path = Path(path)
        if path.is_dir():
            path = path / "mixlaw.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise PlantmixError(f"{path}: not found; run `plantmix mixlaw fit` first") from None
        except (ValueError, KeyError, TypeError) as e:
            raise PlantmixError(f"{path}: not a mixlaw.json ({e})") from None


def fit_law(averaged: pd.DataFrame, metric: str | None = None, info: dict[str, Any] | None = None) -> MixingLaw:
    """A MixingLaw from seed-averaged points (columns domain, ratio, loss, loss_std, seeds)."""
    from plantmix.mixlaw.points import check_ratio_counts

    check_ratio_counts(averaged)
    # Thousands of 3-parameter L-BFGS steps: multi-threaded BLAS only adds contention to each one.
    with threadpool_limits(1):
        fits = {str(d): fit_domain(str(d), rows) for d, rows in averaged.groupby("domain", sort=True)}
    return MixingLaw(fits, metric, dict(info or {}))
