"""Benchmark plantmix's dedup on a synthetic manifest with planted duplicates.

    python benchmarks/bench_dedup.py --rows 13000000 [--radius 4]

Builds N rows (random sha256-like hex strings and uint64 pHashes; a share of rows are exact copies of
another row, another share near copies with ≤ r flipped pHash bits), runs `dedup_exact` then
`dedup_near` in this process, and prints stage times, peak RSS, recall/precision against the planted
truth, then baselines measured in the same run on subsets pandas can handle (pandas sort + duplicated
for exact; pandas blockwise all-pairs cross join + greedy for near) and, optionally, faiss's
IndexBinaryMultiHash for the near-pair search. Extrapolated figures are labelled as such.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from plantmix.curate.dedup import dedup_exact, dedup_near, near_pairs
from plantmix.core.hashing import hamming, popcount64
from plantmix.core.schema import DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR

PRIORITY = {"plant_a": 2, "plant_b": 1, "general": 0}
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def rss_gib() -> float:
    """Peak RSS of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) so a stage's own peak can be read; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_gib(field: str) -> float:
    """A memory line of /proc/self/status: VmRSS (now) or VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 2**20


def hex_strings(raw: np.ndarray) -> pa.StringArray:
    """Fixed-width lowercase hex strings from an (n, k) uint8 array, built without Python objects."""
    n, k = raw.shape
    out = np.empty((n, 2 * k), np.uint8)
    out[:, 0::2] = _HEX[raw >> 4]
    out[:, 1::2] = _HEX[raw & 15]
    assert n * 2 * k < 2**31, "one Arrow string array holds < 2 GiB"
    offsets = np.arange(0, (n + 1) * 2 * k, 2 * k, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(out.reshape(-1))])


def synthetic_manifest(n: int, radius: int, exact_share: float, near_share: float, seed: int):
    """Table plus planted truth: (originals, exact copies), (originals, near copies). Families are disjoint."""
    rng = np.random.default_rng(seed)
    # uid = 8 random hex chars (random keep-rule order) + 8 hex chars of the row index (decodable)
    uid_raw = np.empty((n, 8), np.uint8)
    uid_raw[:, :4] = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    uid_raw[:, 4:] = np.arange(n, dtype=">u4").view(np.uint8).reshape(n, 4)
    sha_raw = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    phash = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    n_exact, n_near = int(n * exact_share), int(n * near_share)
    pick = rng.permutation(n)[: 2 * (n_exact + n_near)]
    ex_orig, ex_copy = pick[:n_exact], pick[n_exact : 2 * n_exact]
    nr_orig, nr_copy = pick[2 * n_exact : 2 * n_exact + n_near], pick[2 * n_exact + n_near :]
    sha_raw[ex_copy] = sha_raw[ex_orig]
    phash[ex_copy] = phash[ex_orig]
    flips = np.zeros(n_near, np.uint64)
    for _ in range(radius):  # up to `radius` random bit flips (repeats cancel: distance ≤ radius)
        flips ^= np.uint64(1) << rng.integers(0, 64, n_near).astype(np.uint64)
    phash[nr_copy] = phash[nr_orig] ^ flips
    failed = rng.random(n) < 0.03  # failed downloads: keep=false, no hashes; must stay untouched
    failed[pick] = False
    sizes = np.array([[512, 512], [512, 384], [384, 512], [256, 256]])
    wh = sizes[rng.integers(0, len(sizes), n)]
    table = pa.table({
        "uid": hex_strings(uid_raw),
        "source": pc.take(pa.array(list(PRIORITY)), pa.array(rng.integers(0, len(PRIORITY), n))),
        "sha256": pc.if_else(pa.array(failed), pa.scalar(None, pa.string()), hex_strings(sha_raw)),
        "phash": pa.array(phash, mask=failed),
        "width": pa.array(wh[:, 0]),
        "height": pa.array(wh[:, 1]),
        "keep": pa.array(~failed),
        "drop_reason": pc.if_else(pa.array(failed), "download_failed", pa.scalar(None, pa.string())),
        "dup_of": pa.nulls(n, pa.string()),
    })
    return table, (ex_orig, ex_copy), (nr_orig, nr_copy), phash


def dup_index(table: pa.Table) -> np.ndarray:
    """Row index named by each row's dup_of (-1 if none), decoded from the uid's last 8 hex chars."""
    dup = table.column("dup_of").combine_chunks()
    out = np.full(len(dup), -1, np.int64)
    valid = pc.is_valid(dup).to_numpy(zero_copy_only=False)
    if valid.any():
        s = dup.filter(pa.array(valid))
        offsets = np.frombuffer(s.buffers()[1], np.int32)[s.offset : s.offset + len(s) + 1]
        assert (np.diff(offsets) == 16).all()
        chars = np.frombuffer(s.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(-1, 16)[:, 8:]
        digits = np.where(chars >= ord("a"), chars - ord("a") + 10, chars - ord("0")).astype(np.int64)
        out[valid] = (digits * (16 ** np.arange(7, -1, -1))).sum(axis=1)
    return out


def quality(table: pa.Table, exact, near, phash: np.ndarray, radius: int) -> dict:
    target = dup_index(table)
    root = np.where(target >= 0, target, np.arange(len(target)))
    family = np.full(len(target), -1, np.int64)
    for k, (orig, copy) in enumerate((exact, near)):
        family[orig] = family[copy] = np.arange(len(orig)) + (k << 40)
    res = {}
    for name, (orig, copy), code in (("exact", exact, DROP_DUPLICATE_EXACT), ("near", near, DROP_DUPLICATE_NEAR)):
        dropped = np.nonzero(pc.fill_null(pc.equal(table.column("drop_reason"), code), False).to_numpy())[0]
        planted = family[dropped] == family[target[dropped]]
        res[name] = {
            "recall": float(np.mean(root[orig] == root[copy])) if len(orig) else float("nan"),
            "precision_planted": float(np.mean(planted & (family[dropped] >= 0))) if len(dropped) else float("nan"),
            "dropped": len(dropped),
            "unplanted_drops": int(np.sum(~planted | (family[dropped] < 0))),
        }
    near_dropped = np.nonzero(pc.fill_null(pc.equal(table.column("drop_reason"), DROP_DUPLICATE_NEAR), False).to_numpy())[0]
    res["near"]["within_radius"] = float(np.mean(hamming(phash[near_dropped], phash[target[near_dropped]]) <= radius))
    keep = table.column("keep").to_numpy(zero_copy_only=False)
    res["dup_of_kept"] = bool(keep[target[target >= 0]].all())
    return res


# ---- baselines --------------------------------------------------------------------------------------


def _pandas_frame(table: pa.Table) -> pd.DataFrame:
    cols = table.select(["uid", "source", "sha256", "phash", "width", "height", "keep"])
    df = cols.to_pandas(types_mapper={pa.uint64(): pd.UInt64Dtype()}.get)  # float64 would round pHashes
    df["prio"] = df["source"].map(PRIORITY)
    df["area"] = df["width"].fillna(0) * df["height"].fillna(0)
    return df.sort_values(["prio", "area", "uid"], ascending=[False, False, True], kind="stable")


def pandas_exact(table: pa.Table) -> set[str]:
    """uids dropped as exact duplicates: sort by keep rule, then `duplicated` on sha256."""
    df = _pandas_frame(table)
    df = df[df["keep"] & df["sha256"].notna()]
    return set(df.loc[df.duplicated("sha256"), "uid"])


def pandas_near(table: pa.Table, radius: int, block: int = 500) -> set[str]:
    """uids dropped as near duplicates: blockwise all-pairs cross join, then greedy in keep-rule order."""
    df = _pandas_frame(table)
    df = df[df["keep"] & df["phash"].notna()].reset_index(drop=True)
    df["rank"] = np.arange(len(df))
    right = df[["rank", "phash"]].rename(columns={"rank": "rank_b", "phash": "phash_b"})
    edges = []
    for start in range(0, len(df), block):
        left = df.iloc[start : start + block][["rank", "phash"]]
        pairs = left.merge(right, how="cross")
        pairs = pairs[pairs["rank"] < pairs["rank_b"]]
        x = pairs["phash"].to_numpy(np.uint64) ^ pairs["phash_b"].to_numpy(np.uint64)
        edges.append(pairs.loc[popcount64(x) <= radius, ["rank", "rank_b"]])
    edges = pd.concat(edges).sort_values(["rank_b", "rank"])
    kept = np.ones(len(df), bool)
    for worse, better in edges.groupby("rank_b")["rank"]:
        kept[worse] = not kept[better.to_numpy()].any()
    return set(df.loc[~kept, "uid"])


def dropped_uids(table: pa.Table, reason: str) -> set[str]:
    return set(table.filter(pc.equal(table.column("drop_reason"), reason)).column("uid").to_pylist())


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def timed_cpu(fn, *args):
    """Result, wall seconds, CPU seconds of this process (all threads: DuckDB and Arrow use several)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--exact-share", type=float, default=0.05, help="share of rows that are exact copies")
    ap.add_argument("--near-share", type=float, default=0.10, help="share of rows that are near copies")
    ap.add_argument("--pandas-exact-rows", type=int, default=1_000_000)
    ap.add_argument("--pandas-near-rows", type=int, default=20_000)
    ap.add_argument("--faiss-rows", type=int, default=300_000, help="0 skips the faiss comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, r = args.rows, args.radius

    table, exact, near, phash = synthetic_manifest(n, r, args.exact_share, args.near_share, args.seed)
    print(f"synthetic manifest: {n:,} rows, {table.nbytes / 2**30:.2f} GiB in Arrow; RSS peak so far {rss_gib():.2f} GiB")
    stage_peak = reset_peak_rss()
    if stage_peak:
        print(f"RSS before dedup: {status_gib('VmRSS'):.2f} GiB")
    out_exact, t_exact, c_exact = timed_cpu(dedup_exact, table, PRIORITY)
    print(f"exact dedup: {t_exact:7.1f} s wall, {c_exact:7.1f} s CPU   (target < 60 s)")
    out, t_near, c_near = timed_cpu(dedup_near, out_exact, PRIORITY, r)
    print(f"near dedup (radius {r}): {t_near:7.1f} s wall, {c_near:7.1f} s CPU   (target < 900 s)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if stage_peak:
        print(f"peak RSS during dedup (input table included): {status_gib('VmHWM'):.2f} GiB   (target < 6 GiB)")
    print(f"peak RSS of the whole process so far (synthetic generation included): {rss_gib():.2f} GiB")
    assert out.num_rows == n
    q = quality(out, exact, near, phash, r)
    for name in ("exact", "near"):
        s = q[name]
        print(f"{name:5s}: recall {s['recall']:.6f}  precision vs planted {s['precision_planted']:.6f}  "
              f"dropped {s['dropped']:,}  not planted {s['unplanted_drops']}")
    print(f"near drops within radius of their dup_of: {q['near']['within_radius']:.6f}; dup_of names kept rows: {q['dup_of_kept']}")
    del out_exact, out

    m = min(n, args.pandas_exact_rows)
    sub = table.slice(0, m)
    want, t_pd = timed(pandas_exact, sub)
    got, t_pm = timed(dedup_exact, sub, PRIORITY)
    same = dropped_uids(got, DROP_DUPLICATE_EXACT) == want
    print(f"exact @ {m:,} rows: pandas {t_pd:.2f} s, plantmix {t_pm:.2f} s, speed-up {t_pd / t_pm:.1f}x (measured); same drops: {same}")
    if m < n:
        print(f"exact @ {n:,} rows: pandas ≈ {t_pd * n / m:.0f} s (extrapolated linearly), plantmix {t_exact:.1f} s (measured)")

    m = min(n, args.pandas_near_rows)
    sub = dedup_exact(table.slice(0, m), PRIORITY)
    want, t_pd = timed(pandas_near, sub, r)
    got, t_pm = timed(dedup_near, sub, PRIORITY, r)
    same = dropped_uids(got, DROP_DUPLICATE_NEAR) == want
    print(f"near @ {m:,} rows: pandas all-pairs {t_pd:.2f} s, plantmix {t_pm:.2f} s, speed-up {t_pd / t_pm:.1f}x (measured); same drops: {same}")
    if m < n:
        t_pd_n = t_pd * (n / m) ** 2
        print(f"near @ {n:,} rows: pandas all-pairs ≈ {t_pd_n:,.0f} s (extrapolated quadratically), plantmix "
              f"{t_near:.1f} s (measured): speed-up ≈ {t_pd_n / t_near:,.0f}x (extrapolated)")

    if args.faiss_rows:
        import faiss

        h = np.unique(phash[: args.faiss_rows])
        (a, _), t_mih = timed(near_pairs, h, r)
        index = faiss.IndexBinaryMultiHash(64, r + 1, 64 // (r + 1))  # pigeonhole: r + 1 disjoint tables
        codes = h.astype(">u8").view(np.uint8).reshape(-1, 8)

        def faiss_pairs():
            index.add(codes)
            lims, _, ids = index.range_search(codes, r + 1)  # distances < r + 1
            return (len(ids) - len(h)) // 2  # minus self-matches, each pair found from both ends

        found, t_faiss = timed(faiss_pairs)
        print(f"near pairs @ {len(h):,} hashes: plantmix multi-index {t_mih:.2f} s ({len(a):,} pairs), "
              f"faiss IndexBinaryMultiHash {t_faiss:.2f} s ({found:,} pairs): {t_faiss / t_mih:.1f}x slower")


if __name__ == "__main__":
    main()
