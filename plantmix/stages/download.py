"""Download: one img2dataset run per source into `download/<source>/` (webdataset shards, untouched).

img2dataset runs in a child process (its own process group) so that its output goes to a log file, a
progress bar can follow its `*_stats.json` files, and a build killed mid-download leaves no orphan
writing into the folder: the child takes its group down when the build dies, the group id is
recorded, and a rerun ends any survivor before resuming with img2dataset's own incremental mode
(finished shards are kept, unfinished ones redone).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import DownloadConfig
from plantmix.core.stage import atomic_write_text, is_done, mark_done, write_parquet

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


def source_fingerprint(rows: pa.Table, cfg: DownloadConfig) -> str:
    """Identity of a source's download: its (uid, url, path, caption) rows and the img2dataset settings."""
    from plantmix.stages.i2d_hooks import HOOKS_VERSION

    h = hashlib.sha256(json.dumps({**_img2dataset_args(cfg), "hooks": HOOKS_VERSION}, sort_keys=True).encode())
    for col in ("uid", "url", "path", "caption"):
        h.update(col.encode())
        for v in rows[col].to_pylist():
            h.update(b"\x00" if v is None else v.encode() + b"\x01")
    return h.hexdigest()


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


def _run_img2dataset(args: dict, log_path: str) -> None:
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
        # img2dataset would otherwise start its own session asking for 16 GB of driver memory.
        from pyspark.sql import SparkSession

        spark = (
            SparkSession.builder.master(f"local[{args['processes_count']}]")
            .config("spark.driver.memory", "2g")
            .config("spark.ui.enabled", "false")
            .appName("plantmix-download")
            .getOrCreate()
        )
        spark.sparkContext.setLogLevel("ERROR")
    from img2dataset import download

    from plantmix.stages.i2d_hooks import install

    install()
    download(**args)


def _kill_leftover(started: Path) -> None:
    try:
        pgid = json.loads(started.read_text()).get("pgid")
    except (OSError, ValueError):
        return
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

    Idempotent: a finished download with the same fingerprint is skipped. A partial one from the same
    inputs resumes; anything else is wiped first. Returns a summary dict (counts by status).
    """
    out_dir = Path(out_dir)
    key = source_fingerprint(rows, cfg)
    if is_done(out_dir, key):
        return {"skipped": True}
    started = out_dir.with_name(out_dir.name + ".started.json")
    _kill_leftover(started)
    try:
        same_inputs = json.loads(started.read_text()).get("key") == key
    except (OSError, ValueError):
        same_inputs = False
    if out_dir.exists() and not same_inputs:
        shutil.rmtree(out_dir)
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

    proc = multiprocessing.get_context("fork").Process(target=_run_img2dataset, args=(args, str(log_path)))
    proc.start()
    atomic_write_text(started, json.dumps({"key": key, "pgid": proc.pid}))
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
    mark_done(out_dir, key, rows=rows.num_rows, **summary)
    started.unlink(missing_ok=True)
    return summary


def summarize_download(out_dir: Path) -> dict:
    """Counts by img2dataset status across a download folder's per-shard parquet files."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for f in sorted(Path(out_dir).glob("*.parquet")):
        t = pq.read_table(f, columns=["status"])
        for item in pc.value_counts(t["status"]).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return {"status_counts": counts}
