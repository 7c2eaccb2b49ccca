"""Perceptual hashes of every downloaded image: `hashes/<source>/<shard>.parquet`, one file per tar.

Each tar is read once; per image it records the pHash, the pHash of its mirror image (so a flipped
copy is a near duplicate too) and the stored size in bytes (the keep rule's bytes-per-pixel). A
per-tar marker keyed on the tar's listing makes an interrupted run redo only unfinished tars.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from plantmix.core.errors import PlantmixError
from plantmix.core.hashing import phash_pair_bytes
from plantmix.core.pools import worker_pool
from plantmix.core.members import IMAGE_EXTS, split_member
from plantmix.core.stage import fingerprint, is_done, listing, mark_done, write_parquet

HASH_VERSION = 2  # 2: mirror pHash and stored bytes
HASH_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("phash", pa.uint64()),
        pa.field("phash_mirror", pa.uint64()),
        pa.field("stored_bytes", pa.int64()),
        pa.field("phash_error", pa.string()),
    ]
)


def hash_one_shard(tar_path: str) -> pa.Table:
    """The hash table of one download tar (see module doc); undecodable images get `phash_error`."""
    rows: dict[str, list] = {name: [] for name in HASH_SCHEMA.names}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = split_member(m.name)
            if not m.isreg() or ext.lower() not in IMAGE_EXTS:
                continue
            data = tar.extractfile(m).read()
            try:
                h, hm, err = *phash_pair_bytes(data), None
            except PlantmixError as e:  # recorded, decided on in the join
                h, hm, err = None, None, f"phash failed: {e}"
            for name, v in zip(HASH_SCHEMA.names, (key, h, hm, len(data), err)):
                rows[name].append(v)
    return pa.table(rows, schema=HASH_SCHEMA)


def hash_shards(
    download_dir: Path, hashes_dir: Path, workers: int = 2, progress: Callable[[int, int], None] | None = None
) -> bool:
    """Hash every tar under `download_dir/<source>/` not hashed yet; return whether any work was done."""
    tars = sorted(Path(download_dir).glob("*/*.tar"))
    todo = []
    for tar in tars:
        out = Path(hashes_dir) / tar.parent.name / (tar.stem + ".parquet")
        key = fingerprint({"stage": "phash", "v": HASH_VERSION, "tar": listing(tar)})
        if not is_done(out, key):
            todo.append((tar, out, key))
    done = len(tars) - len(todo)
    if progress:
        progress(done, len(tars))
    if todo:
        with worker_pool(workers) as pool:  # its workers die with the build, even on SIGKILL
            for (tar, out, key), table in zip(todo, pool.map(hash_one_shard, [str(t) for t, _, _ in todo])):
                write_parquet(table, out)
                mark_done(out, key)
                done += 1
                if progress:
                    progress(done, len(tars))
    return bool(todo)
