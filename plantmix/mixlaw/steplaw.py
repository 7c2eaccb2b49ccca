"""Nested step law (DESIGN §5, optional): per ratio L(s) = c_r + (s0_r / s)^α with α shared across
ratios, fitted on validation losses logged at several steps of short proxy runs; it predicts the loss
at a target step, and the mixing law is then fitted on those predictions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from plantmix.core.errors import PlantmixError

MIN_STEPS = 3  # two parameters per ratio plus the shared exponent
_ALPHA_STARTS = (0.25, 0.5, 1.0, 2.0)


def _unpack(p: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    return np.exp(p[:n]), np.exp(p[n : 2 * n]), float(np.exp(p[-1]))


def fit_step_law(rows: pd.DataFrame) -> dict[str, Any]:
    """rows: one domain's seed-averaged (ratio, step, loss). Returns alpha and per-ratio c, s0."""
    ratios = sorted(rows["ratio"].unique())
    for r in ratios:
        steps = rows.loc[rows["ratio"] == r, "step"].nunique()
        if steps < MIN_STEPS:
            raise PlantmixError(f"step law: ratio {r:g} has {steps} distinct step(s); need at least {MIN_STEPS}")
    if (rows["step"] <= 0).any():
        raise PlantmixError("step law: steps must be positive")
    index = rows["ratio"].map({r: i for i, r in enumerate(ratios)}).to_numpy()
    step, loss = rows["step"].to_numpy(float), rows["loss"].to_numpy(float)
    n = len(ratios)

    def objective(p: np.ndarray) -> float:
        c, s0, alpha = _unpack(np.clip(p, -50, 50), n)
        pred = c[index] + (s0[index] / step) ** alpha
        return float(np.sum((np.log(pred) - np.log(loss)) ** 2))

    best = None
    floor = np.array([rows.loc[rows["ratio"] == r, "loss"].min() for r in ratios])
    for alpha0 in _ALPHA_STARTS:
        x0 = np.r_[np.log(0.5 * floor), np.log(np.full(n, step.min())), math.log(alpha0)]
        res = minimize(objective, x0, method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-15})
        if best is None or res.fun < best.fun:
            best = res
    c, s0, alpha = _unpack(best.x, n)
    return {"alpha": alpha, "ratios": {float(r): {"c": float(c[i]), "s0": float(s0[i])} for i, r in enumerate(ratios)},
            "rms_log_residual": float(math.sqrt(best.fun / len(loss)))}  # fmt: skip


def predict_at_step(averaged: pd.DataFrame, target_step: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per domain and ratio the step law's loss at `target_step` (one row per ratio, as fit_law takes)."""
    if target_step <= 0:
        raise PlantmixError(f"--target-step must be positive; got {target_step}")
    if "step" not in averaged.columns:
        raise PlantmixError("--target-step needs a 'step' column in the points")
    out, info = [], {}
    for domain, rows in averaged.groupby("domain", sort=True):
        law = fit_step_law(rows)
        info[str(domain)] = law
        for r, p in law["ratios"].items():
            seeds = int(rows.loc[rows["ratio"] == r, "seeds"].min())
            pred = p["c"] + (p["s0"] / target_step) ** law["alpha"]
            out.append({"domain": domain, "ratio": r, "loss": pred, "loss_std": 0.0, "seeds": seeds})
    return pd.DataFrame(out), {"target_step": int(target_step), "domains": info}
