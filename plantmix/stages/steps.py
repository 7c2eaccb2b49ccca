"""The build's data-in stages, declared once: ingest, download, hashes, join (see plantmix.build)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

from plantmix.core.errors import PlantmixError
from plantmix.core.stage import Stage
from plantmix.stages.download import download_source
from plantmix.stages.hashes import HASH_VERSION, hash_shards
from plantmix.core.duck import spill_dir
from plantmix.stages.ingest import ingest_to_parquet, resolve_source_path, taxonomy_path
from plantmix.stages.join import join_to_parquet


def _source_inputs(ctx) -> list[Path]:
    paths = []
    for s in ctx.recipe.sources:
        p = resolve_source_path(s, ctx.base_dir, ctx.demo_dir)
        if s.format == "webdataset":
            from plantmix.stages.sources import expand_shards

            paths.extend(expand_shards(p, s.name))
        else:
            paths.append(_readable(Path(p), s.name, "path", directory=s.format != "url_list"))
        if s.taxonomy:
            paths.append(_readable(taxonomy_path(s, ctx.base_dir, ctx.demo_dir), s.name, "taxonomy table", directory=False))
    return paths


def _readable(path: Path, source: str, what: str, directory: bool) -> Path:
    """`path`, checked to be what the source reads (a file, or a folder) and readable: the ingest
    fingerprint reads it before any reader would say so."""
    if not path.exists():
        raise PlantmixError(f"source '{source}': {what} not found: {path}")
    if path.is_dir() != directory:
        raise PlantmixError(f"source '{source}': {what} {path} is {'not ' if directory else ''}a directory")
    if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
        raise PlantmixError(f"source '{source}': no permission to read {what} {path}")
    return path


def ingest_stage(ctx) -> Stage:
    recipe = ctx.recipe

    out = ctx.path("candidates.parquet")

    def run() -> None:  # streams into `out`: memory bounded by resources.batch_rows, not by the input
        ingest_to_parquet(recipe, ctx.base_dir, ctx.path("extracted"), ctx.demo_dir, out, spill_dir(recipe.resources, ctx.build_dir))

    return Stage(
        "ingest", "read every source into candidates.parquet", out, run, inputs=lambda: _source_inputs(ctx),
        params={"sources": [s.model_dump(mode="json") for s in recipe.sources], "seed": recipe.seed,
                "schemes": recipe.download.allowed_schemes},
        version=3,  # 2: columnar ingest (csv values read as text); 3: namespaced uids, collapsed captions, max_rows counted
    )  # fmt: skip


def download_stage(ctx) -> Stage:
    """One img2dataset run per source; each keeps its own marker, so this stage is managed."""
    candidates = ctx.path("candidates.parquet")

    def run() -> bool:
        did = False
        with progress_bar(ctx.console) as progress:
            for source in ctx.recipe.sources:
                rows = fetchable_rows(candidates, source.name)
                task = progress.add_task(f"download {source.name}", total=None)
                summary = download_source(
                    rows, ctx.path("download", source.name), ctx.recipe.download, _url_rewrite(ctx, rows.num_rows),
                    progress=lambda done, total, t=task: progress.update(t, completed=done, total=total),
                )  # fmt: skip
                if summary.get("skipped"):
                    progress.update(task, completed=1, total=1, description=f"download {source.name} (done)")
                did |= not summary.get("skipped")
        return did

    def count() -> str:
        tars = list(ctx.path("download").glob("*/*.tar"))
        return f"{len(tars):,} shards"

    return Stage("download", "img2dataset per source", ctx.path("download"), run, managed=True, count=count)


def _url_rewrite(ctx, rows: int) -> dict[str, str] | None:
    """The demo world's fixed URL prefix → its loopback server, started once per build when needed."""
    if ctx.demo_dir is None or not rows:
        return None
    if ctx.demo_url is None:
        from plantmix.demo import DEMO_BASE_URL
        from plantmix.demo.server import serve_world

        ctx.demo_url = {DEMO_BASE_URL: ctx.stack.enter_context(serve_world(ctx.demo_dir))}
    return ctx.demo_url


def hashes_stage(ctx) -> Stage:
    def run() -> bool:
        with progress_bar(ctx.console) as progress:
            task = progress.add_task("perceptual hashes (shards)", total=None)
            return hash_shards(
                ctx.path("download"), ctx.path("hashes"), workers=ctx.recipe.resources.workers,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )  # fmt: skip

    def count() -> str:
        return f"{len(list(ctx.path('hashes').glob('*/*.parquet'))):,} shard hash files (v{HASH_VERSION})"

    return Stage("hashes", "pHash per downloaded image", ctx.path("hashes"), run, managed=True, count=count)


def join_stage(ctx) -> Stage:
    candidates = ctx.path("candidates.parquet")

    def inputs() -> list[Path]:
        markers = sorted(ctx.path("download").glob("*.done.json")) + sorted(ctx.path("hashes").glob("*/*.done.json"))
        return [candidates, *markers]

    return Stage(
        "join", "downloads and hashes onto candidates", ctx.path("stages", "joined.parquet"),
        lambda: join_to_parquet(candidates, ctx.build_dir, ctx.path("stages", "joined.parquet"), ctx.recipe.resources),
        inputs=inputs, version=3,
    )  # fmt: skip


def progress_bar(console: Console, *extra: ProgressColumn) -> Progress:
    """The build's progress bars: task, bar, done/total, any `extra` columns, elapsed time."""
    return Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn(),
        console=console, transient=False,
    )


def fetchable_rows(candidates_path: Path, source: str):
    """The rows of `source` that go to the downloader: not dropped at ingest."""
    candidates = pq.read_table(candidates_path, columns=["uid", "url", "path", "caption", "source", "drop_reason"])
    rows = candidates.filter(pc.and_(pc.equal(candidates["source"], source), pc.is_null(candidates["drop_reason"])))
    return rows.select(["uid", "url", "path", "caption"])
