"""Benchmark mix selection on a synthetic manifest, against a straightforward pandas implementation.

    python benchmarks/bench_mix.py --rows 13000000 [--species 120000] [--cap 1000] [--with-manifest]

Generates (once, cached in --workdir) an N-row manifest with the schema's columns: plant rows
(80 %) spread over `--species` species with a Zipf long tail (frequency ∝ rank^-0.9), general rows (20 %), 4 % keep = false.
Then, each in its own child process so that peak RSS is per phase:
  select   plantmix.mix.select: read the needed columns, hash, order, cap, take, shuffle;
  pandas   the same selection written plainly in pandas (sort_values, groupby().cumcount(), iloc),
           computing the same documented hash one Python call per row, as a straightforward
           implementation would; results must be identical;
  pandas-vh the same pandas code but with plantmix's vectorised hash, to isolate the pandas part;
  manifest (with --with-manifest) DuckDB join + sort + write of the full selected rows.
The selection is 10/13 · N plant and 3/13 · N general rows with a per-species cap; as that takes
every row, the capped-out remainder is filled with repeats (--allow-repeat semantics), which the
pandas version reproduces. Prints time and peak RSS per phase, the speed-up, and checks that both
implementations choose the same rows in the same shuffled positions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.mix.manifest import write_mix_manifest
from plantmix.mix.select import fnv1a64, read_selection_columns, select, selection_keys, shuffle_keys, splitmix64
from plantmix.mix.spec import MixSpec
from plantmix.core.schema import CANDIDATE_FIELDS, MANIFEST_EXTRA_FIELDS

SCHEMA = pa.schema(
    [f for f in CANDIDATE_FIELDS if f.name != "drop_reason"] + MANIFEST_EXTRA_FIELDS + [pa.field("drop_reason", pa.string())]
)
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
PLANT_SOURCES = ["plantclef2022_trusted", "gbif_plantae_media", "inat2021_plantae", "plantnet300k"]
GENERAL_SOURCES = ["cc12m", "datacomp_medium"]
CHUNK = 1_000_000
ZIPF_EXPONENT = 0.9  # species frequency ∝ rank^-0.9 over all --species species


def hex_strings(raw: np.ndarray) -> pa.Array:
    n, k = raw.shape
    out = np.empty((n, 2 * k), np.uint8)
    out[:, 0::2], out[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    offsets = np.arange(0, (n + 1) * 2 * k, 2 * k, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))


def dict_strings(indices: np.ndarray, values: list[str]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(values)).cast(pa.string())


def generate(path: Path, rows: int, species: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    zipf_cdf = np.cumsum(1.0 / np.arange(1, species + 1) ** ZIPF_EXPONENT)
    zipf_cdf /= zipf_cdf[-1]
    names = [f"Genus{s // 8} species{s}" for s in range(species)]
    captions = [f"a photo of {n}." for n in names]
    general_captions = [f"a photo of everyday scene number {i}." for i in range(50_000)]
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            plant = rng.random(n) < 0.8
            sp = np.searchsorted(zipf_cdf, rng.random(n), side="right")
            src = np.where(plant, rng.integers(0, len(PLANT_SOURCES), n), len(PLANT_SOURCES) + rng.integers(0, 2, n))
            uid = hex_strings(rng.integers(0, 256, (n, 16), dtype=np.uint8))
            keep = rng.random(n) >= 0.04
            shard_no = (start + np.arange(n)) // 10_000
            cols = {f.name: pa.nulls(n, f.type) for f in SCHEMA}
            cols.update(
                uid=uid,
                source=dict_strings(src, PLANT_SOURCES + GENERAL_SOURCES),
                domain=dict_strings((~plant).astype(np.int32), ["plant", "general"]),
                url=pc.binary_join_element_wise("https://img.example.org/", uid, ".jpg", ""),
                caption=pc.if_else(pa.array(plant), dict_strings(sp, captions), dict_strings(rng.integers(0, 50_000, n), general_captions)),
                license=dict_strings(rng.integers(0, 3, n), ["CC0-1.0", "CC-BY-4.0", "CC-BY-NC-4.0"]),
                attribution=dict_strings(rng.integers(0, 1000, n), [f"contributor {i}" for i in range(1000)]),
                input_rows=pa.array(np.ones(n, np.int64)),
                status=pa.array(["success"] * n),
                sha256=hex_strings(rng.integers(0, 256, (n, 32), dtype=np.uint8)),
                phash=pa.array(rng.integers(0, 2**63, n, dtype=np.uint64)),
                width=pa.array(rng.integers(200, 385, n)),
                height=pa.array(rng.integers(200, 385, n)),
                shard=dict_strings(shard_no - shard_no[0], [f"download/s/{i:05d}.tar" for i in range(shard_no[0], shard_no[-1] + 1)]),
                key=pa.array(np.char.zfill((start + np.arange(n)).astype(str), 9)),
                keep=pa.array(keep),
                drop_reason=pc.if_else(pa.array(keep), pa.nulls(n, pa.string()), pa.scalar("duplicate_near")),
            )  # fmt: skip
            for rank, div in (("species", 1), ("genus", 8), ("family", 300)):
                vals = names if rank == "species" else [f"{rank.title()}{i}" for i in range(species // div + 1)]
                cols[f"taxon_{rank}"] = pc.if_else(pa.array(plant), dict_strings(sp // div, vals), pa.nulls(n, pa.string()))
            cols["taxon_kingdom"] = pc.if_else(pa.array(plant), pa.scalar("Plantae"), pa.nulls(n, pa.string()))
            writer.write_table(pa.table(cols, schema=SCHEMA), row_group_size=256_000)
    os.replace(tmp, path)


def spec_for(rows: int, cap: int) -> MixSpec:
    plant = round(rows * 10 / 13)
    return MixSpec(plant=plant, general=rows - plant, per_taxon_cap=cap, allow_repeat=True, seed=0)


def phase_select(manifest: Path, spec: MixSpec, out: Path) -> dict:
    t = time.perf_counter()
    sel = select(read_selection_columns(manifest, spec), spec)
    seconds = time.perf_counter() - t
    np.save(out / "select_row.npy", sel.row)
    np.save(out / "select_position.npy", sel.position)
    return {"seconds": seconds, "selected": len(sel), "available": sel.available, "repeated": int((sel.repeat > 0).sum())}


_M64 = (1 << 64) - 1


def py_selection_key(uid: str, seed_mix: int) -> int:
    """plantmix's selection key for one uid in plain Python: splitmix64(fnv1a64(uid) ^ splitmix64(seed))."""
    h = 0xCBF29CE484222325
    for byte in uid.encode():
        h = ((h ^ byte) * 0x100000001B3) & _M64
    z = ((h ^ seed_mix) + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def pandas_select(manifest: Path, spec: MixSpec, out: Path, prefix: str, vector_hash: bool) -> dict:
    """The selection written plainly in pandas: sort_values, groupby().cumcount(), iloc."""
    import pandas as pd

    t = time.perf_counter()
    df = pd.read_parquet(manifest, columns=["uid", "domain", "source", "keep", "taxon_species"])
    df["row"] = np.arange(len(df))
    df = df[df["keep"]]
    if vector_hash:  # plantmix's vectorised hash: isolates the pandas part of the work
        df["k"] = selection_keys(fnv1a64(pa.array(df["uid"].to_numpy(), pa.string())), spec.seed)
    else:  # what a straightforward implementation does: one Python call per row
        seed_mix = int(splitmix64(np.uint64(spec.seed)))
        df["k"] = np.array([py_selection_key(u, seed_mix) for u in df["uid"]], dtype=np.uint64)
    parts = []
    for domain, n in spec.counts().items():
        d = df[df["domain"] == domain].sort_values("k", ascending=False, kind="stable")
        rank = d.groupby("taxon_species", dropna=False, sort=False).cumcount()
        d = d[d["taxon_species"].isna() | (rank < spec.per_taxon_cap)]
        take = np.arange(n)
        picked = d.iloc[take % len(d)][["row", "k"]].reset_index(drop=True)
        picked["repeat"] = take // len(d)
        parts.append(picked)
    sel = pd.concat(parts, ignore_index=True)
    sel["s"] = shuffle_keys(sel["k"].to_numpy(), sel["repeat"].to_numpy())
    order = sel.sort_values("s", kind="stable").index.to_numpy()
    position = np.empty(len(sel), np.int64)
    position[order] = np.arange(len(sel))
    seconds = time.perf_counter() - t
    np.save(out / f"{prefix}_row.npy", sel["row"].to_numpy())
    np.save(out / f"{prefix}_position.npy", position)
    return {"seconds": seconds, "selected": len(sel)}


def phase_pandas(manifest: Path, spec: MixSpec, out: Path) -> dict:
    return pandas_select(manifest, spec, out, "pandas", vector_hash=False)


def phase_pandas_vector_hash(manifest: Path, spec: MixSpec, out: Path) -> dict:
    return pandas_select(manifest, spec, out, "pandas_vh", vector_hash=True)


def phase_manifest(manifest: Path, spec: MixSpec, out: Path) -> dict:
    sel = select(read_selection_columns(manifest, spec), spec)
    t = time.perf_counter()
    write_mix_manifest(manifest, sel, out / "mix_manifest.parquet", spec.shard_size)
    return {"seconds": time.perf_counter() - t, "bytes": (out / "mix_manifest.parquet").stat().st_size}


PHASES = {"select": phase_select, "pandas": phase_pandas, "pandas-vh": phase_pandas_vector_hash, "manifest": phase_manifest}


def run_child(args: argparse.Namespace, phase: str) -> dict:
    """Run one phase in a child process; return its JSON result plus the child's own peak RSS."""
    cmd = [sys.executable, __file__, "--phase", phase, "--rows", str(args.rows), "--species", str(args.species),
           "--cap", str(args.cap), "--workdir", str(args.workdir)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"phase {phase} failed (status {status})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # the whole child, imports included
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=13_000_000)
    p.add_argument("--species", type=int, default=120_000)
    p.add_argument("--cap", type=int, default=1_000, help="per-species cap")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/plantmix-bench-mix"))
    p.add_argument("--skip-pandas", action="store_true")
    p.add_argument("--with-manifest", action="store_true", help="also time writing the mix manifest (DuckDB)")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    manifest = args.workdir / f"manifest-{args.rows}-{args.species}.parquet"
    spec = spec_for(args.rows, args.cap)
    if args.phase:
        print(json.dumps(PHASES[args.phase](manifest, spec, args.workdir)))
        return

    if not manifest.exists():
        t = time.perf_counter()
        generate(manifest, args.rows, args.species)
        print(f"generated {manifest} ({manifest.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    with open(manifest, "rb") as f:  # warm the page cache so that no phase pays for the first read
        while f.read(1 << 24):
            pass
    t = pq.read_table(manifest, columns=["domain", "taxon_species"])
    n_species = pc.count_distinct(t["taxon_species"]).as_py()
    plant_rows = pc.sum(pc.equal(t["domain"], "plant")).as_py()
    del t
    print(f"manifest: {args.rows:,} rows, {plant_rows:,} plant rows over {n_species:,} species (Zipf), "
          f"selection: {spec.counts()['plant']:,} plant / {spec.counts()['general']:,} general, cap {args.cap} per species")  # fmt: skip

    ours = run_child(args, "select")
    print(f"plantmix select      : {ours['seconds']:7.1f} s   (process CPU {ours['cpu_seconds']:.1f} s)   peak RSS {ours['peak_rss_gib']:.2f} GiB   "
          f"available after cap {ours['available']}, repeats {ours['repeated']:,}")  # fmt: skip
    if not args.skip_pandas:
        for phase, prefix, label in (("pandas", "pandas", "pandas, per-row hash"), ("pandas-vh", "pandas_vh", "pandas, vector hash")):
            base = run_child(args, phase)
            same = all(
                np.array_equal(np.load(args.workdir / f"select_{k}.npy"), np.load(args.workdir / f"{prefix}_{k}.npy"))
                for k in ("row", "position")
            )
            print(f"{label:21s}: {base['seconds']:7.1f} s   (process CPU {base['cpu_seconds']:.1f} s)   peak RSS "
                  f"{base['peak_rss_gib']:.2f} GiB   speed-up {base['seconds'] / ours['seconds']:.1f}x wall, "
                  f"{base['cpu_seconds'] / ours['cpu_seconds']:.1f}x CPU   identical selection: {same}")  # fmt: skip
    if args.with_manifest:
        m = run_child(args, "manifest")
        print(f"mix manifest         : {m['seconds']:7.1f} s   peak RSS {m['peak_rss_gib']:.2f} GiB   ({m['bytes'] / 1e9:.2f} GB, DuckDB join + sort)")


if __name__ == "__main__":
    main()
