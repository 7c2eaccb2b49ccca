"""Eval decontamination: training rows that copy an evaluation image (DESIGN §3, §7).

Three tests per evaluation set, strongest first; a row takes the first that matches:
- `exact`: the sha256 of the eval file's bytes equals the row's sha256. img2dataset's sha256 covers
  the bytes it downloaded, before its resize and re-encode, so both sides hash the file as served:
  like with like (a hash of the stored, re-encoded image would never match an eval file).
- `phash`: the row's pHash lies within `phash_radius` of the eval image's pHash or of its mirror
  image's (a flipped copy), found with the dedup stage's multi-index pair search. pHash is computed on
  the decoded pixels, so the row's (stored, resized) and the eval file's hashes are comparable.
- `embedding`: cosine of the row's image embedding and the eval image's (same scorer) at least
  `embedding_cosine`.
Per row and eval set the report names one eval file: the exact one, else the nearest by pHash, else
the most similar by embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError
from plantmix.core.hashing import phash_pair_bytes, popcount64
from plantmix.core.stage import file_digest
from plantmix.curate.dedup import near_pairs
from plantmix.curate.images import encode_files, image_files

MATCH_KINDS = ("exact", "phash", "embedding")
EXCLUDE_SCHEMA = pa.schema([pa.field("uid", pa.string()), pa.field("eval_set", pa.string()),
                            pa.field("match", pa.string()), pa.field("eval_file", pa.string())])  # fmt: skip
_CHUNK_CELLS = 1 << 24


@dataclass
class EvalSet:
    name: str
    root: Path
    files: list[str]  # relative to root
    sha256: pa.Array
    phash: np.ndarray  # uint64; valid where `decoded`
    mirror: np.ndarray
    decoded: np.ndarray  # bool: the file decodes as an image
    embedding: np.ndarray | None  # (files, d) float32, rows of undecodable files zero; None without a scorer


def load_eval_set(root: Path, name: str, scorer=None, progress: Callable[[int, int], None] | None = None) -> EvalSet:
    """Hash (and, with a scorer, encode) every image below `root`; one error line if it is missing or empty."""
    files = image_files(root, f"eval set {name!r}")
    sha, ph, mirror, decoded = [], np.zeros(len(files), np.uint64), np.zeros(len(files), np.uint64), np.zeros(len(files), bool)
    for i, path in enumerate(files):
        sha.append(file_digest(path))
        try:
            ph[i], mirror[i] = phash_pair_bytes(path.read_bytes())
            decoded[i] = True
        except PlantmixError:
            pass  # reported as undecodable; its sha256 still matches exact copies
    embedding = None
    if scorer is not None:
        vectors, ok = encode_files(scorer, files, progress)
        embedding = np.zeros((len(files), vectors.shape[1] if len(vectors) else 0), np.float32)
        embedding[ok] = vectors
    rel = [str(p.relative_to(root)) for p in files]
    return EvalSet(name, Path(root), rel, pa.array(sha, pa.string()), ph, mirror, decoded, embedding)


@dataclass
class Pool:
    """The rows to test: uid, sha256, pHash (0 where `has_phash` is false), image embeddings of the
    rows in `embedded` (row positions), all aligned with the pool's rows."""

    uid: pa.Array
    sha256: pa.Array
    phash: np.ndarray
    has_phash: np.ndarray
    embedded: np.ndarray | None = None
    embedding: np.ndarray | None = None


def match_eval_set(pool: Pool, es: EvalSet, radius: int, cosine: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(match kind index per pool row, -1 for none; eval file index per pool row) for one eval set."""
    n = len(pool.uid)
    kind = np.full(n, -1, np.int8)
    file = np.full(n, -1, np.int64)
    hit = pc.index_in(pool.sha256, value_set=es.sha256, skip_nulls=True)
    exact = pc.is_valid(hit).to_numpy(zero_copy_only=False)
    kind[exact], file[exact] = 0, pc.drop_null(hit).to_numpy()
    todo = ~exact & pool.has_phash
    if todo.any() and es.decoded.any():
        rows = np.nonzero(todo)[0]
        near_file = _phash_matches(pool.phash[rows], es, radius)
        found = near_file >= 0
        kind[rows[found]], file[rows[found]] = 1, near_file[found]
    if cosine is not None and pool.embedding is not None and es.embedding is not None and len(pool.embedded):
        rows = pool.embedded[kind[pool.embedded] < 0]
        sim_file, sim = _embedding_matches(pool.embedding[kind[pool.embedded] < 0], es.embedding[es.decoded])
        found = sim >= np.float32(cosine)
        kind[rows[found]], file[rows[found]] = 2, np.nonzero(es.decoded)[0][sim_file[found]]
    return kind, file


def _phash_matches(row_phash: np.ndarray, es: EvalSet, radius: int) -> np.ndarray:
    """The nearest eval file (by pHash or mirror pHash) within `radius` of each row hash, -1 for none."""
    files = np.nonzero(es.decoded)[0]
    queries = np.r_[es.phash[files], es.mirror[files]]
    owner = np.r_[files, files]
    rv, rinv = np.unique(row_phash, return_inverse=True)
    ev, efirst = np.unique(queries, return_index=True)  # one file per distinct eval hash: the first listed
    search = np.r_[rv, ev]
    a, b = near_pairs(search, radius)  # a < b: a row value and an eval value when they cross
    cross = (a < len(rv)) & (b >= len(rv))
    a, b = a[cross], b[cross] - len(rv)
    d = popcount64(rv[a] ^ ev[b])
    best = np.full(len(rv), -1, np.int64)
    if len(a):
        f = owner[efirst[b]]
        o = np.lexsort((f, d, a))  # per row value: nearest, then first file
        a, f = a[o], f[o]
        head = np.r_[True, a[1:] != a[:-1]]
        best[a[head]] = f[head]
    return best[rinv]


def _embedding_matches(x: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's most similar eval embedding: (index, cosine)."""
    idx = np.zeros(len(x), np.int64)
    sim = np.full(len(x), -np.inf, np.float32)
    if not len(e):
        return idx, sim
    step = max(1, _CHUNK_CELLS // len(e))
    for s in range(0, len(x), step):
        m = x[s : s + step].astype(np.float32) @ e.T
        idx[s : s + step] = m.argmax(axis=1)
        sim[s : s + step] = m[np.arange(len(m)), idx[s : s + step]]
    return idx, sim


def decontaminate(pool: Pool, eval_sets: list[EvalSet], radius: int, cosine: float | None) -> tuple[pa.Table, pa.Table, dict]:
    """(exclude table: one row per (row, eval set) matched; per pool row: eval_overlap, eval_match,
    eval_file of the first eval set that matches; report rows, one per eval set)."""
    names = [es.name for es in eval_sets]
    repeated = sorted({x for x in names if names.count(x) > 1})
    if repeated:
        raise PlantmixError(f"decontaminate: eval sets must have distinct folder names; repeated: {repeated}")
    n = len(pool.uid)
    first_set = np.full(n, -1, np.int64)  # per row: the first eval set that matches, its kind and file
    first_kind = np.zeros(n, np.int8)
    first_file = np.full(n, None, object)
    parts, report = [], []
    for j, es in enumerate(eval_sets):
        kind, file = match_eval_set(pool, es, radius, cosine)
        rows = np.nonzero(kind >= 0)[0]
        files = np.array(es.files, object)[file[rows]] if len(rows) else np.zeros(0, object)
        kinds = [MATCH_KINDS[k] for k in kind[rows]]
        parts.append(pa.table([pool.uid.take(pa.array(rows, pa.int64())), pa.array([es.name] * len(rows), pa.string()),
                               pa.array(kinds, pa.string()), pa.array(files.tolist(), pa.string())],
                              schema=EXCLUDE_SCHEMA))  # fmt: skip
        new = first_set[rows] < 0
        first_set[rows[new]], first_kind[rows[new]], first_file[rows[new]] = j, kind[rows[new]], files[new]
        report.append({
            "eval_set": es.name, "path": str(es.root), "eval_images": len(es.files),
            "undecodable": int((~es.decoded).sum()), "rows_matched": len(rows),
            **{k: int(np.sum(kind == i)) for i, k in enumerate(MATCH_KINDS)},
            "eval_images_matched": len(np.unique(file[rows])),
        })  # fmt: skip
    found = first_set >= 0
    overlap = pa.array(np.where(found, np.array([es.name for es in eval_sets] + [None], object)[first_set], None).tolist(), pa.string())
    match = pa.array(np.where(found, np.array([*MATCH_KINDS, None], object)[first_kind], None).tolist(), pa.string())
    exclude = pa.concat_tables(parts) if parts else EXCLUDE_SCHEMA.empty_table()
    per_row = pa.table({"eval_overlap": overlap, "eval_match": match, "eval_file": pa.array(first_file.tolist(), pa.string())})
    return exclude, per_row, report


def write_report(exclude: pa.Table, report: list[dict], out_dir: Path, embedding_cosine: float | None) -> Path:
    """out_dir/exclude.parquet (uid, eval_set, match, eval_file) and out_dir/report.csv (one line per
    eval set: images, undecodable, rows matched by kind, eval images matched)."""
    import pyarrow.csv as pacsv

    from plantmix.core.stage import write_parquet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(exclude, out_dir / "exclude.parquet")
    table = pa.Table.from_pylist(report) if report else pa.table({})
    if report:
        table = table.append_column("embedding_cosine", pa.array([embedding_cosine] * len(report), pa.float64()))
    pacsv.write_csv(table, out_dir / "report.csv")
    return out_dir


# ---- `plantmix contamination`: data built elsewhere ------------------------------------------------------


def _locate(target: Path) -> tuple[Path, Path | None]:
    """(manifest path, build directory or None) of a build directory, a mix directory or a manifest file."""
    target = Path(target)
    manifest = target if target.is_file() else target / "manifest.parquet"
    if not manifest.is_file():
        raise PlantmixError(f"{target}: no manifest.parquet (a build directory, a mix directory or a manifest file)")
    folder = manifest.parent
    if folder.parent.name == "mixes" and (folder.parent.parent / "manifest.parquet").is_file():
        return manifest, folder.parent.parent
    return manifest, folder if (folder / "download").is_dir() or (folder / "embeddings").is_dir() else None


def _lock_scorer(build_dir: Path | None) -> str | None:
    """The scorer model named in a build's recipe.lock.yaml, if any."""
    if build_dir is None or not (build_dir / "recipe.lock.yaml").is_file():
        return None
    import yaml

    return ((yaml.safe_load((build_dir / "recipe.lock.yaml").read_text()).get("recipe") or {}).get("scorer") or {}).get("model")


def _row_embeddings(manifest: pa.Table, build_dir: Path | None, scorer, use_build: bool, progress) -> tuple[np.ndarray, np.ndarray]:
    """(row positions, image embeddings): the build's own embeddings when `use_build`, else the scorer
    run over the rows' downloaded images (download tars named by `shard` / `key`)."""
    if use_build:
        from plantmix.embed.store import read_embeddings

        emb = read_embeddings(build_dir, text=False)
        at = pc.fill_null(pc.index_in(manifest["uid"], value_set=emb.uid), -1).to_numpy().astype(np.int64)
        rows = np.nonzero(at >= 0)[0]
        return rows, emb.image[at[rows]]
    if build_dir is None or not {"shard", "key"} <= set(manifest.column_names):
        raise PlantmixError("contamination: --scorer needs the images: a build directory with download/ (or its embeddings/)")
    import io
    import tarfile

    from PIL import Image

    from plantmix.core.members import IMAGE_EXTS, split_member

    shard, key = manifest["shard"].to_pylist(), manifest["key"].to_pylist()
    by_tar: dict[str, dict[str, int]] = {}
    for i, (s, k) in enumerate(zip(shard, key)):
        if s is not None and k is not None:
            by_tar.setdefault(s, {})[k] = i
    rows, vectors = [], []
    for t, (tar_name, wanted) in enumerate(sorted(by_tar.items())):
        images, at = [], []
        with tarfile.open(build_dir / tar_name) as tar:
            for m in tar:
                k, ext = split_member(m.name)
                if m.isreg() and ext.lower() in IMAGE_EXTS and k in wanted:
                    with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                        images.append(im.convert("RGB"))
                    at.append(wanted[k])
        if images:
            vectors.append(scorer.encode_images(images))
            rows.extend(at)
        if progress:
            progress(t + 1, len(by_tar))
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.array(rows, np.int64), np.concatenate(vectors)


def check_contamination(
    target: Path, against: list[Path], out: Path, scorer_model: str | None = None, phash_radius: int = 10,
    embedding_cosine: float | None = 0.95, progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, list[dict]]:
    """`plantmix contamination`: the rows of a build or mix (or any manifest with uid, sha256, phash)
    that copy an image of the eval sets `against`; writes out/exclude.parquet and out/report.csv.

    Embedding matches need a scorer: `scorer_model`, else the build's own (recipe.lock.yaml); the
    rows' embeddings are the build's when it has them from that scorer, else computed from the images.
    Without a scorer, hashes only.
    """
    from plantmix.core.recipe import ScorerConfig

    manifest_path, build_dir = _locate(target)
    names = pq.read_schema(manifest_path).names
    missing = sorted({"uid", "sha256", "phash"} - set(names))
    if missing:
        raise PlantmixError(f"{manifest_path}: not a plantmix manifest (no column(s) {missing})")
    manifest = pq.read_table(manifest_path, columns=[c for c in ("uid", "sha256", "phash", "shard", "key") if c in names])
    if not 0 <= phash_radius <= 32:
        raise PlantmixError(f"--phash-radius must lie within 0..32; got {phash_radius}")
    if embedding_cosine is not None and not 0 < embedding_cosine <= 1:
        raise PlantmixError(f"--embedding-cosine must lie in (0, 1]; got {embedding_cosine}")
    lock_model = _lock_scorer(build_dir)
    model = scorer_model or lock_model
    scorer = None
    if embedding_cosine is not None and model is not None:
        from plantmix.embed.scorer import load_scorer

        scorer = load_scorer(ScorerConfig(model=model), Path.cwd())
    sets = [load_eval_set(Path(p), Path(p).name, scorer) for p in against]
    uid = manifest["uid"].combine_chunks()
    pool = Pool(uid, manifest["sha256"].combine_chunks(), pc.fill_null(manifest["phash"], 0).to_numpy(),
                pc.is_valid(manifest["phash"]).to_numpy(zero_copy_only=False))  # fmt: skip
    if scorer is not None:
        has_build = build_dir is not None and (build_dir / "embeddings").is_dir() and model == lock_model
        pool.embedded, pool.embedding = _row_embeddings(manifest, build_dir, scorer, has_build, progress)
    exclude, _, report = decontaminate(pool, sets, phash_radius, embedding_cosine if scorer is not None else None)
    return write_report(exclude, report, out, embedding_cosine if scorer is not None else None), report
