"""`plantmix build`: run a recipe's stages in order (DESIGN §3), skipping finished ones.

Each stage reads the previous stage's parquet and writes its own under a temporary name, renamed
into place, with a `.done.json` marker holding the fingerprint of its inputs and parameters. A rerun
after a crash or a kill resumes at the first stage whose marker is missing or stale.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from plantmix.curate.dedup import dedup
from plantmix.stages.download import download_source
from plantmix.core.errors import PlantmixError
from plantmix.curate.filters import filter_parquet
from plantmix.stages.ingest import ingest_to_parquet, resolve_source_path, taxonomy_path
from plantmix.stages.join import hash_shards, join_manifest
from plantmix.core.duck import spill_dir
from plantmix.core.recipe import Recipe
from plantmix.report import funnel, funnel_table, make_console
from plantmix.core.stage import atomic_write_text, fingerprint, is_done, mark_done, write_parquet

STAGES = ("ingest", "download", "manifest", "dedup", "filter", "mix")
_PACKAGES = ("plantmix-dalip", "img2dataset", "duckdb", "pyarrow", "webdataset", "open_clip_torch", "imagehash", "torch")


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


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )


def _source_inputs(recipe: Recipe, base_dir: Path, demo_dir: Path | None) -> list[Path]:
    paths = []
    for s in recipe.sources:
        p = resolve_source_path(s, base_dir, demo_dir)
        if s.format == "webdataset":
            from plantmix.stages.sources import expand_shards

            paths.extend(expand_shards(p, s.name))
        else:
            if not Path(p).exists():
                raise PlantmixError(f"source '{s.name}': path not found: {p}")
            paths.append(Path(p))
        if s.taxonomy:
            paths.append(taxonomy_path(s, base_dir, demo_dir))
    return paths


def run_build(
    recipe: Recipe,
    build_dir: Path,
    distributor: str | None = None,
    until: str | None = None,
    recipe_path: Path | None = None,
    console: Console | None = None,
) -> Path:
    """Run (or resume) every stage of `recipe` in `build_dir`; return the manifest path."""
    if until is not None and until not in STAGES:
        raise PlantmixError(f"--until must be one of {', '.join(STAGES)}; got '{until}'")
    console = console or make_console(stderr=True)
    if distributor:
        recipe = recipe.model_copy(update={"download": recipe.download.model_copy(update={"distributor": distributor})})
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    base_dir = Path(recipe_path).resolve().parent if recipe_path else Path.cwd()
    write_lock(recipe, build_dir)
    console.rule(f"plantmix build {recipe.name} → {build_dir}")

    demo_dir = None
    if recipe.demo_world is not None:
        from plantmix.demo.world import generate_world

        with console.status("generating the demo world"):
            demo_dir = generate_world(build_dir / "demo_world", recipe.demo_world).resolve()

    # 1. ingest
    candidates_path = build_dir / "candidates.parquet"
    key = fingerprint(
        {"stage": "ingest", "sources": [s.model_dump(mode="json") for s in recipe.sources], "seed": recipe.seed,
         "schemes": recipe.download.allowed_schemes, "v": 2},  # v2: csv values read as text
        _source_inputs(recipe, base_dir, demo_dir),
    )
    if not is_done(candidates_path, key):
        with console.status("ingesting sources"):
            reports = ingest_to_parquet(recipe, base_dir, build_dir / "extracted", demo_dir, candidates_path,
                                        spill_dir(recipe.resources, build_dir))
        mark_done(candidates_path, key, reports=[r.__dict__ for r in reports])
    console.print(f"[green]✓[/] ingest: {pq.read_metadata(candidates_path).num_rows:,} candidates")
    if until == "ingest":
        return candidates_path

    # 2. download (one img2dataset run per source)
    candidates = pq.read_table(candidates_path)
    with contextlib.ExitStack() as stack, _progress(console) as progress:
        url_rewrite = None
        for source in recipe.sources:
            rows = candidates.filter(pc.and_(pc.equal(candidates["source"], source.name), pc.is_null(candidates["drop_reason"])))
            rows = rows.select(["uid", "url", "path", "caption"])
            task = progress.add_task(f"download {source.name}", total=None)
            if demo_dir is not None and url_rewrite is None and rows.num_rows:
                from plantmix.demo import DEMO_BASE_URL
                from plantmix.demo.server import serve_world

                url_rewrite = {DEMO_BASE_URL: stack.enter_context(serve_world(demo_dir))}
            summary = download_source(
                rows, build_dir / "download" / source.name, recipe.download, url_rewrite,
                progress=lambda done, total, t=task: progress.update(t, completed=done, total=total),
            )
            if summary.get("skipped"):
                progress.update(task, completed=1, total=1, description=f"download {source.name} (done)")
    if until == "download":
        return build_dir / "download"

    # 3. manifest: pHashes, then the join
    with _progress(console) as progress:
        task = progress.add_task("perceptual hashes (shards)", total=None)
        hash_shards(build_dir / "download", build_dir / "hashes", workers=recipe.resources.workers,
                    progress=lambda done, total: progress.update(task, completed=done, total=total))
    joined_path = build_dir / "stages" / "joined.parquet"
    markers = sorted((build_dir / "download").glob("*.done.json")) + sorted((build_dir / "hashes").glob("*/*.done.json"))
    key = fingerprint({"stage": "join", "v": 1}, [candidates_path, *markers])
    if not is_done(joined_path, key):
        with console.status("joining downloads onto candidates"):
            write_parquet(join_manifest(candidates_path, build_dir), joined_path)
        mark_done(joined_path, key)
    console.print("[green]✓[/] manifest joined")
    if until == "manifest":
        return joined_path

    # 4. dedup
    dedup_path = build_dir / "stages" / "dedup.parquet"
    priority = {s.name: s.priority for s in recipe.sources}
    key = fingerprint({"stage": "dedup", "cfg": recipe.dedup.model_dump(), "priority": priority, "v": 1}, [joined_path])
    if not is_done(dedup_path, key):
        with console.status("deduplicating (exact sha256, near pHash)"):
            write_parquet(dedup(pq.read_table(joined_path), recipe.dedup, priority), dedup_path)
        mark_done(dedup_path, key)
    console.print("[green]✓[/] dedup")
    if until == "dedup":
        return dedup_path

    # 5. filters → manifest.parquet
    manifest_path = build_dir / "manifest.parquet"
    key = fingerprint({"stage": "filter", "cfg": recipe.filters.model_dump(), "v": 1}, [dedup_path])
    if not is_done(manifest_path, key):
        filter_parquet(dedup_path, manifest_path, recipe.filters, recipe.resources.threads)
        mark_done(manifest_path, key)
    manifest = pq.read_table(manifest_path)
    console.print(funnel_table(funnel(manifest), title=f"Funnel — {recipe.name}"))
    if until == "filter" or not recipe.mix:
        return manifest_path

    # 6. mixes
    from plantmix.mix.run import run_mix

    for spec in recipe.mix:
        out = run_mix(build_dir, spec, recipe_hash=recipe.hash(), workers=recipe.resources.workers, resources=recipe.resources)
        console.print(f"[green]✓[/] mix → {out}")
    return manifest_path


def read_lock(build_dir: Path) -> dict:
    path = Path(build_dir) / "recipe.lock.yaml"
    if not path.exists():
        raise PlantmixError(f"{build_dir}: not a build directory (no recipe.lock.yaml)")
    return yaml.safe_load(path.read_text())

