"""Custom open_clip architectures in every process that loads the scorer.

open_clip knows an architecture by its config JSON, registered per process (`open_clip.add_model_config`).
The build process registers it directly (`scorer.register`); processes started elsewhere — clip-retrieval's
pyspark executors — learn it from the environment: `PLANTMIX_OPEN_CLIP_CONFIGS` lists config JSON paths
(os.pathsep-separated) and `plantmix.embed.spark_daemon`, the Python daemon Spark forks its workers from,
registers them at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path

from plantmix.embed.scorer import ScorerSpec

CONFIGS_ENV = "PLANTMIX_OPEN_CLIP_CONFIGS"
SPARK_DAEMON = "plantmix.embed.spark_daemon"


def worker_env(spec: ScorerSpec) -> dict[str, str]:
    """Environment a worker process needs to load `spec`: the config list, and a PYTHONPATH finding plantmix."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)}
    if spec.config is not None:
        env[CONFIGS_ENV] = str(spec.config)
    return env


def register_from_env() -> list[str]:
    """Register every config JSON named in PLANTMIX_OPEN_CLIP_CONFIGS (unknown to open_clip yet); returns their paths."""
    paths = [p for p in os.environ.get(CONFIGS_ENV, "").split(os.pathsep) if p]
    if not paths:
        return []
    import open_clip

    for p in paths:
        if open_clip.get_model_config(Path(p).stem) is None:
            open_clip.add_model_config(p)
    return paths
