"""Embedding download tars: clip-retrieval's inference per tar, moved into the layout of plantmix.embed.store.

For each `download/<source>/<shard>.tar` whose marker does not hold the tar's listing and the scorer's
fingerprint, the tar is embedded into a temporary folder inside `embeddings/<source>/`, checked (one
metadata row per embedding, uids present and unique, every row a member of the tar), moved into place
under the tar's shard name, and its marker written last. A killed run leaves at most a temporary
folder (removed by the next build) or data files without a marker (redone), never a marker over
partial data.

Engines (`choose_engine`):
- `clip-retrieval`: clip-retrieval's own webdataset reader (`WebdatasetReader`), mapper (`ClipMapper`:
  all_clip's model, L2 normalisation, float16) and writer (`NumpyWriter`), driven here one group of tars
  at a time so that each tar gets its own writer. clip_inference's runner would also start two stats
  processes per partition (spawned interpreters importing clip_retrieval: ~8 s per tar measured here).
- `clip-retrieval` with the pyspark distributor: `clip_retrieval.clip_inference` with its pyspark
  strategy, one partition per tar, in a local Spark session whose Python daemon registers custom
  architectures (plantmix.embed.workers).
- `open_clip`: the same reader and writer with plantmix's Scorer as the mapper, for the device and
  precision settings clip-retrieval does not offer (it runs on CUDA whenever a GPU is visible, under its
  own autocast dtype).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError
from plantmix.core.members import split_member
from plantmix.core.recipe import ScorerConfig
from plantmix.core.stage import atomic_write_text, fingerprint, listing, read_json_object
from plantmix.embed.scorer import ScorerSpec, load_scorer, parse_model, register
from plantmix.embed.store import EMBEDDINGS_DIR, ShardFiles, normalise, shard_files
from plantmix.embed.workers import SPARK_DAEMON, worker_env

EMBED_VERSION = 1
ENGINES = ("clip-retrieval", "open_clip")
LOG_NAME = "embed.log"  # clip-retrieval's and Spark's chatter, under BUILD/embeddings/
_WORK_DIR = ".work.tmp-{pid}"  # a temporary name remove_stale_temporaries recognises
_FILE_SHARD = re.compile(r"^(?:img_emb_|text_emb_|metadata_)?(.+?)(?:\.npy|\.parquet|\.done\.json)$")

Progress = Callable[[int, int], None]  # (images embedded, tars finished) since the last call


@dataclass(frozen=True)
class TarJob:
    source: str
    shard: str
    tar: Path
    folder: Path  # embeddings/<source>
    key: str  # the marker's fingerprint: tar listing + scorer identity
    keys: tuple[str, ...]  # sample keys of the tar's image members, in tar order

    @property
    def files(self) -> ShardFiles:
        return shard_files(self.folder, self.shard)


@dataclass
class EmbedSummary:
    engine: str = ""
    engine_reason: str | None = None  # why clip-retrieval could not serve, when the fallback ran
    tars: int = 0
    skipped: int = 0
    embedded: int = 0
    removed: int = 0  # shards whose tar disappeared (outputs deleted)
    rows: int = 0  # embeddings written in this run
    not_embedded: list[str] = field(default_factory=list)  # "<source>/<key>" of tar samples the reader skipped

    @property
    def did_work(self) -> bool:
        return bool(self.embedded or self.removed)


def choose_engine(cfg: ScorerConfig) -> tuple[str, str | None]:
    """("clip-retrieval", None), or ("open_clip", why clip-retrieval cannot run `cfg` as asked)."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise PlantmixError("scorer.device is cuda but no CUDA device is available")
    if cfg.device == "cpu" and cuda:
        return "open_clip", "clip-retrieval runs on the GPU whenever one is visible, and scorer.device is cpu"
    if cfg.device == "cuda":
        native = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if cfg.precision != native:
            return "open_clip", f"clip-retrieval runs CUDA inference under {native} autocast, and scorer.precision is {cfg.precision}"
    return "clip-retrieval", None


def scorer_identity(model_fingerprint: dict, cfg: ScorerConfig, image_key: str) -> dict:
    """What makes two runs' embeddings equal: the model's content (`ScorerSpec.fingerprint()`), where and at
    what precision it runs, which image member it reads."""
    precision = "fp32" if cfg.device == "cpu" else cfg.precision  # no autocast on CPU, either engine
    return {"v": EMBED_VERSION, "scorer": model_fingerprint, "device": cfg.device, "precision": precision, "image_key": image_key}


def embed_sources(
    build_dir: Path,
    sources: list[str],
    cfg: ScorerConfig,
    base_dir: Path | None = None,
    image_key: str = "jpg",
    distributor: str = "sequential",
    workers: int = 2,
    progress: Callable[[int, int, int, int], None] | None = None,
    engine: str | None = None,
) -> EmbedSummary:
    """Embed every download tar of `sources` not embedded yet with this scorer (module doc).

    `distributor`: "sequential" (this process) or "pyspark" (clip-retrieval's pyspark strategy in a
    local[`workers`] session). `progress(images_done, images_total, tars_done, tars_total)`. `engine`
    forces "clip-retrieval" or "open_clip" (to compare them); by default `choose_engine` decides.
    """
    if distributor not in ("sequential", "pyspark"):
        raise PlantmixError(f"embed distributor must be sequential or pyspark; got {distributor!r}")
    build_dir = Path(build_dir)
    spec = parse_model(cfg.model, base_dir)
    engine, reason = (engine, None) if engine else choose_engine(cfg)
    if engine not in ENGINES:
        raise PlantmixError(f"embed engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    summary = EmbedSummary(engine=engine, engine_reason=reason)
    model_fp = spec.fingerprint()  # hashes the weights: once per run
    todo = plan(build_dir, sources, scorer_identity(model_fp, cfg, image_key), image_key, summary)
    total_images, total_tars = sum(len(j.keys) for j in todo), len(todo)
    done = [0, 0]

    def advance(images: int, tars: int) -> None:
        done[0] += images
        done[1] += tars
        if progress:
            progress(done[0], total_images, done[1], total_tars)

    advance(0, 0)
    write_scorer_record(build_dir, spec, cfg, model_fp)
    if todo:
        register(spec)
        _run_jobs(todo, spec, model_fp, cfg, engine, base_dir, image_key, distributor == "pyspark", workers, advance, summary)
        summary.not_embedded.sort()
    return summary


def _run_jobs(
    todo: list[TarJob], spec: ScorerSpec, model_fp: dict, cfg: ScorerConfig, engine: str, base_dir: Path | None, image_key: str,
    spark: bool, workers: int, advance: Callable[[int, int], None], summary: EmbedSummary,
) -> None:  # fmt: skip
    """Embed `todo` group by group, each group's tars finalised (moved, marked) as soon as it is done."""
    emb_dir = todo[0].folder.parent
    emb_dir.mkdir(parents=True, exist_ok=True)
    with open(emb_dir / LOG_NAME, "a") as log, contextlib.redirect_stdout(log), contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        for noise in (".*'pin_memory' argument.*", "pkg_resources is deprecated"):  # clip-retrieval's, on every run
            warnings.filterwarnings("ignore", message=noise)
        use_spark = spark and engine == "clip-retrieval"
        if use_spark:
            stack.enter_context(_spark_session(workers, worker_env(spec), log))
        model = _load(spec, cfg, engine, base_dir)
        size = max(1, workers) * 4 if use_spark else max(1, cfg.num_workers)
        for group in _groups(todo, size):
            work = group[0].folder / _WORK_DIR.format(pid=os.getpid())
            shutil.rmtree(work, ignore_errors=True)
            try:
                if use_spark:
                    produced = _run_pyspark(group, spec, cfg, image_key, work, log)
                    advance(sum(len(j.keys) for j in group), 0)
                else:
                    produced = _run_direct(group, model, cfg, image_key, work, lambda n: advance(n, 0))
                for job, files in zip(group, produced):
                    rows, missing = _finalize(job, files, model.dim, {"engine": engine, "scorer": model_fp})
                    summary.embedded += 1
                    summary.rows += rows
                    summary.not_embedded += [f"{job.source}/{k}" for k in missing]
                    advance(0, 1)
            finally:
                shutil.rmtree(work, ignore_errors=True)


SCORER_RECORD = "scorer.json"  # BUILD/embeddings/scorer.json: the resolved model that made the embeddings


def write_scorer_record(build_dir: Path, spec: ScorerSpec, cfg: ScorerConfig, model_fingerprint: dict) -> None:
    """Record which model (by absolute name) the embeddings come from, so later commands (`plantmix mine`)
    encode queries with the same model without knowing where the recipe lay."""
    path = Path(build_dir) / EMBEDDINGS_DIR / SCORER_RECORD
    text = json.dumps({"model": spec.clip_retrieval_model, "scorer": cfg.model_dump(mode="json"), "fingerprint": model_fingerprint},
                      sort_keys=True, indent=1)  # fmt: skip
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)


def plan(build_dir: Path, sources: list[str], identity: dict, image_key: str, summary: EmbedSummary) -> list[TarJob]:
    """The tars to embed; removes outputs of tars (and sources) that no longer exist, counts the current ones."""
    emb_dir = Path(build_dir) / EMBEDDINGS_DIR
    todo = []
    for source in sources:
        folder = emb_dir / source
        tars = {t.stem: t for t in sorted((Path(build_dir) / "download" / source).glob("*.tar"))}
        summary.removed += _remove_shards(folder, keep=set(tars))
        for shard, tar in tars.items():
            summary.tars += 1
            key = fingerprint({"stage": "embed", "tar": listing(tar), **identity})
            if _is_current(shard_files(folder, shard), key):
                summary.skipped += 1
            else:
                todo.append(TarJob(source, shard, tar, folder, key, tar_keys(tar, image_key)))
    if emb_dir.is_dir():
        for stale in sorted(p for p in emb_dir.iterdir() if p.is_dir() and p.name not in sources):
            summary.removed += _remove_shards(stale, keep=set())
            shutil.rmtree(stale)
    return todo


def tar_keys(tar: Path, image_key: str) -> tuple[str, ...]:
    """Sample keys of the tar's `image_key` members (what clip-retrieval's reader embeds), in tar order."""
    keys = []
    with tarfile.open(tar) as t:
        for m in t:
            key, ext = split_member(m.name)
            if m.isreg() and ext == image_key:
                keys.append(key)
    return tuple(keys)


def _is_current(files: ShardFiles, key: str) -> bool:
    return all(p.exists() for p in files.all()) and (read_json_object(files.marker) or {}).get("key") == key


def _remove_shards(folder: Path, keep: set[str]) -> int:
    """Delete every shard's files under `folder` whose shard is not in `keep`; returns how many shards."""
    found: set[str] = set()
    for p in [*folder.glob("*.done.json"), *folder.glob("img_emb/*.npy"), *folder.glob("text_emb/*.npy"), *folder.glob("metadata/*.parquet")]:
        m = _FILE_SHARD.match(p.name)
        if m and m.group(1) not in keep:
            found.add(m.group(1))
    for shard in found:
        for p in shard_files(folder, shard).all():
            p.unlink(missing_ok=True)
    return len(found)


def _groups(jobs: list[TarJob], size: int) -> Iterator[list[TarJob]]:
    """Consecutive runs of at most `size` jobs of one source (sample keys are unique only within a source)."""
    group: list[TarJob] = []
    for job in jobs:
        if group and (len(group) == size or group[0].source != job.source):
            yield group
            group = []
        group.append(job)
    if group:
        yield group


# ---- models -----------------------------------------------------------------------------------------


@dataclass
class _Model:
    preprocess: Callable
    tokenizer: Callable
    mapper: Callable[[dict], dict]  # a reader batch → clip-retrieval's embedding dict
    dim: int


def _load(spec: ScorerSpec, cfg: ScorerConfig, engine: str, base_dir: Path | None) -> _Model:
    """The engine's model, loaded once per process (all_clip's load_clip and load_scorer are cached)."""
    if engine == "open_clip":
        scorer = load_scorer(cfg, base_dir)
        return _Model(scorer.preprocess, scorer.tokenizer, _ScorerMapper(scorer), scorer.encode_text(["a"]).shape[1])
    from all_clip import load_clip
    from clip_retrieval.clip_inference.mapper import ClipMapper

    name = spec.clip_retrieval_model
    # The same keyword arguments as ClipMapper's call, so both hit one cache entry: one model per process.
    # Warm-up batch 1: the warm-up only primes kernels, and 2 passes at the full batch cost seconds on CPU.
    args = dict(clip_model=name, use_jit=False, warmup_batch_size=1, clip_cache_path=None)
    try:
        model, preprocess, tokenizer = load_clip(**args)
        mapper = ClipMapper(enable_image=True, enable_text=True, enable_metadata=True, use_mclip=False, mclip_model="", **args)
        import torch

        with torch.no_grad():
            dim = model.encode_text(tokenizer(["a"]).to(mapper.device)).shape[-1]
    except Exception as e:  # noqa: BLE001 — all_clip / open_clip raise many kinds; the user needs one line
        raise PlantmixError(f"scorer.model {cfg.model!r}: clip-retrieval cannot load {name}: {type(e).__name__}: {_error_line(e)}") from None
    return _Model(preprocess, tokenizer, mapper, int(dim))


class _ScorerMapper:
    """ClipMapper's contract (float16, L2-normalised, names and metadata passed through) on plantmix's Scorer."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, item: dict) -> dict:
        image = normalise(self.scorer.encode_pixels(item["image_tensor"])).astype(np.float16)
        text = normalise(self.scorer.encode_tokens(item["text_tokens"])).astype(np.float16)
        return {"image_embs": image, "text_embs": text, "image_filename": item["image_filename"],
                "text": item["text"], "metadata": item["metadata"]}  # fmt: skip


# ---- runs -------------------------------------------------------------------------------------------


def _run_direct(jobs: list[TarJob], model: _Model, cfg: ScorerConfig, image_key: str, work: Path, advance: Callable[[int], None]) -> list[ShardFiles]:
    """clip-retrieval's reader over the group's tars (one decoding worker per tar), one writer per tar."""
    from clip_retrieval.clip_inference.reader import WebdatasetReader
    from clip_retrieval.clip_inference.writer import NumpyWriter

    reader = WebdatasetReader(
        lambda urls: urls, model.preprocess, model.tokenizer, [str(j.tar) for j in jobs], cfg.batch_size,
        min(cfg.num_workers, len(jobs)), enable_text=True, enable_image=True, enable_metadata=True,
        wds_image_key=image_key, wds_caption_key="txt", cache_path=None,
    )  # fmt: skip
    writers = [
        NumpyWriter(partition_id=0, output_folder=str(work / str(i)), enable_text=True, enable_image=True,
                    enable_metadata=True, output_partition_count=1)
        for i in range(len(jobs))
    ]  # fmt: skip
    owner = {k: i for i, job in enumerate(jobs) for k in job.keys}
    for batch in reader:
        out = model.mapper(batch)
        rows = np.array([owner[k] for k in out["image_filename"]])
        for i in np.unique(rows):
            writers[i](_take(out, np.flatnonzero(rows == i)))
        advance(len(rows))
    for w in writers:
        w.flush()
    return [shard_files(work / str(i), "0") for i in range(len(jobs))]


def _take(out: dict, idx: np.ndarray) -> dict:
    return {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]) for k, v in out.items()}


def _run_pyspark(jobs: list[TarJob], spec: ScorerSpec, cfg: ScorerConfig, image_key: str, work: Path, log) -> list[ShardFiles]:
    """clip_retrieval.clip_inference with its pyspark strategy: partition i reads tar i (its sampler)."""
    from clip_retrieval.clip_inference.main import main as clip_inference

    before = set(multiprocessing.active_children())
    try:
        with _main_hidden_from_spawn():
            clip_inference(
                input_dataset=_brace([str(j.tar) for j in jobs]), output_folder=str(work), input_format="webdataset",
                enable_text=True, enable_image=True, enable_metadata=True, batch_size=cfg.batch_size,
                num_prepro_workers=cfg.num_workers, wds_image_key=image_key, wds_caption_key="txt",
                clip_model=spec.clip_retrieval_model, use_jit=False, distribution_strategy="pyspark",
                output_partition_count=len(jobs),
            )  # fmt: skip
    except Exception as e:  # noqa: BLE001 — a Py4J error wraps the executor's; one line, the rest in the log
        for p in set(multiprocessing.active_children()) - before:  # its stats reader waits for an "end" that never comes
            p.terminate()
        print(repr(e), file=log)
        raise PlantmixError(f"clip-retrieval (pyspark) failed on {jobs[0].source} {jobs[0].shard}..{jobs[-1].shard}: {_error_line(e)} (see {log.name})") from None
    width = int(math.log10(len(jobs))) + 1  # clip-retrieval's partition file names
    return [shard_files(work, str(i).zfill(width)) for i in range(len(jobs))]


@contextlib.contextmanager
def _main_hidden_from_spawn() -> Iterator[None]:
    """clip_inference spawns a stats process, which would re-import our __main__ (a script, a notebook):
    it needs nothing from it, so hide it from multiprocessing's spawn preparation for the call."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)


def _brace(paths: list[str]) -> str:
    """A braceexpand pattern naming exactly `paths` (clip_inference takes a pattern, not a list)."""
    from braceexpand import braceexpand

    esc = [re.sub(r"([{},])", r"\\\1", p) for p in paths]
    pattern = esc[0] if len(esc) == 1 else "{" + ",".join(esc) + "}"
    if list(braceexpand(pattern)) != paths:  # braceexpand drops backslashes: such paths cannot be named
        raise PlantmixError(f"clip-retrieval takes its tars as a brace pattern, which cannot name {paths[0]!r}..; rename the build directory")
    return pattern


@contextlib.contextmanager
def _spark_session(workers: int, env: dict[str, str], log) -> Iterator[None]:
    """A local Spark session whose Python workers register the scorer's architecture (plantmix.embed.workers);
    an already active session (the user's cluster) is used as it is."""
    from pyspark.sql import SparkSession

    if SparkSession.getActiveSession() is not None:
        yield
        return
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.update(env)  # local mode: the JVM and its Python daemon inherit this environment
    builder = (
        SparkSession.builder.master(f"local[{max(1, workers)}]").appName("plantmix-embed")
        .config("spark.driver.memory", "2g").config("spark.ui.enabled", "false")
        .config("spark.python.daemon.module", SPARK_DAEMON)
    )  # fmt: skip
    for k, v in env.items():
        builder = builder.config(f"spark.executorEnv.{k}", v)
    with _fds_to(log):  # the JVM keeps the stderr it starts with: its logs go to the log file
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield
    finally:
        spark.stop()


@contextlib.contextmanager
def _fds_to(log) -> Iterator[None]:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        for fd, s in zip((1, 2), saved):
            os.dup2(s, fd)
            os.close(s)


# ---- into the layout --------------------------------------------------------------------------------


def _finalize(job: TarJob, produced: ShardFiles, dim: int, info: dict) -> tuple[int, list[str]]:
    """Check one tar's clip-retrieval outputs, move them under the tar's shard name, write the marker last.
    Returns (rows, sample keys of the tar that have no embedding)."""
    if not produced.metadata.exists():  # nothing readable in the tar: clip-retrieval writes no files
        _write_empty(produced, dim)
    meta = pq.read_table(produced.metadata)
    n_image = np.load(produced.image, mmap_mode="r").shape[0]
    n_text = np.load(produced.text, mmap_mode="r").shape[0]
    where = f"embedding {job.tar}"
    if "uid" not in meta.column_names:
        raise PlantmixError(f"{where}: its samples' json carries no uid (was it downloaded by plantmix?)")
    uid = meta["uid"].to_pylist()
    names = meta["image_path"].to_pylist()
    if not len(uid) == n_image == n_text:
        raise PlantmixError(f"{where}: {len(uid)} metadata rows but {n_image} image / {n_text} text embeddings")
    if any(u is None for u in uid) or len(set(uid)) != len(uid):
        raise PlantmixError(f"{where}: metadata uids are missing or repeated")
    if "key" in meta.column_names and meta["key"].to_pylist() != names:
        raise PlantmixError(f"{where}: metadata rows do not line up with the embedded images (json key ≠ image key)")
    members = set(job.keys)
    stray = [n for n in names if n not in members]
    if stray:
        raise PlantmixError(f"{where}: embeddings for samples not in the tar: {stray[:3]}")
    embedded = set(names)
    missing = [k for k in job.keys if k not in embedded]
    target = job.files
    for src, dst in zip(produced.all()[:3], target.all()[:3]):
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)  # same filesystem: the work folder lies inside the source folder
    marker = {"key": job.key, "tar": job.tar.name, "tar_listing": listing(job.tar), "rows": len(uid), "not_embedded": missing, **info}
    atomic_write_text(target.marker, json.dumps(marker, sort_keys=True, indent=1))
    return len(uid), missing


def _write_empty(files: ShardFiles, dim: int) -> None:
    for p in (files.image, files.text):
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, np.zeros((0, dim), np.float16))
    files.metadata.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in ("image_path", "caption", "uid")}), files.metadata)


def _error_line(e: BaseException) -> str:
    """The line that names the problem: a Py4J error wraps the worker's Python traceback, whose last
    `SomeError: message` line is the one to show."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln) and "Py4J" not in ln and "SparkException" not in ln]
    return (raised[-1] if raised else lines[0] if lines else type(e).__name__)[:400]
