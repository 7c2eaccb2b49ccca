"""Mixing-law points: a csv or parquet of (ratio, domain, loss[, seed, step, metric]) rows, checked
and averaged over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from plantmix.core.errors import PlantmixError

REQUIRED_COLUMNS = ("ratio", "domain", "loss")
OPTIONAL_COLUMNS = ("seed", "step", "metric")
MIN_RATIOS = 3  # the law has three parameters per domain


def read_points(path: Path | str) -> pd.DataFrame:
    """The points file as a DataFrame with the required columns checked; one-line error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PlantmixError(f"{path}: points file not found")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        else:
            raise PlantmixError(f"{path}: points must be a .csv, .tsv or .parquet file")
    except (OSError, ValueError) as e:
        raise PlantmixError(f"{path}: cannot read points ({str(e).splitlines()[0]})") from None
    return check_points(frame, where=str(path))


def check_points(frame: pd.DataFrame, where: str = "points") -> pd.DataFrame:
    """Validate columns and values: ratios in [0, 1], finite positive losses, known domains."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise PlantmixError(f"{where}: missing column(s) {missing}; need {list(REQUIRED_COLUMNS)}")
    frame = frame[[c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in frame.columns]].copy()
    if frame.empty:
        raise PlantmixError(f"{where}: no points")
    for col in ("ratio", "loss"):
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = frame[col][values.isna() | ~np.isfinite(values)]
        if len(bad):
            raise PlantmixError(f"{where}: column '{col}' has a non-numeric or missing value {bad.iloc[0]!r}")
        frame[col] = values.astype(float)
    outside = frame["ratio"][(frame["ratio"] < 0) | (frame["ratio"] > 1)]
    if len(outside):
        raise PlantmixError(f"{where}: ratio {outside.iloc[0]:g} is outside [0, 1] (plant share of the mix)")
    if (frame["loss"] <= 0).any():
        raise PlantmixError(f"{where}: loss {frame['loss'][frame['loss'] <= 0].iloc[0]:g} is not positive")
    if frame["domain"].isna().any():
        raise PlantmixError(f"{where}: column 'domain' has missing values")
    frame["domain"] = frame["domain"].astype(str)
    return frame


def select_metric(frame: pd.DataFrame, metric: str | None, where: str = "points") -> tuple[pd.DataFrame, str | None]:
    """Rows of one metric: the one given, the only one present, or `combined` when several are."""
    if "metric" not in frame.columns:
        if metric is not None:
            raise PlantmixError(f"{where}: --metric {metric!r} given but the points have no 'metric' column")
        return frame, None
    present = sorted(frame["metric"].astype(str).unique())
    if metric is None:
        metric = present[0] if len(present) == 1 else "combined" if "combined" in present else None
        if metric is None:
            raise PlantmixError(f"{where}: several metrics {present}; choose one with --metric")
    if metric not in present:
        raise PlantmixError(f"{where}: no points of metric {metric!r}; present: {present}")
    return frame[frame["metric"].astype(str) == metric], metric


def final_step(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep each run's last logged step (the loss the mixing law is about when no step law is used)."""
    if "step" not in frame.columns:
        return frame
    keys = [c for c in ("domain", "ratio", "seed") if c in frame.columns]
    last = frame.groupby(keys, dropna=False)["step"].transform("max")
    return frame[frame["step"] == last]


def average_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (domain, ratio[, step]): mean loss over seeds, their standard deviation and count."""
    keys = ["domain", "ratio", *(["step"] if "step" in frame.columns else [])]
    grouped = frame.groupby(keys, sort=True)["loss"]
    out = grouped.agg(loss="mean", loss_std=lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else 0.0, seeds="count")
    return out.reset_index()


def check_ratio_counts(averaged: pd.DataFrame, where: str = "points") -> None:
    """Every domain needs at least MIN_RATIOS distinct ratios for three parameters."""
    for domain, rows in averaged.groupby("domain"):
        n = rows["ratio"].nunique()
        if n < MIN_RATIOS:
            raise PlantmixError(
                f"{where}: domain '{domain}' has {n} distinct ratio(s); the law c + k·exp(t·r) needs at least {MIN_RATIOS}"
            )
