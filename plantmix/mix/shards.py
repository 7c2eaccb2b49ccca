"""Shard writer (DESIGN §5): copy a mix's samples out of the download shards into shuffled tars.

Nothing is extracted to disk. First the headers of every download tar the mix uses are scanned once
to find each selected image's byte range (`source_index.parquet`, aligned row for row with the mix
manifest). Then each output shard reads its samples grouped by download tar in offset order, one
open file per tar and nearby members coalesced into one read, so dense selections become
sequential reads. Captions and metadata come from the manifest, not from the download tars.

Output per shard: `NNNNN.tar` (members `<key>.jpg|png|webp`, `<key>.json`, `<key>.txt`, sorted by
name within a sample, fixed mtime/owner/mode so equal input gives equal bytes), `NNNNN.parquet`
(one row per sample, including the sha256 of the image bytes as written) and the stage marker
`NNNNN.tar.done.json` (the size and sha256 of the tar and of its parquet). Each shard is written
atomically and independently: a rerun rewrites exactly the shards that are missing or no longer
match their marker (an interrupted run, a deleted or truncated shard).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import re
import tarfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds

from plantmix.core.errors import PlantmixError
from plantmix.core.members import IMAGE_EXTS, split_member
from plantmix.core.pools import worker_pool
from plantmix.core.schema import CAPTION_TEMPLATES, TAXON_RANKS
from plantmix.core.stage import atomic_path, atomic_write_text, fingerprint, mark_done, write_parquet
from plantmix.mix.verify import file_record, output_intact

TAR_MTIME = 0  # fixed so that identical input gives byte-identical shards
_COALESCE_GAP = 256 << 10  # read through gaps this small instead of seeking
_MAX_READ = 64 << 20
_SHARD_VERSION = 1

SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("source", pa.string()),
        ("domain", pa.string()),
        ("caption", pa.string()),  # the text written as <key>.txt
        ("image_ext", pa.string()),
        ("image_bytes", pa.int64()),
        ("sha256", pa.string()),  # of the image bytes as written (verify checks this)
        ("src_shard", pa.string()),
        ("src_key", pa.string()),
        ("mix_position", pa.int64()),
    ]
)


def shard_stem(i: int) -> str:
    return f"{i:05d}"


def shard_key(select_key: str, i: int) -> str:
    """The fingerprint shard i of a selection is written (and checked) with."""
    return fingerprint({"select": select_key, "shard": i, "version": _SHARD_VERSION})


def shard_intact(shards_dir: Path, select_key: str, i: int) -> bool:
    """Shard i's tar and parquet exist and match its marker (see plantmix.mix.verify)."""
    return output_intact(Path(shards_dir) / f"{shard_stem(i)}.tar", shard_key(select_key, i), "parquet")


# ---- where the bytes are ----------------------------------------------------------------------


def scan_tar(path: Path) -> dict[str, tuple[int, int, str]]:
    """key -> (data offset, size, extension) of each image member, reading headers only."""
    found: dict[str, tuple[int, int, str]] = {}
    try:
        with tarfile.open(path, "r:") as tf:  # random-access mode: seeks over member data
            for m in tf:
                if m.isfile():
                    key, ext = split_member(m.name)
                    if ext.lower() in IMAGE_EXTS:
                        found[key] = (m.offset_data, m.size, ext.lower())
    except FileNotFoundError:
        raise PlantmixError(f"{path}: download shard not found") from None
    except (tarfile.TarError, OSError) as e:
        raise PlantmixError(f"{path}: unreadable download shard: {e}") from None
    return found


def _index_tar(task: tuple[str, list[str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    path, keys = task
    members = scan_tar(Path(path))
    offsets, sizes, exts = np.empty(len(keys), np.int64), np.empty(len(keys), np.int64), []
    for j, key in enumerate(keys):
        hit = members.get(key)
        if hit is None:
            raise PlantmixError(f"{path}: no image member for manifest key {key!r}")
        offsets[j], sizes[j] = hit[0], hit[1]
        exts.append(hit[2])
    return offsets, sizes, exts


def build_source_index(build_dir: Path, mix_manifest: Path, out: Path, workers: int = 1) -> None:
    """Write `out`: image_ext, image_offset, image_size for every mix manifest row, same order."""
    pf = pq.ParquetFile(mix_manifest)
    t = pf.read(columns=["shard", "key"])
    if t.num_rows and (t["shard"].null_count or t["key"].null_count):
        missing = pc.indices_nonzero(pc.or_(pc.is_null(t["shard"]), pc.is_null(t["key"])))[0].as_py()
        bad = pf.read(columns=["uid"])["uid"][missing].as_py()
        raise PlantmixError(f"{mix_manifest}: row uid={bad!r} has no download shard/key")
    shard = pc.dictionary_encode(t["shard"].combine_chunks()) if t.num_rows else None
    codes = shard.indices.to_numpy() if shard is not None else np.zeros(0, np.int32)
    tars = shard.dictionary.to_pylist() if shard is not None else []
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.r_[True, codes[order][1:] != codes[order][:-1], True]) if len(order) else [0]
    keys = t["key"].combine_chunks() if t.num_rows else pa.array([], pa.string())
    groups = list(zip(bounds[:-1], bounds[1:]))

    def tasks() -> Iterator[tuple[str, list[str]]]:
        for a, b in groups:
            yield str(build_dir / tars[codes[order[a]]]), keys.take(pa.array(order[a:b])).to_pylist()

    offsets, sizes = np.empty(t.num_rows, np.int64), np.empty(t.num_rows, np.int64)
    exts = np.empty(t.num_rows, object)
    for (a, b), (off, size, ext) in zip(groups, _map(_index_tar, tasks(), workers)):
        rows = order[a:b]
        offsets[rows], sizes[rows], exts[rows] = off, size, ext
    index = pa.table(
        {"image_ext": pa.array(exts.tolist(), pa.string()), "image_offset": offsets, "image_size": sizes}
    )
    group_rows = pf.metadata.row_group(0).num_rows if pf.metadata.num_row_groups else 1
    with atomic_path(out) as tmp:
        pq.write_table(index, tmp, compression="zstd", row_group_size=max(group_rows, 1))


def _map(fn, items, workers: int):
    """map(fn, items) in order, over `workers` processes; submits a bounded window at a time."""
    if workers <= 1:
        yield from map(fn, items)
        return
    items = iter(items)
    with worker_pool(workers) as pool:  # its workers die with the mix, even on SIGKILL
        while window := list(itertools.islice(items, 8 * workers)):
            yield from pool.map(fn, window)


def read_images(build_dir: Path, tars: list[str], offsets: np.ndarray, sizes: np.ndarray) -> list[bytes]:
    """Image bytes for each row; each tar opened once, members read in offset order, coalesced."""
    out: list[bytes] = [b""] * len(tars)
    order = sorted(range(len(tars)), key=lambda r: (tars[r], offsets[r]))
    i = 0
    while i < len(order):
        tar = tars[order[i]]
        path = build_dir / tar
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise PlantmixError(f"{path}: download shard not found") from None
        try:
            while i < len(order) and tars[order[i]] == tar:
                start = int(offsets[order[i]])
                end, j = start + int(sizes[order[i]]), i + 1
                while (
                    j < len(order)
                    and tars[order[j]] == tar
                    and offsets[order[j]] - end <= _COALESCE_GAP
                    and offsets[order[j]] + sizes[order[j]] - start <= _MAX_READ
                ):
                    end = max(end, int(offsets[order[j]] + sizes[order[j]]))
                    j += 1
                buf = os.pread(fd, end - start, start)
                if len(buf) < end - start:
                    raise PlantmixError(f"{path}: truncated; expected data up to byte {end}")
                view = memoryview(buf)
                for r in order[i:j]:
                    a = int(offsets[r]) - start
                    out[r] = bytes(view[a : a + int(sizes[r])])
                i = j
        finally:
            os.close(fd)
    return out


# ---- one output shard -------------------------------------------------------------------------

_META_COLUMNS = [
    "uid", "source", "domain", "url", "caption", *[f"caption_{t}" for t in CAPTION_TEMPLATES],
    "license", "attribution", *[f"taxon_{r}" for r in TAXON_RANKS], "common_name", "width", "height",
    "shard", "key", "mix_key", "mix_position", "mix_shard", "captions",
]  # fmt: skip


def sample_meta(row: dict, caption: str) -> dict:
    """The `<key>.json` of one sample: provenance, taxonomy and every caption variant present."""
    meta = {k: row.get(k) for k in ("uid", "source", "domain", "license", "attribution", "url", "width", "height")}
    meta["key"] = row["mix_key"]
    meta["caption"] = caption
    if row.get("captions"):  # the valid captions of the row's duplicate group (DESIGN §3), its own first
        meta["captions"] = row["captions"]
    for t in CAPTION_TEMPLATES:
        if row.get(f"caption_{t}") is not None:
            meta[f"caption_{t}"] = row[f"caption_{t}"]
    meta["taxonomy"] = {r: row[f"taxon_{r}"] for r in TAXON_RANKS if row.get(f"taxon_{r}") is not None}
    if row.get("common_name") is not None:
        meta["common_name"] = row["common_name"]
    return meta


def write_shard(build_dir: Path, mix_dir: Path, i: int, caption_field: str, key: str) -> int:
    """Write shards/NNNNN.tar and .parquet for row group i of the mix manifest; return its sample count."""
    manifest = pq.ParquetFile(mix_dir / "manifest.parquet")
    columns = [c for c in _META_COLUMNS if c in manifest.schema_arrow.names]
    rows = manifest.read_row_group(i, columns=columns).to_pylist()
    index = pq.ParquetFile(mix_dir / "source_index.parquet").read_row_group(i)
    if any(r["mix_shard"] != i for r in rows) or index.num_rows != len(rows):
        raise PlantmixError(f"{mix_dir}: manifest row group {i} does not match shard {i}; delete the mix and rerun")
    tars = [r["shard"] for r in rows]
    exts = index["image_ext"].to_pylist()
    images = read_images(build_dir, tars, index["image_offset"].to_numpy(), index["image_size"].to_numpy())

    shards_dir = mix_dir / "shards"
    records = []
    tar_path = shards_dir / f"{shard_stem(i)}.tar"
    with atomic_path(tar_path) as tmp:
        with open(tmp, "wb") as raw, wds.TarWriter(f := HashingWriter(raw), user="", group="", mode=0o644, mtime=TAR_MTIME, encoder=False) as w:
            for row, ext, image in zip(rows, exts, images):
                text = row.get(caption_field) or row.get("caption") or ""
                meta = json.dumps(sample_meta(row, text), sort_keys=True, ensure_ascii=False)
                w.write({"__key__": row["mix_key"], ext: image, "json": meta.encode(), "txt": text.encode()})
                records.append(
                    (row["mix_key"], row["uid"], row["source"], row["domain"], text, ext, len(image),
                     hashlib.sha256(image).hexdigest(), row["shard"], row["key"], row["mix_position"])
                )  # fmt: skip
    table = pa.Table.from_pylist([dict(zip(SHARD_SCHEMA.names, r)) for r in records], schema=SHARD_SCHEMA)
    parquet = shards_dir / f"{shard_stem(i)}.parquet"
    write_parquet(table, parquet)
    tar_record = {"bytes": f.size, "sha256": f.sha256.hexdigest()}  # hashed on the way out: no second read
    mark_done(tar_path, key, samples=len(rows), file=tar_record, parquet=file_record(parquet))
    return len(rows)


class HashingWriter:
    """A write-only stream (what TarWriter's stream mode needs) that forwards to `raw` and keeps the
    sha256 and size of everything written."""

    def __init__(self, raw) -> None:  # noqa: ANN001 (a binary file)
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _write_shard_job(args: tuple) -> int:
    return write_shard(*args)


# ---- the whole mix ----------------------------------------------------------------------------

_SHARD_FILE = re.compile(r"^(\d+)\.(tar|parquet|tar\.done\.json)$")


def _clean(shards_dir: Path, num_shards: int) -> None:
    """Remove temporaries of killed runs and shards beyond the current plan."""
    for p in shards_dir.iterdir():
        m = _SHARD_FILE.match(p.name)
        if (p.name.startswith(".") and ".tmp-" in p.name) or (m and int(m.group(1)) >= num_shards):
            p.unlink()


def write_shards(
    build_dir: Path,
    mix_dir: Path,
    spec,
    *,
    select_key: str,
    recipe_hash: str | None = None,
    manifest_fingerprint: str | None = None,
    workers: int = 1,
) -> dict:
    """Write every missing or damaged shard of a selected mix, then sizes.json and dataset.json;
    return the latter."""
    build_dir, mix_dir = Path(build_dir), Path(mix_dir)
    mix_manifest = mix_dir / "manifest.parquet"
    index = mix_dir / "source_index.parquet"
    if not output_intact(index, select_key):
        build_source_index(build_dir, mix_manifest, index, workers)
        mark_done(index, select_key, file=file_record(index))
    num_shards = pq.ParquetFile(mix_manifest).metadata.num_row_groups
    shards_dir = mix_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    _clean(shards_dir, num_shards)

    todo = [
        (build_dir, mix_dir, i, spec.caption_field, shard_key(select_key, i))
        for i in range(num_shards)
        if not shard_intact(shards_dir, select_key, i)
    ]
    for _ in _map(_write_shard_job, todo, workers):
        pass

    info = dataset_info(mix_dir, spec, recipe_hash=recipe_hash, select_key=select_key, manifest_fingerprint=manifest_fingerprint)
    atomic_write_text(shards_dir / "sizes.json", json.dumps(info["counts"]["shard"], indent=1) + "\n")
    atomic_write_text(mix_dir / "dataset.json", json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def _counts(column: pa.ChunkedArray) -> dict:
    vc = pc.value_counts(column).to_pylist() if len(column) else []
    return {str(v["values"]): v["counts"] for v in sorted(vc, key=lambda v: str(v["values"]))}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("plantmix-dalip", "pyarrow", "numpy", "duckdb", "webdataset"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def dataset_info(
    mix_dir: Path, spec, *, recipe_hash: str | None, select_key: str, manifest_fingerprint: str | None = None
) -> dict:
    """The contents of dataset.json: what the shards hold and how they were made."""
    t = pq.read_table(mix_dir / "manifest.parquet", columns=["domain", "source", "mix_shard", "mix_repeat"])
    n = t.num_rows
    per_shard = {f"{shard_stem(int(k))}.tar": v for k, v in _counts(t["mix_shard"]).items()}
    per_shard = dict(sorted(per_shard.items()))
    by_domain = _counts(t["domain"])
    marker = json.loads((mix_dir / "manifest.parquet.done.json").read_text())
    last = len(per_shard) - 1
    return {
        "name": mix_dir.name,
        "format": "webdataset",
        "samples": n,
        "shard_size": spec.shard_size,
        "num_shards": len(per_shard),
        "train_data": f"shards/{{{shard_stem(0)}..{shard_stem(last)}}}.tar" if per_shard else None,
        "plant_share": by_domain.get("plant", 0) / n if n else None,
        "requested": {"ratio": spec.ratio, "total": spec.total, **{f"{d}_rows": c for d, c in spec.counts().items()}},
        "seed": spec.seed,
        "spec": spec.model_dump(mode="json"),
        "available_after_caps": marker.get("available"),
        "repeated_samples": int(pc.sum(pc.greater(t["mix_repeat"], 0)).as_py() or 0) if n else 0,
        "counts": {"domain": by_domain, "source": _counts(t["source"]), "shard": per_shard},
        "recipe_hash": recipe_hash,
        "manifest_fingerprint": manifest_fingerprint,  # of the build manifest the rows were selected from
        "mix_fingerprint": select_key,
        "versions": _versions(),
    }
