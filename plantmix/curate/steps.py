"""The build's curation stages, declared once: filter and dedup propose, decide decides, report reports."""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.stage import Stage
from plantmix.curate.decide import MODEL_DECIDE_COLUMNS, ModelProposals, decide_to_parquet
from plantmix.curate.dedup import PAIR_SCHEMA, near_pair_proposals
from plantmix.curate.filters import filter_proposals
from plantmix.curate.split import check_held_out, read_held_out

DECIDE_VERSION = 2  # 2: collapsed captions join the kept row's captions


def _joined(ctx):
    return ctx.path("stages", "joined.parquet")


def filter_stage(ctx) -> Stage:
    cfg = ctx.recipe.filters
    columns = ["uid", "keep", "width", "height", "original_width", "original_height", "caption", "collapsed_captions"]
    return Stage(
        "filter", "image and caption rules", ctx.path("proposals", "filters.parquet"),
        lambda: filter_proposals(pq.read_table(_joined(ctx), columns=columns), cfg),
        inputs=lambda: [_joined(ctx)], params={"cfg": cfg.model_dump()}, version=2,  # 2: collapsed captions checked
        count=lambda: _proposal_count(ctx.path("proposals", "filters.parquet")),
    )  # fmt: skip


def _proposal_count(path) -> str:
    t = pq.read_table(path, columns=["image_reason", "caption_reason"])
    return f"{t.num_rows - t['image_reason'].null_count:,} image / {t.num_rows - t['caption_reason'].null_count:,} caption rejections proposed"


def dedup_stage(ctx) -> Stage:
    cfg = ctx.recipe.dedup

    def run():
        t = pq.read_table(_joined(ctx), columns=["keep", "phash", "phash_mirror"])
        t = t.filter(pc.and_(t["keep"], pc.is_valid(t["phash"])))
        if not cfg.near:
            return PAIR_SCHEMA.empty_table()
        mirror = t["phash_mirror"].to_numpy() if cfg.mirror else None
        return near_pair_proposals(t["phash"].to_numpy(), mirror, cfg.phash_radius)

    out = ctx.path("proposals", "near_pairs.parquet")
    return Stage(
        "dedup", "near-duplicate pHash pairs", out, run, inputs=lambda: [_joined(ctx)],
        params={"near": cfg.near, "radius": cfg.phash_radius, "mirror": cfg.mirror},
        count=lambda: f"{pq.read_metadata(out).num_rows:,} near pairs proposed",
    )  # fmt: skip


def decide_stage(ctx) -> Stage:
    recipe = ctx.recipe
    priority = {s.name: s.priority for s in recipe.sources}
    proposals = [ctx.path("proposals", "filters.parquet"), ctx.path("proposals", "near_pairs.parquet")]

    held_dir = ctx.path("proposals", "held_out")
    # the score stage's proposals, when the recipe has model-based curation
    model_files = [ctx.path("proposals", "model_scores.parquet"), ctx.path("proposals", "semantic_pairs.parquet")] if recipe.has_model_checks else []

    def run() -> None:
        held = read_held_out(held_dir)
        check_held_out(held, pq.read_table(_joined(ctx), columns=["uid"])["uid"], held_dir)
        model = None
        if model_files:
            model = ModelProposals(pq.read_table(model_files[0], columns=MODEL_DECIDE_COLUMNS), pq.read_table(model_files[1]))
        decide_to_parquet(_joined(ctx), *(pq.read_table(p) for p in proposals), recipe.dedup, priority, held, out, model)

    out = ctx.path("manifest.parquet")

    def count() -> str:
        t = pq.read_table(out, columns=["keep", "label_conflict"])
        kept = pc.sum(t["keep"]).as_py() or 0
        conflicts = pc.sum(t["label_conflict"]).as_py() or 0
        return f"{t.num_rows:,} rows, {kept:,} kept, {conflicts:,} in label-conflict groups"

    return Stage(
        "decide", "the one decision", out, run,
        inputs=lambda: [_joined(ctx), *proposals, *model_files, *([held_dir] if held_dir.is_dir() else [])],
        params={"dedup": recipe.dedup.model_dump(), "priority": priority}, version=DECIDE_VERSION, count=count,
    )  # fmt: skip


def report_stage(ctx) -> Stage:
    from plantmix.report import write_reports

    manifest = ctx.path("manifest.parquet")
    out = ctx.path("reports", "funnel.parquet")
    priority = {s.name: s.priority for s in ctx.recipe.sources}

    return Stage(
        "report", "funnel, label conflicts, plots", out, lambda: write_reports(ctx.build_dir, priority),
        inputs=lambda: [manifest], params={"priority": priority},
        count=lambda: f"{ctx.path('reports')}/: funnel.csv, label_conflicts.csv, PNG plots",
    )  # fmt: skip
