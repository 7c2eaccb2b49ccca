"""Download: one img2dataset run per source into `download/<source>/` (webdataset shards, untouched).

img2dataset runs in a child process (its own process group) so that its output goes to a log file, a
progress bar can follow its `*_stats.json` files, and a build killed mid-download leaves no orphan
writing into the folder: the child takes its group down when the build dies, the group id is
recorded, and a rerun ends any survivor before resuming with img2dataset's own incremental mode
(finished shards are kept, unfinished ones redone). Its fetch and decode run through the guards of
plantmix.stages.i2d_hooks.

What is redone is decided per img2dataset shard (rows [i·N, (i+1)·N) of the source): each has a
fingerprint of its rows and, for local files (image folders, extracted webdataset images), their size
and mtime, so an image edited in place changes its shard's fingerprint and only that shard is
downloaded again. A finished shard is trusted only while its files match the listing recorded when it
finished; after a killed run, a shard img2dataset counts as done is read back (parquet, stats, tar
headers) before it is kept. Any other shard is deleted, and img2dataset's incremental mode redoes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError
from plantmix.core.members import IMAGE_EXTS, split_member
from plantmix.core.recipe import DownloadConfig
from plantmix.core.stage import (
    atomic_write_text, clear_done, done_marker, is_done, listing, mark_done, read_json_object, write_parquet,
)  # fmt: skip
from plantmix.stages.safe_fetch import FetchPolicy

# img2dataset settings we fix: the manifest contract depends on them.
_FIXED = dict(
    output_format="webdataset",
    input_format="parquet",
    url_col="url",
    caption_col="caption",
    save_additional_columns=["uid"],
    compute_hash="sha256",
    incremental_mode="incremental",
    extract_exif=False,
    enable_wandb=False,
)


def fetch_urls(table: pa.Table, url_rewrite: dict[str, str] | None = None) -> pa.Array:
    """The URL img2dataset fetches for each row: local paths as file:// URIs, remote URLs with prefix rewrites.

    `url_rewrite` maps a URL prefix to a replacement (a mirror, or the demo world's live server); the
    manifest keeps the original URL, so uids and manifests do not depend on where bytes were fetched.
    """
    urls = []
    for url, path in zip(table["url"].to_pylist(), table["path"].to_pylist()):
        if path is not None:
            urls.append(Path(path).resolve().as_uri())
            continue
        for prefix, replacement in (url_rewrite or {}).items():
            if url.startswith(prefix):
                url = replacement + url[len(prefix) :]
                break
        urls.append(url)
    return pa.array(urls, pa.string())


def settings_key(cfg: DownloadConfig) -> str:
    """Identity of how a source is downloaded: img2dataset's settings, our hooks and their guards."""
    from plantmix.stages.i2d_hooks import HOOKS_VERSION

    guards = cfg.model_dump(include={"max_bytes", "deadline", "allow_private_hosts", "allowed_hosts"})
    blob = {**_img2dataset_args(cfg), "hooks": HOOKS_VERSION, "guards": guards}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def shard_keys(rows: pa.Table, cfg: DownloadConfig) -> list[str]:
    """One fingerprint per img2dataset shard: its (uid, url, path, caption) rows and, for rows with a
    local path, the file's (size, mtime_ns), so an edit in place is seen (see the module doc)."""
    n = cfg.number_sample_per_shard
    columns = [rows[c].to_pylist() for c in ("uid", "url", "path", "caption")]
    files = [_file_state(p) for p in columns[2]]
    keys = []
    for start in range(0, rows.num_rows, n):
        h = hashlib.sha256()
        for values in (*columns, files):
            for v in values[start : start + n]:
                h.update(b"\x00" if v is None else v.encode() + b"\x01")
            h.update(b"\x02")
        keys.append(h.hexdigest())
    return keys


def _file_state(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return "missing"  # img2dataset will report it; a reappearing file changes the key again
    return f"{st.st_size}:{st.st_mtime_ns}"


def _combine(settings: str, shards: list[str]) -> str:
    """Identity of a source's download: its settings and every shard's fingerprint."""
    return hashlib.sha256(json.dumps([settings, shards]).encode()).hexdigest()


def fetch_policy(cfg: DownloadConfig, url_rewrite: dict[str, str] | None = None) -> FetchPolicy:
    """The fetch guards of a download; the hosts that `url_rewrite` sends URLs to (the demo world's
    loopback server) are allowed by exact host and port, nothing else on them."""
    hosts = FetchPolicy.parse_hosts(cfg.allowed_hosts)
    for replacement in (url_rewrite or {}).values():
        parts = urlsplit(replacement)
        if parts.hostname:
            hosts |= {(parts.hostname.lower(), parts.port or (443 if parts.scheme == "https" else 80))}
    return FetchPolicy(
        allowed_schemes=tuple(s.lower() for s in cfg.allowed_schemes), max_bytes=cfg.max_bytes,
        deadline=cfg.effective_deadline, allow_private_hosts=cfg.allow_private_hosts, allowed_hosts=hosts,
    )  # fmt: skip


def _img2dataset_args(cfg: DownloadConfig) -> dict:
    return dict(
        _FIXED,
        distributor=cfg.distributor,
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        number_sample_per_shard=cfg.number_sample_per_shard,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        timeout=cfg.timeout,
        retries=cfg.retries,
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area,
        max_aspect_ratio=cfg.max_aspect_ratio,
        disallowed_header_directives=cfg.disallowed_header_directives,
        user_agent_token=cfg.user_agent_token,
    )


def _run_img2dataset(args: dict, log_path: str, policy: FetchPolicy) -> None:
    """Body of the forked child: own process group, output to the log, then img2dataset's API.

    When the build dies, PDEATHSIG sends SIGTERM, which the child turns into a SIGKILL of its whole
    group (img2dataset's worker processes and any Spark JVM included), so no orphan finishes a shard
    against a dead server. Forking (rather than starting a fresh interpreter) reuses the parent's
    imported img2dataset, which takes seconds to import.
    """
    os.setsid()
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:
        os.killpg(0, signal.SIGKILL)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    os.environ["PYSPARK_PYTHON"] = sys.executable
    # img2dataset's spawned workers would re-import our __main__ (a CLI, a notebook, stdin): they
    # need nothing from it, so hide it from multiprocessing's spawn preparation.
    main = sys.modules["__main__"]
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    if args["distributor"] == "pyspark":
        _start_spark(args["processes_count"])
    from img2dataset import download

    from plantmix.stages.i2d_hooks import install

    install(policy)
    download(**args)


def _start_spark(processes: int) -> None:
    """The child's own Spark session (img2dataset would otherwise start one asking for 16 GB of driver
    memory). A parent that ran Spark before the fork left its py4j gateway in our memory: reusing it
    would share the parent's sockets and JVM, a JVM outside our process group that a kill would miss,
    so that state is dropped and a JVM of our own is started."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    SparkContext._gateway = SparkContext._jvm = SparkContext._active_spark_context = None
    SparkSession._instantiatedSession = SparkSession._activeSession = None
    for name in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET"):
        os.environ.pop(name, None)
    spark = (
        SparkSession.builder.master(f"local[{processes}]")
        .config("spark.driver.memory", "2g")
        .config("spark.ui.enabled", "false")
        .appName("plantmix-download")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    print(f"Spark {spark.version} session {spark.sparkContext.applicationId} (master local[{processes}], pid {os.getpid()})")


def _kill_leftover(started: Path) -> None:
    pgid = (read_json_object(started) or {}).get("pgid")
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.2)
        except (ProcessLookupError, PermissionError):
            pass


def download_source(
    rows: pa.Table,
    out_dir: Path,
    cfg: DownloadConfig,
    url_rewrite: dict[str, str] | None = None,
    progress=None,
) -> dict:
    """Download one source's fetchable rows (uid, url, path, caption) with img2dataset into `out_dir`.

    Idempotent: a finished download with the same fingerprint and untouched files is skipped. Otherwise
    only the shards whose rows, local files or output files changed are redone (see the module doc);
    a change of settings redoes them all. Returns a summary dict (counts by status).
    """
    out_dir = Path(out_dir)
    settings, shards = settings_key(cfg), shard_keys(rows, cfg)
    key = _combine(settings, shards)
    marker = read_json_object(done_marker(out_dir)) or {}
    if is_done(out_dir, key) and _unchanged(out_dir, marker.get("outputs")):
        return {"skipped": True}
    started = out_dir.with_name(out_dir.name + ".started.json")
    _kill_leftover(started)
    clear_done(out_dir)
    _keep_valid_shards(out_dir, settings, shards, previous=read_json_object(started) or marker)
    # img2dataset keeps its split of the input list in `_tmp/`; a resumed run may fetch from another
    # address (the demo server's port changes), so the split is always rebuilt from the fresh input.
    shutil.rmtree(out_dir / "_tmp", ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    input_path = out_dir.with_name(out_dir.name + ".input.parquet")
    write_parquet(
        pa.table({"url": fetch_urls(rows, url_rewrite), "caption": rows["caption"], "uid": rows["uid"]}), input_path
    )
    args = dict(_img2dataset_args(cfg), url_list=str(input_path), output_folder=str(out_dir))
    log_path = out_dir.with_name(out_dir.name + ".log")
    expected_shards = max(1, math.ceil(rows.num_rows / cfg.number_sample_per_shard))
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset  # noqa: F401  (imported once here; the forked child inherits it)

    proc = multiprocessing.get_context("fork").Process(
        target=_run_img2dataset, args=(args, str(log_path), fetch_policy(cfg, url_rewrite))
    )
    proc.start()
    atomic_write_text(started, json.dumps({"key": key, "settings": settings, "shards": shards, "pgid": proc.pid}))
    try:
        while proc.is_alive():
            if progress is not None:
                progress(len(list(out_dir.glob("*_stats.json"))), expected_shards)
            proc.join(0.3)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.exitcode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise PlantmixError(f"img2dataset failed for {out_dir.name} (exit {proc.exitcode}): {tail[0]} — see {log_path}")
    summary = summarize_download(out_dir)
    if progress is not None:
        progress(expected_shards, expected_shards)
    mark_done(out_dir, key, rows=rows.num_rows, settings=settings, shards=shards, outputs=listing(out_dir), **summary)
    started.unlink(missing_ok=True)
    return summary


_SHARD_FILE = re.compile(r"^(\d+)(?:\.tar|\.parquet|_stats\.json)$")


def _by_shard(entries: list) -> dict[int, dict[str, tuple[int, int]]]:
    """Listing entries (name, size, mtime) of img2dataset's shard files, grouped by shard id."""
    out: dict[int, dict[str, tuple[int, int]]] = {}
    for name, size, mtime in entries:
        m = _SHARD_FILE.match(name)
        if m:
            out.setdefault(int(m.group(1)), {})[name] = (size, mtime)
    return out


def _unchanged(out_dir: Path, recorded: list | None) -> bool:
    """True when the folder's files still have the (size, mtime) recorded when its download finished."""
    return recorded is not None and _by_shard(listing(out_dir)) == _by_shard(recorded)


def _keep_valid_shards(out_dir: Path, settings: str, shards: list[str], previous: dict) -> None:
    """Delete every shard that cannot be kept as it is, so that img2dataset's incremental mode redoes
    it: all of them when the settings changed; else those whose inputs changed, and those whose files
    differ from the finished run's listing or, without one (a killed run), do not read back whole."""
    if not out_dir.exists():
        return
    if previous.get("settings") != settings:
        shutil.rmtree(out_dir)
        return
    old = previous.get("shards") or []
    recorded = _by_shard(previous["outputs"]) if previous.get("outputs") is not None else None
    for sid, files in sorted(_by_shard(listing(out_dir)).items()):
        if sid < len(shards) and sid < len(old) and old[sid] == shards[sid]:
            if recorded is not None and recorded.get(sid) == files:
                continue
            if recorded is None and shard_readable(out_dir, set(files)):
                continue
        for name in files:
            (out_dir / name).unlink()


def shard_readable(out_dir: Path, names: set[str]) -> bool:
    """True when img2dataset finished the shard (stats written) and its parquet and tar read back
    whole: every tar member inside the file, one image per `success` row of the parquet. A shard
    without stats is redone by img2dataset itself."""
    stem = next((n.split(".")[0] for n in names if n.endswith(".parquet")), None)
    if stem is None or not {f"{stem}.tar", f"{stem}_stats.json"} <= names:
        return False
    try:
        json.loads((out_dir / f"{stem}_stats.json").read_text())
        status = pq.read_table(out_dir / f"{stem}.parquet", columns=["status"])["status"]
        successes = pc.sum(pc.equal(status, "success")).as_py() or 0
        return _tar_images(out_dir / f"{stem}.tar") == successes
    except (OSError, ValueError, pa.ArrowException, tarfile.TarError, EOFError):
        return False


def _tar_images(path: Path) -> int:
    """Number of image members of a tar, reading only its headers; -1 when it ends early."""
    size, images = path.stat().st_size, 0
    with tarfile.open(path) as tar:
        for m in tar:
            if m.offset_data + m.size > size:
                return -1
            if m.isreg() and split_member(m.name)[1].lower() in IMAGE_EXTS:
                images += 1
    return images


def summarize_download(out_dir: Path) -> dict:
    """Counts by img2dataset status across a download folder's per-shard parquet files."""
    counts: dict[str, int] = {}
    for f in sorted(Path(out_dir).glob("*.parquet")):
        t = pq.read_table(f, columns=["status"])
        for item in pc.value_counts(t["status"]).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return {"status_counts": counts}
