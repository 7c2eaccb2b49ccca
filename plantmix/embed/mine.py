"""`plantmix mine`: find plant images in a pool source by kNN over its embeddings, as a URL list.

1. Index: clip-retrieval's own index code (`clip_retrieval.clip_index`, autofaiss) over
   `BUILD/embeddings/<pool>/` as it is, into `BUILD/mine/<pool>/index/`; rebuilt only when the pool's
   embeddings change (keyed on their shard markers).
2. Queries, encoded with the model that made the embeddings (`embeddings/scorer.json`): `plant-prompts`
   (the recipe's relevance plant prompts — RelevanceConfig's defaults when it has none — plus every
   caption template of the build's plant taxa, each prompt remembering its taxon), or the images of a
   folder.
   With `combine: mean` the queries become one prototype, their L2-normalised mean (query text
   "mean of N queries", no taxon): on the demo its ranking of the general pool's plants is far better
   than the best of many single images, each of which has some scene near it (benchmarks/mine_demo.py).
3. Search the image index, k neighbours per query; keep pairs scoring at least `min_score` (cosine);
   one row per pool image, with its best query.
4. Write a URL list a recipe reads as a `url_list` source: url, caption, uid, mined_from, mine_score,
   query, taxon_* and common_name (the pool row's own taxonomy when it has one, else the best query's
   taxon: `taxon_from` says which).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import Recipe, RelevanceConfig, ScorerConfig
from plantmix.core.schema import TAXON_COLUMNS
from plantmix.core.stage import atomic_path, fingerprint, is_done, mark_done, write_parquet
from plantmix.embed.infer import SCORER_RECORD
from plantmix.embed.store import EMBEDDINGS_DIR, finished_shards, shard_files, source_dir

PLANT_PROMPTS = "plant-prompts"
COMBINE = ("best", "mean")
TAXA = [*TAXON_COLUMNS, "common_name"]
MINE_DIR = "mine"


@dataclass(frozen=True)
class Queries:
    texts: list[str]  # what each query is: a prompt, or an image's path relative to its folder
    vectors: np.ndarray  # float32 (n, d), L2-normalised
    taxa: pa.Table | None  # per query: the taxon a prompt names (TAXA columns, null for generic prompts)


def mine(
    build_dir: Path, pool: str, queries: str, k: int, min_score: float, out: Path, scorer_model: str | None = None,
    combine: str = "best",
) -> pa.Table:
    """Mine `pool` (module doc) and write the URL list to `out`; returns it."""
    build_dir = Path(build_dir)
    if combine not in COMBINE:
        raise PlantmixError(f"--combine must be one of {', '.join(COMBINE)}; got {combine!r}")
    if k < 1:
        raise PlantmixError(f"--k must be at least 1; got {k}")
    if not -1 <= min_score <= 1:
        raise PlantmixError(f"--min-score is a cosine and must lie in [-1, 1]; got {min_score}")
    recipe = _recipe(build_dir)
    candidates = _candidates(build_dir)
    index_dir = build_index(build_dir, pool, threads=recipe.resources.threads if recipe else 2)
    scorer = _scorer(build_dir, recipe, scorer_model)
    q = _queries(queries, scorer, candidates, recipe)
    if combine == "mean":
        q = mean_query(q)
    uids = _index_uids(index_dir)
    ids, scores = _search(index_dir, q.vectors, k, len(uids))
    table = _rows(ids, scores, uids, q, min_score, pool, candidates)
    write_parquet(table, Path(out))
    return table


def build_index(build_dir: Path, pool: str, threads: int = 2) -> Path:
    """clip-retrieval's index (image.index, text.index, metadata/) of the pool's embeddings, cached."""
    folder = source_dir(build_dir, pool)
    shards = finished_shards(folder)
    if not shards:
        raise PlantmixError(f"--pool {pool}: {folder} holds no embeddings; build with a `scorer` section (the embed stage) first")
    markers = [shard_files(folder, s).marker for s in shards]
    index_dir = Path(build_dir) / MINE_DIR / pool / "index"
    key = fingerprint({"stage": "mine-index"}, markers)
    if is_done(index_dir, key):
        return index_dir
    # clip_index reads the whole folder: a triple without a marker (a killed embed) must not be indexed
    unmarked = _unmarked(folder, set(shards))
    if unmarked:
        raise PlantmixError(f"--pool {pool}: shards {unmarked[:3]} have embeddings but no marker (an interrupted embed); rerun `plantmix build`")
    log = index_dir.with_name("index.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(index_dir) as tmp, open(log, "a") as f, _logging_to(f), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # clip-retrieval's `import clip`
        from clip_retrieval.clip_index import clip_index

        clip_index(str(folder), str(tmp), max_index_memory_usage="4G", current_memory_available="8G", copy_metadata=True, nb_cores=threads)
        if not (tmp / "image.index").is_file():
            raise PlantmixError(f"--pool {pool}: clip-retrieval index wrote no image index (see {log})")
    mark_done(index_dir, key, shards=len(shards))
    return index_dir


@contextlib.contextmanager
def _logging_to(f):
    """stdout, stderr and the root logger into `f` for the block. autofaiss calls logging.basicConfig,
    which would leave a root handler writing to `f` after it is closed."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def _unmarked(folder: Path, marked: set[str]) -> list[str]:
    names = (p.name.removeprefix("img_emb_").removesuffix(".npy") for p in (folder / "img_emb").glob("*.npy"))
    return sorted(n for n in names if n not in marked)


def _recipe(build_dir: Path) -> Recipe | None:
    lock = build_dir / "recipe.lock.yaml"
    if not lock.is_file():
        return None
    from plantmix.build import read_lock

    return Recipe.model_validate(read_lock(build_dir)["recipe"])


def _candidates(build_dir: Path) -> pa.Table:
    path = build_dir / "candidates.parquet"
    if not path.is_file():
        raise PlantmixError(f"{build_dir}: not a build directory (no candidates.parquet)")
    return pq.read_table(path, columns=["uid", "source", "domain", "url", "path", "caption", *TAXA])


def _scorer(build_dir: Path, recipe: Recipe | None, model: str | None):
    """The scorer that made the embeddings (embeddings/scorer.json), or `model` when given."""
    from plantmix.embed.scorer import load_scorer

    record_path = build_dir / EMBEDDINGS_DIR / SCORER_RECORD
    if model is None:
        if not record_path.is_file():
            raise PlantmixError(f"{build_dir}: no {EMBEDDINGS_DIR}/{SCORER_RECORD}; build with a `scorer` section first, or pass --scorer")
        record = json.loads(record_path.read_text())
        cfg = ScorerConfig.model_validate({**record["scorer"], "model": record["model"]})
    else:
        base = recipe.scorer.model_dump() if recipe and recipe.scorer else {}
        cfg = ScorerConfig.model_validate({**base, "model": model})
    return load_scorer(cfg, Path.cwd())


def plant_prompts(candidates: pa.Table, recipe: Recipe | None) -> tuple[list[str], pa.Table]:
    """(prompts, their taxa): the generic plant prompts, then each caption template of each distinct plant taxon."""
    from plantmix.stages.captions import caption_variants

    generic = (recipe.relevance if recipe and recipe.relevance else RelevanceConfig()).plant_prompts
    plants = candidates.filter(pc.equal(candidates["domain"], "plant")).select(TAXA)
    taxa = plants.filter(pc.is_valid(plants["taxon_species"])).group_by(TAXA).aggregate([]).sort_by([(c, "ascending") for c in TAXA])
    texts, rows = list(generic), [dict.fromkeys(TAXA) for _ in generic]
    seen = set(texts)
    variants = caption_variants({c: taxa[c].combine_chunks() for c in TAXA})
    for i, taxon in enumerate(taxa.to_pylist()):
        for v in variants.values():
            text = v[i].as_py()
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                rows.append(taxon)
    return texts, pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in TAXA]))


def _queries(spec: str, scorer, candidates: pa.Table, recipe: Recipe | None) -> Queries:
    if spec == PLANT_PROMPTS:
        texts, taxa = plant_prompts(candidates, recipe)
        return Queries(texts, scorer.encode_text(texts), taxa)
    folder = Path(spec)
    if not folder.is_dir():
        raise PlantmixError(f"--queries {spec}: neither {PLANT_PROMPTS} nor an image folder")
    from plantmix.curate.images import encode_files, image_files

    files = image_files(folder, f"--queries {spec}")
    vectors, ok = encode_files(scorer, files)
    if not ok.all():
        raise PlantmixError(f"--queries {spec}: cannot read image {files[int(np.argmin(ok))]}")
    return Queries([str(f.relative_to(folder)) for f in files], vectors, None)


def mean_query(q: Queries) -> Queries:
    """The queries as one prototype: their L2-normalised mean."""
    from plantmix.embed.store import normalise

    return Queries([f"mean of {len(q.texts)} queries"], normalise(q.vectors.mean(axis=0, keepdims=True)), None)


def _index_uids(index_dir: Path) -> np.ndarray:
    """uid of each index id: the metadata files in name order, as clip-retrieval's metadata providers read them."""
    files = sorted((index_dir / "metadata").glob("*.parquet"))
    return np.array(pa.concat_arrays([pq.read_table(f, columns=["uid"])["uid"].combine_chunks().cast(pa.string()) for f in files]).to_pylist(), dtype=object)


def _search(index_dir: Path, vectors: np.ndarray, k: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.read_index(str(index_dir / "image.index"))
    if index.ntotal != rows:
        raise PlantmixError(f"{index_dir}: the index holds {index.ntotal} vectors but its metadata {rows} rows; delete {index_dir} and rerun")
    scores, ids = index.search(np.ascontiguousarray(vectors, np.float32), min(k, index.ntotal))
    return ids, scores


def _rows(ids, scores, uids, q: Queries, min_score: float, pool: str, candidates: pa.Table) -> pa.Table:
    """One row per pool image reached by some query at ≥ min_score: its best score and query (the first
    query on ties)."""
    query = np.repeat(np.arange(len(ids)), ids.shape[1] if ids.ndim == 2 else 0)
    ids, scores = ids.ravel(), scores.ravel()
    ok = (ids >= 0) & (scores >= np.float32(min_score))
    ids, scores, query = ids[ok], scores[ok], query[ok]
    order = np.lexsort((query, -scores, ids))  # per image: best score first, then the first query
    ids, scores, query = ids[order], scores[order], query[order]
    first = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, bool)
    ids, scores, query = ids[first], scores[first], query[first]
    found = pa.table({"uid": pa.array(uids[ids].tolist(), pa.string()), "mine_score": pa.array(scores, pa.float32()),
                      "query": pa.array([q.texts[i] for i in query], pa.string()), "_q": pa.array(query, pa.int64())})  # fmt: skip
    pool_rows = candidates.filter(pc.equal(candidates["source"], pool))
    joined = found.join(pool_rows, "uid", join_type="left outer").sort_by([("mine_score", "descending"), ("uid", "ascending")])
    missing = pc.sum(pc.is_null(joined["source"])).as_py() or 0
    if missing:
        raise PlantmixError(f"--pool {pool}: {missing} embedded uids are not rows of the pool in candidates.parquet (embeddings from another build?)")
    return _output(joined, q, pool)


def _output(joined: pa.Table, q: Queries, pool: str) -> pa.Table:
    url = pc.coalesce(joined["url"], _file_uris(joined["path"]))
    own = pc.is_valid(joined["taxon_species"])
    cols = {"url": url, "caption": joined["caption"], "uid": joined["uid"],
            "mined_from": pa.array([pool] * joined.num_rows, pa.string()), "mine_score": joined["mine_score"],
            "query": joined["query"]}  # fmt: skip
    query_taxa = q.taxa.take(joined["_q"]) if q.taxa is not None else None
    for c in TAXA:
        cols[c] = pc.if_else(own, joined[c], query_taxa[c]) if query_taxa is not None else joined[c]
    has_query_taxon = pc.is_valid(cols["taxon_species"])
    cols["taxon_from"] = pc.if_else(own, "pool", pc.if_else(has_query_taxon, "query", pa.scalar(None, pa.string())))
    return pa.table(cols)


def _file_uris(paths: pa.ChunkedArray) -> pa.Array:
    """Local files (image-folder pools) as file:// URLs: a recipe reading the list needs `allowed_schemes: [file]`."""
    return pa.array([None if p is None else Path(p).resolve().as_uri() for p in paths.to_pylist()], pa.string())
