"""A small real build for the embed and mine tests: the demo world (few images, small shards, some
faults) downloaded by img2dataset and embedded by the random tiny scorer, stopped after the embed stage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from scorer_fixtures import write_tiny_scorer

ROOT = Path(__file__).resolve().parents[1]
WORLD = {"species": 4, "images_per_species": 6, "heldout_per_species": 1, "general_images": 20, "fault_rate": 0.1,
         "validation_per_species": 0, "general_validation": 0, "classify_per_class": 0, "image_size": 64,
         "pretrain_factor": 1}  # fmt: skip
_BUILT: dict[str, Path] = {}


def write_recipe(folder: Path, **scorer) -> Path:
    """recipe.yaml in `folder` (beside a random tiny scorer in `folder/scorer`): 10 samples per shard."""
    r = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    r["demo_world"].update(WORLD)
    r["download"].update({"number_sample_per_shard": 10})
    for section in ("mix", "clip_score", "relevance", "semantic_dedup", "decontaminate"):  # the embed stage alone
        r.pop(section, None)
    write_tiny_scorer(folder / "scorer")
    r["scorer"] = {"model": "scorer", "batch_size": 4, "num_workers": 2, **scorer}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def plantmix(*args: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "plantmix.cli", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def shared_build(tmp_path_factory) -> Path:
    """The build, made once per test session (tests that change it work on a `copy_build`)."""
    if "build" not in _BUILT:
        tmp = tmp_path_factory.mktemp("embed_build")
        write_recipe(tmp)
        plantmix("build", "recipe.yaml", "--out", "build", "--until", "embed", cwd=tmp)
        _BUILT["build"] = tmp / "build"
    return _BUILT["build"]


def copy_build(build: Path, dest: Path) -> Path:
    """A copy of the build's inputs to the embed stage and of its embeddings (mtimes kept, so markers hold)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("download", "embeddings"):
        shutil.copytree(build / name, dest / name)
    for name in ("candidates.parquet", "recipe.lock.yaml"):
        shutil.copy2(build / name, dest / name)
    return dest
