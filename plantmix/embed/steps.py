"""The embed stage (DESIGN §3, §6): the scorer's image and caption embeddings of every download tar.

Managed like the pHashes: each tar keeps its own marker (plantmix.embed.infer), so a rerun embeds only
new or changed tars, removes the outputs of tars that disappeared, and redoes everything when the
scorer changes. With `download.distributor: pyspark` the inference runs on clip-retrieval's pyspark
strategy too (local mode, `resources.workers` cores).
"""

from __future__ import annotations

from rich.progress import TextColumn

from plantmix.core.stage import Stage
from plantmix.embed.infer import embed_sources
from plantmix.embed.store import EMBEDDINGS_DIR, finished_shards
from plantmix.stages.steps import progress_bar


def embed_stage(ctx) -> Stage:
    recipe = ctx.recipe
    sources = [s.name for s in recipe.sources]

    def run() -> bool:
        with progress_bar(ctx.console, TextColumn("{task.fields[tars]}")) as progress:
            task = progress.add_task("embed (images)", total=None, tars="")

            def show(images: int, images_total: int, tars: int, tars_total: int) -> None:
                progress.update(task, completed=images, total=max(images_total, 1), tars=f"{tars}/{tars_total} tars")

            summary = embed_sources(
                ctx.build_dir, sources, recipe.scorer, ctx.base_dir, image_key=recipe.download.encode_format,
                distributor="pyspark" if recipe.download.distributor == "pyspark" else "sequential",
                workers=recipe.resources.workers, progress=show,
            )  # fmt: skip
        if summary.engine_reason:
            ctx.console.print(f"[yellow]embed[/]: batched open_clip inference instead of clip-retrieval: {summary.engine_reason}", highlight=False)
        if summary.not_embedded:
            ctx.console.print(f"[yellow]embed[/]: {len(summary.not_embedded)} stored samples were not embedded (no caption member or undecodable; listed in their shards' markers)", highlight=False)
        return summary.did_work

    def count() -> str:
        root = ctx.path(EMBEDDINGS_DIR)
        shards = sum(len(finished_shards(root / s)) for s in sources)
        return f"{shards:,} shards embedded"

    return Stage("embed", "scorer embeddings per download tar (clip-retrieval)", ctx.path(EMBEDDINGS_DIR), run, managed=True, count=count)
