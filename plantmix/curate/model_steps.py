"""The score stage: the model-based proposals of a build, from the scorer's embeddings (DESIGN §3).

One pass over the joined rows and `embeddings/` writes, uid-keyed and in joined order,
`proposals/model_scores.parquet` (MODEL_SCORE_SCHEMA: CLIP score and its rejection, plant score and
its rejection or move, the eval set a row overlaps, the SemDeDup cluster) and
`proposals/semantic_pairs.parquet` (uid_a, uid_b, cosine), plus reports: `reports/relevance/`
(leakage per source), `reports/semdedup/` (removal fraction per ε), `reports/decontamination/`
(matches per eval set, exclude.parquet). Only the decision step turns them into keep / drop_reason.
A row without an embedding (its download failed) gets no score and no model-based rejection.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import MODEL_CHECKS, SUPPORT_FIELDS, Recipe
from plantmix.core.stage import Stage, write_parquet
from plantmix.embed.store import EMBEDDINGS_DIR, Embeddings, read_embeddings

SCORE_VERSION = 1
MODEL_SCORE_SCHEMA = pa.schema([
    pa.field("uid", pa.string()),
    pa.field("clip_score", pa.float32()),
    pa.field("plant_score", pa.float32()),
    pa.field("clip_reason", pa.string()),  # clip_score_low
    pa.field("relevance_reason", pa.string()),  # plant_in_general / not_a_plant
    pa.field("route_to", pa.string()),  # the domain a `route: move` row moves to (with its relevance_reason)
    pa.field("eval_overlap", pa.string()),  # name of the first eval set the image overlaps
    pa.field("eval_match", pa.string()),  # exact / phash / embedding
    pa.field("eval_file", pa.string()),  # the overlapping eval image, relative to its set
    pa.field("semantic_cluster", pa.int32()),
])  # fmt: skip
# what the score stage reads of the joined rows: keep rule, hashes, domain and taxa for the prompts
_KEEP_RULE = ["width", "height", "original_width", "original_height", "stored_bytes", "original_bytes"]
Progress = Callable[[str, int, int], None]  # (task, done, total)


def model_proposals(
    joined: pa.Table, emb: Embeddings, recipe: Recipe, scorer=None, eval_roots: list[Path] = (),
    supports: dict[str, Path] | None = None, reports: Path | None = None, progress: Progress | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(model_scores, semantic_pairs) of `joined` (module doc); reports go under `reports` when given.

    `scorer` (plantmix.embed.scorer.Scorer) encodes prompts, support and eval images; it is needed only
    by relevance and by decontamination with `embedding_cosine`. `supports`: relevance's support
    image folders by side (plant, general).
    """
    from plantmix.curate.semdedup import SEMANTIC_PAIR_SCHEMA

    n = joined.num_rows
    rows, image, text = _aligned(joined, emb, recipe)
    # a fixed-width array, not one Python string per row (DOMAINS: plant or general)
    domain = np.where(pc.equal(joined["domain"].take(pa.array(rows, pa.int64())), "plant").to_numpy(zero_copy_only=False), "plant", "general")
    columns: dict[str, pa.Array] = {"uid": joined["uid"]}
    if recipe.clip_score is not None:
        columns.update(_clip(n, rows, image, text, domain, recipe))
    if recipe.relevance is not None:
        columns.update(_relevance(joined, n, rows, image, domain, recipe, scorer, supports or {}, reports))
    pairs = SEMANTIC_PAIR_SCHEMA.empty_table()
    if recipe.semantic_dedup is not None:
        cluster, pairs = _semantic(joined, rows, image, recipe, reports, progress)
        columns["semantic_cluster"] = _scatter(n, rows, cluster, pa.int32())
    if recipe.decontaminate is not None:
        columns.update(_decontaminate(joined, rows, image, recipe, scorer, eval_roots, reports, progress))
    out = [columns.get(f.name, pa.nulls(n, f.type)) for f in MODEL_SCORE_SCHEMA]
    return pa.table(out, schema=MODEL_SCORE_SCHEMA), pairs


def _aligned(joined: pa.Table, emb: Embeddings, recipe: Recipe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(joined row of each usable embedded row, its image and text embeddings), in joined order."""
    needs = _needs_scorer(recipe) or recipe.clip_score is not None or recipe.semantic_dedup is not None
    usable = joined["keep"].to_numpy(zero_copy_only=False)
    if needs and usable.any() and not len(emb):
        raise PlantmixError(f"score: no embeddings in the build's {EMBEDDINGS_DIR}/ for {int(usable.sum()):,} downloaded rows; run the embed stage")
    at = pc.index_in(emb.uid, value_set=joined["uid"].combine_chunks()) if len(emb) else pa.array([], pa.int32())
    where = pc.fill_null(at, -1).to_numpy().astype(np.int64)
    ok = where >= 0
    ok[ok] = usable[where[ok]]
    order = np.argsort(where[ok], kind="stable")
    take = np.nonzero(ok)[0][order]
    if np.array_equal(take, np.arange(len(emb))):  # the usual case: no copy of the embeddings
        return where, emb.image, emb.text
    return where[take], emb.image[take], emb.text[take]


def _scatter(n: int, rows: np.ndarray, values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A length-n column: `values` at `rows`, null elsewhere."""
    mask = np.ones(n, bool)
    mask[rows] = False
    full = np.zeros(n, values.dtype)
    full[rows] = values
    return pa.array(full, type_, mask=mask)


def _strings(n: int, rows: np.ndarray, values: np.ndarray) -> pa.Array:
    full = np.full(n, None, object)
    full[rows] = values
    return pa.array(full.tolist(), pa.string())


def _clip(n, rows, image, text, domain, recipe: Recipe) -> dict[str, pa.Array]:
    from plantmix.core.schema import DROP_CLIP_SCORE_LOW
    from plantmix.curate.clip_score import clip_low, clip_scores, domain_thresholds

    scores = clip_scores(image, text)
    low = clip_low(scores, domain, domain_thresholds(scores, domain, recipe.clip_score))
    return {"clip_score": _scatter(n, rows, scores, pa.float32()),
            "clip_reason": _strings(n, rows, np.where(low, DROP_CLIP_SCORE_LOW, None))}  # fmt: skip


def _relevance(joined, n, rows, image, domain, recipe: Recipe, scorer, supports: dict[str, Path], reports) -> dict[str, pa.Array]:
    from plantmix.curate.images import encode_files, image_files
    from plantmix.curate.relevance import (
        TAXA_COLUMNS, knn_plant_scores, leakage_report, plant_clusters, plant_scores, relevance_reasons, taxon_prompts,
    )

    cfg = recipe.relevance
    if scorer is None:
        raise PlantmixError("relevance: needs the scorer model to encode its prompts")
    support = {side: encode_files(scorer, image_files(folder, f"relevance.{SUPPORT_FIELDS[side]}"))[0]
               for side, folder in supports.items()}  # fmt: skip
    plant_support = support.get("plant", np.zeros((0, image.shape[1]), np.float32))
    if cfg.support_k:
        for side, vectors in support.items():
            if not len(vectors):
                raise PlantmixError(f"relevance: no image of {supports[side]} could be decoded")

        def score_of(x: np.ndarray) -> np.ndarray:
            return knn_plant_scores(x, support["plant"], support["general"], cfg.support_k)
    else:
        plant_rows = joined.filter(pc.equal(joined["domain"], "plant")).select(TAXA_COLUMNS)
        prototypes = np.concatenate([scorer.encode_text(taxon_prompts(plant_rows) + list(cfg.plant_prompts)), plant_support])
        general = scorer.encode_text(list(cfg.general_prompts))

        def score_of(x: np.ndarray) -> np.ndarray:
            return plant_scores(x, prototypes, general, cfg.temperature)
    score = score_of(image)
    if cfg.centroids:
        cluster, is_plant = plant_clusters(image, cfg.centroids, recipe.seed, score_of, plant_support, cfg.threshold)
        counted = is_plant[cluster]
    else:
        counted = score >= np.float32(cfg.threshold)
    reason, route_to = relevance_reasons(domain, counted, np.ones(len(rows), bool), cfg)
    out = {"plant_score": _scatter(n, rows, score, pa.float32()), "relevance_reason": _strings(n, rows, reason),
           "route_to": _strings(n, rows, route_to)}  # fmt: skip
    if reports is not None:
        leakage_report(pa.table({"source": joined["source"], "domain": joined["domain"], **out}), reports / "relevance")
    return out


def _semantic(joined, rows, image, recipe: Recipe, reports, progress) -> tuple[np.ndarray, pa.Table]:
    from plantmix.curate.dedup import KeepRule
    from plantmix.curate.semdedup import default_clusters, epsilon_sweep, kmeans, pair_table, semantic_pairs, write_sweep_report

    cfg = recipe.semantic_dedup
    if not len(rows):
        from plantmix.curate.semdedup import SEMANTIC_PAIR_SCHEMA

        return np.zeros(0, np.int32), SEMANTIC_PAIR_SCHEMA.empty_table()
    _, cluster = kmeans(image, cfg.clusters or default_clusters(len(rows)), recipe.seed)
    rule = KeepRule(joined, {s.name: s.priority for s in recipe.sources}, rows)
    rank = np.empty(len(rows), np.int64)
    rank[rule.order(rows)] = np.arange(len(rows))
    a, b, cosine, best = semantic_pairs(image, cluster, rank, cfg.epsilon,
                                        (lambda d, t: progress("semantic pairs (clusters)", d, t)) if progress else None)  # fmt: skip
    if reports is not None:
        epsilons = sorted({*cfg.report_epsilons, cfg.epsilon})
        write_sweep_report(epsilon_sweep(best, epsilons), reports / "semdedup", cfg.epsilon)
    uid = joined["uid"].combine_chunks().take(pa.array(rows, pa.int64()))
    return cluster, pair_table(uid, a, b, cosine)


def _decontaminate(joined, rows, image, recipe: Recipe, scorer, eval_roots, reports, progress) -> dict[str, pa.Array]:
    from plantmix.curate.decontaminate import Pool, decontaminate, load_eval_set, write_report

    cfg = recipe.decontaminate
    cosine = cfg.embedding_cosine
    if cosine is not None and scorer is None:
        raise PlantmixError("decontaminate.embedding_cosine: needs the scorer model to encode the eval images")
    usable = joined["keep"].to_numpy(zero_copy_only=False)
    has_phash = usable & pc.is_valid(joined["phash"]).to_numpy(zero_copy_only=False)
    sha = pc.if_else(pa.array(usable), joined["sha256"], pa.nulls(joined.num_rows, pa.string())).combine_chunks()
    pool = Pool(joined["uid"].combine_chunks(), sha, pc.fill_null(joined["phash"], 0).to_numpy(), has_phash, rows, image)
    sets = []
    for root in eval_roots:
        tick = (lambda d, t, name=root.name: progress(f"encode eval set {name}", d, t)) if progress else None
        sets.append(load_eval_set(root, root.name, scorer if cosine is not None else None, tick))
    exclude, per_row, report = decontaminate(pool, sets, cfg.phash_radius, cosine)
    if reports is not None:
        write_report(exclude, report, reports / "decontamination", cosine)
    return {c: per_row[c] for c in per_row.column_names}


# ---- the stage ---------------------------------------------------------------------------------------


def resolved_folders(ctx) -> tuple[list[Path], dict[str, Path]]:
    """(eval set folders, relevance's support folders by side) of the recipe, `{demo}` expanded,
    relative to the recipe."""
    from plantmix.stages.ingest import resolve_path

    r = ctx.recipe
    evals = [Path(resolve_path(p, ctx.base_dir, ctx.demo_dir, "decontaminate")) for p in (r.decontaminate.eval_sets if r.decontaminate else [])]
    for p in evals:
        if not p.is_dir():
            raise PlantmixError(f"decontaminate.eval_sets: {p} does not exist or is not a directory")
    supports = {}
    for side, folder in (r.relevance.support_dirs() if r.relevance is not None else {}).items():
        supports[side] = Path(resolve_path(folder, ctx.base_dir, ctx.demo_dir, "relevance"))
        if not supports[side].is_dir():
            raise PlantmixError(f"relevance.{SUPPORT_FIELDS[side]}: {supports[side]} does not exist or is not a directory")
    return evals, supports


def _needs_scorer(r: Recipe) -> bool:
    return r.relevance is not None or (r.decontaminate is not None and r.decontaminate.embedding_cosine is not None)


def score_stage(ctx) -> Stage:
    from plantmix.stages.steps import progress_bar

    r = ctx.recipe
    joined = ctx.path("stages", "joined.parquet")
    out, pairs_out = ctx.path("proposals", "model_scores.parquet"), ctx.path("proposals", "semantic_pairs.parquet")

    def inputs() -> list[Path]:
        evals, supports = resolved_folders(ctx)
        markers = sorted(ctx.path(EMBEDDINGS_DIR).glob("*/*.done.json"))
        return [joined, *markers, *evals, *supports.values()]

    def run() -> pa.Table:
        from plantmix.curate.relevance import TAXA_COLUMNS

        evals, supports = resolved_folders(ctx)
        scorer = None
        if _needs_scorer(r):
            from plantmix.embed.scorer import load_scorer

            scorer = load_scorer(r.scorer, ctx.base_dir)
        columns = ["uid", "source", "domain", "keep", "sha256", "phash", *TAXA_COLUMNS, *_KEEP_RULE]
        table = pq.read_table(joined, columns=columns)
        emb = read_embeddings(ctx.build_dir, text=r.clip_score is not None)
        with progress_bar(ctx.console) as bar:
            tasks: dict[str, int] = {}

            def progress(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=total)
                bar.update(tasks[name], completed=done, total=total)

            scores, pairs = model_proposals(table, emb, r, scorer, evals, supports, ctx.path("reports"), progress)
        write_parquet(pairs, pairs_out)
        return scores

    def count() -> str:
        t = pq.read_table(out, columns=["clip_score", "clip_reason", "relevance_reason", "route_to", "eval_overlap"])
        moved = t.num_rows - t["route_to"].null_count
        return (f"{t.num_rows - t['clip_score'].null_count:,} scored; proposed: {t.num_rows - t['clip_reason'].null_count:,} clip_score_low, "
                f"{t.num_rows - t['relevance_reason'].null_count - moved:,} relevance drops, {moved:,} moves, "
                f"{t.num_rows - t['eval_overlap'].null_count:,} eval overlaps, {pq.read_metadata(pairs_out).num_rows:,} semantic pairs")  # fmt: skip

    sections = {n: (getattr(r, n).model_dump() if getattr(r, n) is not None else None) for n in ("scorer", *MODEL_CHECKS)}
    return Stage(
        "score", "CLIP score, plant relevance, semantic pairs, eval overlap", out, run, inputs=inputs,
        params={**sections, "seed": r.seed, "priority": {s.name: s.priority for s in r.sources}},
        version=SCORE_VERSION, count=count,
    )  # fmt: skip
