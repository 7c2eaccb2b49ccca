"""File-level entry points behind `plantmix mixlaw fit` and `suggest`: points file → mixlaw.json
and mixlaw.png; mixlaw.json → suggest.json."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from plantmix.core.errors import PlantmixError
from plantmix.mixlaw.fit import MixingLaw, fit_law
from plantmix.mixlaw.plot import plot_law
from plantmix.mixlaw.points import average_seeds, final_step, read_points, select_metric
from plantmix.mixlaw.steplaw import predict_at_step
from plantmix.mixlaw.suggest import MAX_REPEAT_EPOCHS, PoolLimit, Suggestion, suggest_critical, suggest_weighted


def fit_points_file(
    points: Path, out_dir: Path, metric: str | None = None, target_step: int | None = None,
    pool: PoolLimit | None = None,
) -> MixingLaw:
    """Fit the law on a points file; write OUT/mixlaw.json and OUT/mixlaw.png."""
    frame, metric = select_metric(read_points(points), metric, where=str(points))
    info: dict[str, Any] = {"points": str(points)}
    if target_step is not None:
        averaged, info["step_law"] = predict_at_step(average_seeds(frame), target_step)
    else:
        averaged = average_seeds(final_step(frame))
    if pool is not None:
        info["pool"] = asdict(pool)
    law = fit_law(averaged, metric, info)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    law.write(out_dir / "mixlaw.json")
    plot_law(law, out_dir / "mixlaw.png")
    return law


def pool_limit(law: MixingLaw, plant_rows: int | None, target_total: int | None, max_epochs: float | None) -> PoolLimit | None:
    """The repeat bound from options, falling back to the pool recorded in mixlaw.json."""
    stored = dict(law.info.get("pool") or {})
    values = {"plant_rows": plant_rows, "target_total": target_total, "max_epochs": max_epochs}
    merged = {k: v if v is not None else stored.get(k) for k, v in values.items()}
    if merged["plant_rows"] is None and merged["target_total"] is None:
        return None
    if merged["plant_rows"] is None or merged["target_total"] is None:
        raise PlantmixError("the repeat bound needs both --plant-pool and --target-total")
    if merged["target_total"] <= 0 or merged["plant_rows"] < 0:
        raise PlantmixError("--target-total must be positive and --plant-pool non-negative")
    return PoolLimit(int(merged["plant_rows"]), int(merged["target_total"]), float(merged["max_epochs"] or MAX_REPEAT_EPOCHS))


def suggest_to_file(
    law_dir: Path,
    weights: dict[str, float] | None = None,
    tolerance: float | None = None,
    reference_ratio: float | None = None,
    reference_loss: float | None = None,
    pool: PoolLimit | None = None,
    out: Path | None = None,
) -> tuple[Suggestion, Path]:
    """r* by one objective (weights, or the critical proportion), written to suggest.json."""
    law = MixingLaw.read(law_dir)
    if (weights is None) == (tolerance is None):
        raise PlantmixError("give exactly one objective: --weights D=W,... or --general-tolerance T")
    if weights is not None:
        if reference_ratio is not None or reference_loss is not None:
            raise PlantmixError("--reference-ratio / --reference-loss go with --general-tolerance, not --weights")
        suggestion = suggest_weighted(law, weights, pool)
    else:
        suggestion = suggest_critical(law, tolerance, reference_ratio, reference_loss, pool)
    law_dir = Path(law_dir)
    target = Path(out) if out else (law_dir if law_dir.is_dir() else law_dir.parent) / "suggest.json"
    return suggestion, suggestion.write(target)
