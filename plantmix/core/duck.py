"""The one place that opens DuckDB: with the recipe's threads, memory limit and spill directory."""

from __future__ import annotations

from pathlib import Path

import duckdb

from plantmix.core.recipe import ResourcesConfig


def spill_dir(resources: ResourcesConfig, build_dir: Path) -> Path:
    """Where DuckDB spills for a build: `resources.spill_dir` (relative to the build) or <build>/.spill."""
    path = Path(resources.spill_dir or ".spill").expanduser()
    return path if path.is_absolute() else Path(build_dir) / path


def connect(resources: ResourcesConfig | None = None, spill: Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection bounded by `resources`; beyond its memory limit it spills to `spill`."""
    resources = resources or ResourcesConfig()
    config = {"threads": resources.threads, "memory_limit": resources.memory_limit}
    if spill is not None:
        Path(spill).mkdir(parents=True, exist_ok=True)
        config["temp_directory"] = str(spill)
    return duckdb.connect(config=config)


def sql_quote(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"
