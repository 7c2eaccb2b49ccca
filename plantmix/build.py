"""`plantmix build`: a recipe becomes a list of stages (DESIGN §3), run in order, finished ones skipped.

ingest → download → hashes → join → filter → dedup → decide → report → mix. Curation stages write
proposals under `proposals/`; only `decide` writes keep / drop_reason / dup_of into manifest.parquet,
so changing a filter threshold reruns filter and decide, not the pair search. `--dry-run`, `--until`
and the console read this same list.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pyarrow.parquet as pq
import yaml
from pydantic import ValidationError
from rich.console import Console

from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import DownloadConfig, Recipe
from plantmix.core.recipe import _format_error as format_validation_error
from plantmix.core.lock import directory_lock
from plantmix.core.stage import Stage, StageResult, atomic_write_text, remove_stale_temporaries, run_stage
from plantmix.report import funnel, funnel_table, make_console

_PACKAGES = ("plantmix-dalip", "img2dataset", "duckdb", "pyarrow", "webdataset", "open_clip_torch", "imagehash", "torch")

# name → what it does; the build's stages in order (the dry-run plan prints the same list).
STAGE_DESCRIPTIONS = {
    "ingest": "read every source into candidates.parquet (uid, provenance, captions)",
    "download": "img2dataset → download/<source>/NNNNN.tar (+ .parquet, _stats.json)",
    "hashes": "pHash (and mirror pHash) of every downloaded image → hashes/<source>/",
    "embed": "scorer model's image and caption embeddings per download tar (clip-retrieval) → embeddings/<source>/",
    "join": "download results and hashes onto every candidate → stages/joined.parquet",
    "filter": "image size/aspect and caption rules → proposals/filters.parquet",
    "dedup": "near-duplicate pHash pairs (mirrors included) → proposals/near_pairs.parquet",
    "score": "CLIP score, plant relevance, SemDeDup pairs, eval overlap → proposals/model_scores.parquet, semantic_pairs.parquet",
    "decide": "row-level rejections, then duplicate groups by the keep rule → manifest.parquet",
    "report": "funnel, label conflicts and plots → reports/",
    "mix": "seeded, nested selection per mix → shuffled webdataset shards + dataset card",
}
STAGES = tuple(STAGE_DESCRIPTIONS)


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_lock(recipe: Recipe, build_dir: Path) -> None:
    lock = {"recipe_hash": recipe.hash(), "packages": package_versions(), "recipe": recipe.model_dump(mode="json")}
    atomic_write_text(build_dir / "recipe.lock.yaml", yaml.safe_dump(lock, sort_keys=False, allow_unicode=True))


@dataclass
class BuildContext:
    """What the stages of one build share."""

    recipe: Recipe
    build_dir: Path
    base_dir: Path
    demo_dir: Path | None
    console: Console
    stack: contextlib.ExitStack
    demo_url: dict[str, str] | None = None  # the demo world's URL prefix → its live loopback server

    def path(self, *parts: str) -> Path:
        return self.build_dir.joinpath(*parts)


def build_stages(ctx: BuildContext) -> list[Stage]:
    """The stages of a recipe, in order."""
    from plantmix.curate import steps as curate
    from plantmix.stages import steps

    recipe = ctx.recipe
    out = [steps.ingest_stage(ctx), steps.download_stage(ctx), steps.hashes_stage(ctx)]
    if recipe.scorer is not None:  # embeddings only when a model-based check needs them
        from plantmix.embed.steps import embed_stage

        out.append(embed_stage(ctx))
    out += [steps.join_stage(ctx), curate.filter_stage(ctx), curate.dedup_stage(ctx)]
    if recipe.has_model_checks:
        from plantmix.curate.model_steps import score_stage

        out.append(score_stage(ctx))
    out += [curate.decide_stage(ctx), curate.report_stage(ctx)]
    if ctx.recipe.mix:
        from plantmix.mix.steps import mix_stage

        out.append(mix_stage(ctx))
    return out


def run_build(
    recipe: Recipe,
    build_dir: Path,
    distributor: str | None = None,
    until: str | None = None,
    recipe_path: Path | None = None,
    console: Console | None = None,
) -> Path:
    """Run (or resume) every stage of `recipe` in `build_dir`; return the manifest path (or the last output)."""
    if until is not None and until not in STAGES:
        raise PlantmixError(f"--until must be one of {', '.join(STAGES)}; got '{until}'")
    console = console or make_console(stderr=True)
    if distributor:
        allowed = get_args(DownloadConfig.model_fields["distributor"].annotation)
        if distributor not in allowed:
            raise PlantmixError(f"--distributor must be one of {', '.join(allowed)}; got '{distributor}'")
        recipe = recipe.model_copy(update={"download": recipe.download.model_copy(update={"distributor": distributor})})
    build_dir = Path(build_dir)
    existing = next((p for p in (build_dir, *build_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise PlantmixError(f"--out {build_dir}: {'exists' if existing == build_dir else f'{existing} exists'} and is not a directory")
    with directory_lock(build_dir, "plantmix build"):
        return _run_locked(recipe, build_dir, until, recipe_path, console)


def _run_locked(recipe: Recipe, build_dir: Path, until: str | None, recipe_path: Path | None, console: Console) -> Path:
    base_dir = Path(recipe_path).resolve().parent if recipe_path else Path.cwd()
    remove_stale_temporaries(build_dir)
    console.rule(f"plantmix build {recipe.name} → {build_dir}")
    demo_dir = None
    if recipe.demo_world is not None:
        from plantmix.demo.world import generate_world

        with console.status("generating the demo world"):
            demo_dir = generate_world(build_dir / "demo_world", recipe.demo_world).resolve()
    last = build_dir
    with contextlib.ExitStack() as stack:
        ctx = BuildContext(recipe, build_dir, base_dir, demo_dir, console, stack)
        for stage in build_stages(ctx):
            with console.status(f"{stage.name}: {stage.describe}"):
                result = run_stage(stage)
            _say(console, result)
            last = stage.output
            if stage.name == until:
                break
    write_lock(recipe, build_dir)  # only once the stages it describes have succeeded
    if until in (None, "decide", "report", "mix"):
        from plantmix.stages.ingest import over_max_rows

        manifest = pq.read_table(build_dir / "manifest.parquet")
        capped = over_max_rows(build_dir / "candidates.parquet")
        console.print(funnel_table(funnel(manifest, capped), title=f"Funnel — {recipe.name}"))
        return build_dir / "manifest.parquet"
    return last


def _say(console: Console, r: StageResult) -> None:
    state = f"ran in {r.seconds:,.1f} s" if r.ran else "skipped (up to date)"
    console.print(f"[green]✓[/] {r.name:<9} {state:<22} {r.summary}", highlight=False)


def read_lock(build_dir: Path) -> dict:
    """A build's recipe.lock.yaml, checked to be a lock file (a mapping with a `recipe` mapping)."""
    path = Path(build_dir) / "recipe.lock.yaml"
    if not path.is_file():
        raise PlantmixError(f"{build_dir}: not a build directory (no recipe.lock.yaml)")
    try:
        lock = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PlantmixError(f"{path}: cannot read the lock file: {str(e).splitlines()[0]}") from None
    if not isinstance(lock, dict) or not isinstance(lock.get("recipe"), dict):
        raise PlantmixError(f"{path}: not a plantmix lock file (no `recipe:` mapping)")
    return lock


def lock_recipe(build_dir: Path) -> Recipe:
    """The recipe a build was made with (from its lock file), validated."""
    try:
        return Recipe.model_validate(read_lock(build_dir)["recipe"])
    except ValidationError as e:
        raise PlantmixError(format_validation_error(Path(build_dir) / "recipe.lock.yaml", e)) from None
