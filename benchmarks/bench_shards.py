"""Benchmark the shard writer against a plain tarfile copy of the same download shards.

    python benchmarks/bench_shards.py [--samples 20000] [--image-size 384] [--shard-size 10000] [--workers 1]

Builds (once, cached in --workdir) a build directory in img2dataset's layout: download tars of 1,000
samples (`<key>.jpg/.txt/.json`, real JPEGs of about the size img2dataset stores at --image-size) and a
manifest with every row kept. A mix of all rows is selected once; then, alternating, two repeats of:
  copy    read every download tar sequentially with tarfile and write all members unchanged into
          new tars of --shard-size samples (the floor for any shard writer);
  shards  plantmix.shards.write_shards: index the download tars, read the selected images in
          offset order, write shuffled shards with new .json/.txt, per-shard parquet with sha256,
          sizes.json and dataset.json.
Prints samples/s and MB/s (output tar bytes) of the best repeat of each and the ratio. Then the check
a rerun makes before it skips the finished shards (plantmix.mix.shards.shard_intact): as left (sizes
only) and after every shard was touched (a copy: every tar and parquet hashed again), each as a
share of the writing time.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from plantmix.mix.manifest import write_mix_manifest
from plantmix.mix.select import read_selection_columns, select
from plantmix.mix.spec import MixSpec
from plantmix.core.schema import CANDIDATE_FIELDS, MANIFEST_EXTRA_FIELDS
from plantmix.mix.shards import shard_intact, write_shards
from plantmix.core.stage import fingerprint, mark_done

SCHEMA = pa.schema(
    [f for f in CANDIDATE_FIELDS if f.name != "drop_reason"] + MANIFEST_EXTRA_FIELDS + [pa.field("drop_reason", pa.string())]
)
PER_TAR = 1_000


def photo_like_jpegs(count: int, size: int, rng: np.random.Generator) -> list[bytes]:
    """JPEGs with smooth structure plus noise: about 2 bits/pixel at quality 95, like stored photos."""
    out = []
    yy, xx = np.mgrid[0:size, 0: size * 3 // 4]
    for _ in range(count):
        f = rng.uniform(0.01, 0.05, 3)
        base = np.stack([np.sin(xx * f[c] + yy * f[(c + 1) % 3]) for c in range(3)], -1) * 90 + 128
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def make_build(root: Path, samples: int, image_size: int) -> None:
    rng = np.random.default_rng(0)
    images = photo_like_jpegs(64, image_size, rng)
    rows = []
    for i in range(samples):
        source = "plant_a" if i % 13 < 10 else "web"
        shard, j = divmod(i, PER_TAR)
        out = root / "download" / source
        img = images[i % len(images)]
        key = f"{shard:05d}{j:04d}"
        rows.append({
            "uid": hashlib.sha256(str(i).encode()).hexdigest()[:32], "source": source,
            "domain": "plant" if source == "plant_a" else "general", "url": f"https://example.org/{i}.jpg",
            "caption": f"a photo of sample {i}", "license": "CC-BY-4.0", "attribution": "bench",
            "taxon_species": f"Genus species{i % 500}" if source == "plant_a" else None,
            "input_rows": 1, "status": "success", "sha256": hashlib.sha256(img).hexdigest(),
            "width": image_size, "height": image_size * 3 // 4, "shard": f"download/{source}/{shard:05d}.tar",
            "key": key, "keep": True,
        })  # fmt: skip
    # img2dataset writes one tar per (source, shard number); group rows accordingly
    by_tar: dict[str, list[dict]] = {}
    for r in rows:
        by_tar.setdefault(r["shard"], []).append(r)
    for tar, members in by_tar.items():
        (root / tar).parent.mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(root / tar)) as w:
            for r in members:
                i = int(r["url"].rsplit("/", 1)[1].split(".")[0])
                w.write({"__key__": r["key"], "jpg": images[i % len(images)], "txt": r["caption"],
                         "json": json.dumps({"key": r["key"], "caption": r["caption"]}).encode()})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "manifest.parquet")


def plain_copy(build: Path, out: Path, shard_size: int) -> tuple[int, int]:
    """Sequential tarfile read of every download tar, members written unchanged into new tars."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    samples, shard_no, in_shard, writer, keys = 0, 0, 0, None, None
    for src in sorted(build.glob("download/*/*.tar")):
        with tarfile.open(src, "r|") as tf:
            for m in tf:
                key = m.name.split(".")[0]
                if key != keys:
                    keys = key
                    samples += 1
                    in_shard += 1
                    if writer is None or in_shard > shard_size:
                        if writer:
                            writer.close()
                        writer = tarfile.open(out / f"{shard_no:05d}.tar", "w")
                        shard_no, in_shard = shard_no + 1, 1
                writer.addfile(m, tf.extractfile(m))
    if writer:
        writer.close()
    return samples, sum(p.stat().st_size for p in out.glob("*.tar"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/plantmix-bench-shards"))
    args = p.parse_args()
    build = args.workdir / f"build-{args.samples}-{args.image_size}"
    if not (build / "manifest.parquet").exists():
        t = time.perf_counter()
        make_build(build, args.samples, args.image_size)
        print(f"built {build} in {time.perf_counter() - t:.0f} s")
    source_bytes = sum(p.stat().st_size for p in build.glob("download/*/*.tar"))
    plant = sum(1 for i in range(args.samples) if i % 13 < 10)
    spec = MixSpec(name="bench", plant=plant, general=args.samples - plant, shard_size=args.shard_size)
    mix_dir = build / "mixes" / "bench"
    t = time.perf_counter()
    sel = select(read_selection_columns(build / "manifest.parquet", spec), spec)
    key = fingerprint({"bench": spec.model_dump(mode="json")})
    write_mix_manifest(build / "manifest.parquet", sel, mix_dir / "manifest.parquet", spec.shard_size)
    mark_done(mix_dir / "manifest.parquet", key, rows=len(sel), available=sel.available)
    print(f"{args.samples:,} samples, {source_bytes / 1e6:,.0f} MB of download tars; selection + mix manifest {time.perf_counter() - t:.1f} s")

    runs: dict[str, list[tuple[float, int, int]]] = {"copy": [], "shards": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        n, size = plain_copy(build, args.workdir / "copy", args.shard_size)
        runs["copy"].append((time.perf_counter() - t, n, size))
        shutil.rmtree(mix_dir / "shards", ignore_errors=True)
        (mix_dir / "source_index.parquet.done.json").unlink(missing_ok=True)
        t = time.perf_counter()
        write_shards(build, mix_dir, spec, select_key=key, workers=args.workers)
        size = sum(p.stat().st_size for p in (mix_dir / "shards").glob("*.tar"))
        runs["shards"].append((time.perf_counter() - t, len(sel), size))
    best = {name: min(r) for name, r in runs.items()}
    for name, (seconds, n, size) in best.items():
        print(f"{name:7s}: {seconds:6.2f} s  {n / seconds:9,.0f} samples/s  {size / 1e6 / seconds:7.1f} MB/s  ({size / 1e6:,.0f} MB written)")
    ratio = (best["shards"][2] / best["shards"][0]) / (best["copy"][2] / best["copy"][0])
    print(f"shard writer throughput = {ratio:.0%} of the plain tarfile copy (MB/s; workers={args.workers})")
    rerun_check(mix_dir, key, best["shards"][0])


def rerun_check(mix_dir: Path, key: str, write_seconds: float) -> None:
    """Time the verify-before-skip check of every shard, quick (as written) and hashed (touched)."""
    shards = sorted(mix_dir.glob("shards/*.tar"))
    for label in ("as written", "after a touch"):
        if label == "after a touch":
            for tar in shards:
                tar.touch()
                tar.with_suffix(".parquet").touch()
        t = time.perf_counter()
        intact = all(shard_intact(mix_dir / "shards", key, i) for i in range(len(shards)))
        seconds = time.perf_counter() - t
        print(f"rerun check, {label:13s}: {seconds:6.3f} s for {len(shards)} shards (intact: {intact}) = "
              f"{seconds / write_seconds:.1%} of writing them")


if __name__ == "__main__":
    main()
