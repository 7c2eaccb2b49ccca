"""Suggesting the plant share r* from fitted laws (DESIGN §5): a weighted objective or the critical
proportion, bounded by how often the plant pool would repeat at the target size."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from plantmix.core.errors import PlantmixError
from plantmix.core.stage import atomic_write_text
from plantmix.mixlaw.fit import Law, MixingLaw

MAX_REPEAT_EPOCHS = 15.0  # beyond ~15 passes over a finite pool, repeated data stops paying (DESIGN §5)
_SCAN = 10_001  # grid over [lo, hi] before the bounded refinement: a sum of exponentials may have 2 minima


@dataclass(frozen=True)
class PoolLimit:
    """The plant pool bounds r: r·target_total ≤ max_epochs·plant_rows."""

    plant_rows: int
    target_total: int
    max_epochs: float = MAX_REPEAT_EPOCHS

    @property
    def max_ratio(self) -> float:
        return min(1.0, self.max_epochs * self.plant_rows / self.target_total)


@dataclass
class Suggestion:
    ratio: float
    objective: str  # "weights" or "critical_proportion"
    predicted: dict[str, float]  # per-domain predicted loss at r*
    upper_bound: float
    bounded_by_pool: bool
    details: dict[str, Any]

    def write(self, path: Path) -> Path:
        atomic_write_text(Path(path), json.dumps(asdict(self), indent=1) + "\n")
        return Path(path)


def parse_weights(text: str) -> dict[str, float]:
    """`plant=0.5,general=0.5` into a dict; one-line error otherwise."""
    weights: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq or not name.strip() or not math.isfinite(weights.get(name.strip(), math.nan)) or weights[name.strip()] < 0:
            raise PlantmixError(f"--weights expects DOMAIN=W with W ≥ 0, comma-separated; got {item!r}")
    if not weights or sum(weights.values()) <= 0:
        raise PlantmixError("--weights: give at least one positive weight, e.g. plant=0.5,general=0.5")
    return weights


def _bounds(pool: PoolLimit | None) -> tuple[float, float]:
    hi = 1.0 if pool is None else pool.max_ratio
    if hi <= 0:
        raise PlantmixError("the plant pool is empty: no plant share is possible")
    return 0.0, hi


def _laws(law: MixingLaw, names: list[str]) -> dict[str, Law]:
    missing = [d for d in names if d not in law.domains]
    if missing:
        raise PlantmixError(f"no fitted law for domain(s) {missing}; fitted: {sorted(law.domains)}")
    return {d: law.domains[d].law for d in names}


def suggest_weighted(law: MixingLaw, weights: dict[str, float], pool: PoolLimit | None = None) -> Suggestion:
    """r* minimising Σ w_i·L_i(r) on [0, upper bound]: a dense scan, then a bounded refinement."""
    laws = _laws(law, list(weights))
    lo, hi = _bounds(pool)

    def objective(r: float | np.ndarray) -> float | np.ndarray:
        return sum(w * laws[d](r) for d, w in weights.items())

    grid = np.linspace(lo, hi, _SCAN)
    i = int(np.argmin(objective(grid)))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    r = float(minimize_scalar(objective, bounds=(a, b), method="bounded", options={"xatol": 1e-10}).x) if b > a else float(a)
    by_pool = pool is not None and hi < 1.0 and r >= hi - 1e-9
    return _suggestion(law, r, "weights", hi, by_pool,
                       {"weights": weights, "objective_value": float(objective(r))})  # fmt: skip


def suggest_critical(
    law: MixingLaw,
    tolerance: float,
    reference_ratio: float | None = None,
    reference_loss: float | None = None,
    pool: PoolLimit | None = None,
    domain: str = "general",
) -> Suggestion:
    """The largest r whose general loss stays within `tolerance` (relative) of a reference.

    The bound B = (1 + tolerance)·L_ref; c + k·exp(t·r) ≤ B is solved in closed form:
    r ≤ log((B − c)/k)/t when the loss grows with r (k > 0, t > 0), r ≥ the same when it falls.
    """
    if tolerance < 0 or not math.isfinite(tolerance):
        raise PlantmixError(f"--general-tolerance must be a finite fraction ≥ 0; got {tolerance}")
    if (reference_ratio is None) == (reference_loss is None):
        raise PlantmixError("give exactly one of --reference-ratio R or --reference-loss L")
    g = _laws(law, [domain])[domain]
    if reference_ratio is not None:
        if not 0 <= reference_ratio <= 1:
            raise PlantmixError(f"--reference-ratio {reference_ratio:g} is outside [0, 1]")
        reference_loss = float(g(reference_ratio))
    if not reference_loss > 0:
        raise PlantmixError(f"--reference-loss must be positive; got {reference_loss}")
    lo, hi = _bounds(pool)
    bound = (1.0 + tolerance) * reference_loss
    if bound <= g.c or g.k == 0 or g.t == 0:
        feasible = [r for r in (lo, hi) if g(r) <= bound]
        crossing = None
    else:
        crossing = math.log((bound - g.c) / g.k) / g.t
        feasible = [r for r in (lo, hi, min(max(crossing, lo), hi)) if g(r) <= bound * (1 + 1e-12)]
    if not feasible:
        raise PlantmixError(
            f"no plant share in [{lo:g}, {hi:.4g}] keeps the {domain} loss within {tolerance:g} of {reference_loss:.4g} "
            f"(the law's floor is c = {g.c:.4g})"
        )
    r = max(feasible)
    details = {"tolerance": tolerance, "reference_ratio": reference_ratio, "reference_loss": reference_loss,
               "loss_bound": bound, "crossing_ratio": crossing, "domain": domain}  # fmt: skip
    by_pool = pool is not None and hi < 1.0 and r >= hi - 1e-12 and g(min(hi + 1e-6, 1.0)) <= bound
    return _suggestion(law, r, "critical_proportion", hi, by_pool, details)


def _suggestion(law: MixingLaw, r: float, objective: str, hi: float, by_pool: bool, details: dict) -> Suggestion:
    predicted = {d: float(f.law(r)) for d, f in law.domains.items()}
    return Suggestion(float(r), objective, predicted, float(hi), bool(by_pool), details)
