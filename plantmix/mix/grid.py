"""Ratio grids (DESIGN §5): one mix per plant share r at one total and seed, for mixing-law ablations.

Selection takes a prefix of one fixed hash order per domain, so at one seed the plant rows of a lower
ratio are a subset of a higher ratio's and the general rows the other way round; `run_mix` does the
work per ratio. Before any mix is written, a guard checks every ratio against the pool.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from plantmix.core.errors import PlantmixError
from plantmix.mix.run import run_mix
from plantmix.mix.select import read_selection_columns, select
from plantmix.mix.spec import MixSpec, make_spec
from plantmix.mixlaw.suggest import MAX_REPEAT_EPOCHS


def parse_ratios(text: str | float | list[float]) -> list[float]:
    """`0.1,0.3,0.5` (or one number, or a list) into distinct ratios in [0, 1], in the given order."""
    items = text if isinstance(text, list) else [text] if isinstance(text, (int, float)) else str(text).split(",")
    ratios: list[float] = []
    for item in items:
        try:
            r = float(str(item).strip())
        except ValueError:
            raise PlantmixError(f"--ratio expects a number or a comma list of numbers; got {item!r}") from None
        if not (0.0 <= r <= 1.0) or math.isnan(r):
            raise PlantmixError(f"--ratio {r:g} is outside [0, 1] (the plant share of the mix)")
        if r in ratios:
            raise PlantmixError(f"--ratio {r:g} is listed twice")
        ratios.append(r)
    if not ratios:
        raise PlantmixError("--ratio: give at least one ratio")
    return ratios


def grid_specs(ratios: list[float], total: int, name_prefix: str | None = None, **options: Any) -> list[MixSpec]:
    """One MixSpec per ratio; names `r<r>-n<N>-s<S>` (after `<prefix>-` when given)."""
    specs = []
    for r in ratios:
        spec = make_spec(ratio=r, total=total, **options)
        if name_prefix:
            spec = make_spec(ratio=r, total=total, **{**options, "name": f"{name_prefix}-{spec.resolved_name()}"})
        specs.append(spec)
    return specs


def available_rows(build_dir: Path, spec: MixSpec) -> dict[str, int]:
    """Eligible rows per domain (keep = true, after the spec's caps) for the spec's selection."""
    manifest = Path(build_dir) / "manifest.parquet"
    if not manifest.is_file():
        raise PlantmixError(f"{manifest}: not found; run `plantmix build` first")
    empty = spec.model_copy(update={"ratio": None, "total": None, "plant": 0, "general": 0})
    return select(read_selection_columns(manifest, empty), empty, where=str(manifest)).available


def check_repeats(specs: list[MixSpec], available: dict[str, int], max_epochs: float | None = None) -> None:
    """Name the first ratio at which a domain would be repeated beyond the limit.

    The limit is one pass over the pool without allow_repeat, else `max_epochs` (default 15).
    """
    for spec in sorted(specs, key=lambda s: s.ratio or 0.0):
        limit = (max_epochs or MAX_REPEAT_EPOCHS) if spec.allow_repeat else 1.0
        for domain, n in spec.counts().items():
            pool = available.get(domain, 0)
            epochs = math.inf if pool == 0 and n > 0 else (n / pool if pool else 0.0)
            if epochs > limit:
                hint = " (pass --allow-repeat to repeat rows)" if not spec.allow_repeat else " (--max-epochs)"
                raise PlantmixError(
                    f"ratio {spec.ratio:g}: domain '{domain}' needs {n} rows of {pool} available, "
                    f"{epochs:.3g} epochs over its pool; the limit is {limit:g}{hint}"
                )


def run_grid(
    build_dir: Path,
    ratios: list[float],
    total: int,
    name_prefix: str | None = None,
    max_epochs: float | None = None,
    workers: int = 1,
    recipe_hash: str | None = None,
    force: bool = False,
    **options: Any,
) -> list[Path]:
    """Write one mix per ratio (each resumable through run_mix); return their directories."""
    specs = grid_specs(ratios, total, name_prefix, **options)
    check_repeats(specs, available_rows(build_dir, specs[0]), max_epochs)
    return [run_mix(build_dir, spec, recipe_hash=recipe_hash, workers=workers, force=force) for spec in specs]
