"""Benchmark plantmix's dedup proposals and the decision step on a synthetic manifest with planted duplicates.

    python benchmarks/bench_dedup.py --rows 13000000 [--radius 4]

Builds N joined rows (random sha256-like hex strings, uint64 pHashes with a mirror hash; a share of rows
are exact copies of another row, another share near copies with ≤ r flipped pHash bits, another
mirrored copies — a near copy of the other's mirror hash), plus filter proposals rejecting a share of
rows. Then, in this process, times each step with wall, CPU (all threads) and its own peak RSS:

1. `near_pair_proposals` without mirror hashes, 2. with them (the mirror's added cost as a ratio),
3. `decide` on the whole table (row-level rejections, exact groups, greedy near, captions, conflicts),
4. `check_invariants` with the radius (one more pair search over kept rows).

It prints recall/precision of `decide` against the planted truth, then baselines measured in the same
run on subsets pandas can handle (pandas sort + duplicated for exact; pandas blockwise all-pairs cross
join + greedy for near) and, optionally, faiss's IndexBinaryMultiHash for the near-pair search.
Extrapolated figures are labelled as such.
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

from plantmix.core.hashing import hamming, popcount64
from plantmix.core.recipe import DedupConfig
from plantmix.core.schema import DROP_DOWNLOAD_FAILED, DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR
from plantmix.curate.decide import check_invariants, decide
from plantmix.curate.dedup import near_pair_proposals, near_pairs
from plantmix.curate.filters import FILTER_PROPOSAL_SCHEMA

PRIORITY = {"plant_a": 2, "plant_b": 1, "general": 0}
MIRROR_MASK = np.uint64(0x5555555555555555)  # synthetic mirror hash: odd DCT columns change sign
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
DUPLICATES = (DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR)


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


def hex_strings(raw: np.ndarray, prefix: bytes = b"") -> pa.StringArray:
    """Fixed-width lowercase hex strings (after `prefix`) from an (n, k) uint8 array, without Python objects."""
    n, k = raw.shape
    p = len(prefix)
    width = p + 2 * k
    out = np.empty((n, width), np.uint8)
    out[:, :p] = np.frombuffer(prefix, np.uint8)
    out[:, p::2] = _HEX[raw >> 4]
    out[:, p + 1 :: 2] = _HEX[raw & 15]
    assert n * width < 2**31, "one Arrow string array holds < 2 GiB"
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(out.reshape(-1))])


def _flips(rng, n: int, radius: int) -> np.ndarray:
    """Up to `radius` random bit flips per row (repeats cancel: distance ≤ radius)."""
    flips = np.zeros(n, np.uint64)
    for _ in range(radius):
        flips ^= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
    return flips


def synthetic_manifest(n: int, radius: int, exact_share: float, near_share: float, mirror_share: float,
                       reject_share: float, seed: int):  # fmt: skip
    """(joined, filters, truth): truth maps family kind → (originals, copies); families are disjoint."""
    rng = np.random.default_rng(seed)
    # uid = 8 random hex chars (random keep-rule order) + 8 hex chars of the row index (decodable)
    uid_raw = np.empty((n, 8), np.uint8)
    uid_raw[:, :4] = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    uid_raw[:, 4:] = np.arange(n, dtype=">u4").view(np.uint8).reshape(n, 4)
    sha_raw = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    phash = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    n_ex, n_nr, n_mr = int(n * exact_share), int(n * near_share), int(n * mirror_share)
    pick = rng.permutation(n)[: 2 * (n_ex + n_nr + n_mr)]
    cut = np.cumsum([0, n_ex, n_ex, n_nr, n_nr, n_mr, n_mr])
    ex_orig, ex_copy, nr_orig, nr_copy, mr_orig, mr_copy = (pick[cut[i] : cut[i + 1]] for i in range(6))
    sha_raw[ex_copy] = sha_raw[ex_orig]
    phash[ex_copy] = phash[ex_orig]
    phash[nr_copy] = phash[nr_orig] ^ _flips(rng, n_nr, radius)
    phash[mr_copy] = phash[mr_orig] ^ MIRROR_MASK ^ _flips(rng, n_mr, radius)
    mirror = phash ^ MIRROR_MASK
    failed = rng.random(n) < 0.03  # failed downloads: keep=false, no hashes; must stay untouched
    failed[pick] = False
    u = rng.random(n)
    rejected_image = ~failed & (u < reject_share / 2)
    rejected_caption = ~failed & (u >= reject_share / 2) & (u < reject_share)
    sizes = np.array([[512, 512], [512, 384], [384, 512], [256, 256]])
    wh = sizes[rng.integers(0, len(sizes), n)]
    scale = rng.choice([1, 2, 4], n)  # originals before img2dataset's resize
    has_original = rng.random(n) < 0.8
    stored_bytes = rng.integers(20_000, 200_000, n)
    null = pa.scalar(None, pa.string())
    species = pa.array([f"Species {k}" for k in range(500)])
    joined = pa.table({
        "uid": hex_strings(uid_raw),
        "source": pc.take(pa.array(list(PRIORITY)), pa.array(rng.integers(0, len(PRIORITY), n))),
        "sha256": pc.if_else(pa.array(failed), null, hex_strings(sha_raw)),
        "phash": pa.array(phash, mask=failed),
        "phash_mirror": pa.array(mirror, mask=failed),
        "width": pa.array(wh[:, 0]),
        "height": pa.array(wh[:, 1]),
        "original_width": pa.array(wh[:, 0] * scale, mask=~has_original),
        "original_height": pa.array(wh[:, 1] * scale, mask=~has_original),
        "stored_bytes": pa.array(np.where(failed, 0, stored_bytes), mask=failed),
        "original_bytes": pa.array(stored_bytes * scale * scale * 2, mask=~has_original | failed),
        "keep": pa.array(~failed),
        "drop_reason": pc.if_else(pa.array(failed), DROP_DOWNLOAD_FAILED, null),
        "dup_of": pa.nulls(n, pa.string()),
        "caption": hex_strings(rng.integers(0, 256, (n, 10), dtype=np.uint8), b"a photo of "),
        "taxon_species": pc.take(species, pa.array(rng.integers(0, len(species), n), mask=rng.random(n) < 0.3)),
    })  # fmt: skip
    filters = pa.table({
        "uid": joined["uid"],
        "image_reason": pc.if_else(pa.array(rejected_image), "image_too_small", null),
        "caption_reason": pc.if_else(pa.array(rejected_caption), "caption_too_short", null),
    }, schema=FILTER_PROPOSAL_SCHEMA)  # fmt: skip
    truth = {"exact": (ex_orig, ex_copy), "near": (nr_orig, nr_copy), "mirror": (mr_orig, mr_copy)}
    return joined, filters, truth, phash, ~failed & ~rejected_image & ~rejected_caption


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


def quality(manifest: pa.Table, truth: dict, survivor: np.ndarray, phash: np.ndarray, radius: int, mirror: bool) -> dict:
    """Per planted family kind: recall (both members survived and end up with the same kept row) and
    precision of the duplicate drops (dropped row and its dup_of in one planted family)."""
    target = dup_index(manifest)
    root = np.where(target >= 0, target, np.arange(len(target)))
    family = np.full(len(target), -1, np.int64)
    for k, (orig, copy) in enumerate(truth.values()):
        family[orig] = family[copy] = np.arange(len(orig)) + (k << 40)
    reason = manifest.column("drop_reason")
    dropped = np.nonzero(pc.fill_null(pc.is_in(reason, pa.array(DUPLICATES)), False).to_numpy())[0]
    planted = (family[dropped] >= 0) & (family[dropped] == family[target[dropped]])
    res = {"duplicate drops": len(dropped), "precision vs planted": float(np.mean(planted)) if len(dropped) else float("nan"),
           "not planted": int(np.sum(~planted))}  # fmt: skip
    for name, (orig, copy) in truth.items():
        both = survivor[orig] & survivor[copy]
        res[f"{name} recall"] = float(np.mean(root[orig[both]] == root[copy[both]])) if both.any() else float("nan")
    near = np.nonzero(pc.fill_null(pc.equal(reason, DROP_DUPLICATE_NEAR), False).to_numpy())[0]
    d = hamming(phash[near], phash[target[near]])
    if mirror:
        d = np.minimum(d, hamming(phash[near], phash[target[near]] ^ MIRROR_MASK))
    res["near drops within radius"] = float(np.mean(d <= radius)) if len(near) else float("nan")
    keep = manifest.column("keep").to_numpy(zero_copy_only=False)
    res["dup_of names kept rows"] = bool(keep[target[target >= 0]].all())
    return res


# ---- baselines --------------------------------------------------------------------------------------


def _pandas_survivors(joined: pa.Table, filters: pa.Table) -> pd.DataFrame:
    """Surviving rows sorted by the keep rule, computed in pandas."""
    cols = joined.select(["uid", "source", "sha256", "phash", "width", "height", "original_width", "original_height",
                          "stored_bytes", "original_bytes", "keep"])  # fmt: skip
    df = cols.to_pandas(types_mapper={pa.uint64(): pd.UInt64Dtype()}.get)  # float64 would round pHashes
    df = df[df["keep"] & filters["image_reason"].is_null().to_numpy() & filters["caption_reason"].is_null().to_numpy()]
    df = df.assign(prio=df["source"].map(PRIORITY))
    stored = df["width"].fillna(0) * df["height"].fillna(0)
    original = df["original_width"].fillna(0) * df["original_height"].fillna(0)
    known = original > 0
    df["pixels"] = original.where(known, stored)
    raw = df["original_bytes"].fillna(0)
    use_raw = (raw > 0) & known
    nbytes = raw.where(use_raw, df["stored_bytes"].fillna(0)).astype(float)
    pixels = original.where(use_raw, stored).astype(float)
    df["bpp"] = (nbytes / pixels.where(pixels > 0)).fillna(0.0)
    return df.sort_values(["prio", "pixels", "bpp", "uid"], ascending=[False, False, False, True], kind="stable")


def pandas_exact(joined: pa.Table, filters: pa.Table) -> set[str]:
    """uids dropped as exact duplicates: survivors sorted by keep rule, then `duplicated` on sha256."""
    df = _pandas_survivors(joined, filters)
    df = df[df["sha256"].notna()]
    return set(df.loc[df.duplicated("sha256"), "uid"])


def pandas_near(joined: pa.Table, filters: pa.Table, radius: int, block: int = 500) -> set[str]:
    """uids dropped as near duplicates (no exact step, no mirror): blockwise all-pairs cross join, then
    greedy in keep-rule order."""
    df = _pandas_survivors(joined, filters)
    df = df[df["phash"].notna()].reset_index(drop=True)
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


def duplicate_uids(manifest: pa.Table) -> set[str]:
    hit = pc.fill_null(pc.is_in(manifest["drop_reason"], pa.array(DUPLICATES)), False)
    return set(manifest.filter(hit)["uid"].to_pylist())


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


class Step:
    """Runs a step and prints wall, CPU (this process, all threads: DuckDB and Arrow use several) and the
    step's own peak RSS (input tables included)."""

    rows: list[tuple] = []

    def __init__(self, name: str):
        self.name = name

    def __call__(self, fn, *args):
        peak = reset_peak_rss()
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        rss = status_gib("VmHWM") if peak else rss_gib()
        Step.rows.append((self.name, wall, cpu, rss))
        print(f"{self.name:44s} {wall:8.2f} s wall {cpu:8.2f} s CPU   peak RSS {rss:5.2f} GiB", flush=True)
        return out, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--exact-share", type=float, default=0.05, help="share of rows that are exact copies")
    ap.add_argument("--near-share", type=float, default=0.08, help="share of rows that are near copies")
    ap.add_argument("--mirror-share", type=float, default=0.02, help="share of rows that are mirrored copies")
    ap.add_argument("--reject-share", type=float, default=0.06, help="share of rows rejected by the filters")
    ap.add_argument("--pandas-exact-rows", type=int, default=1_000_000)
    ap.add_argument("--pandas-near-rows", type=int, default=20_000)
    ap.add_argument("--faiss-rows", type=int, default=300_000, help="0 skips the faiss comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, r = args.rows, args.radius

    t0 = time.perf_counter()
    joined, filters, truth, phash, survivor = synthetic_manifest(
        n, r, args.exact_share, args.near_share, args.mirror_share, args.reject_share, args.seed)  # fmt: skip
    print(f"synthetic manifest: {n:,} rows ({int(survivor.sum()):,} survivors), {joined.nbytes / 2**30:.2f} GiB in Arrow, "
          f"built in {time.perf_counter() - t0:.1f} s; RSS now {status_gib('VmRSS'):.2f} GiB")  # fmt: skip
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    usable = joined.filter(pc.and_(joined["keep"], pc.is_valid(joined["phash"])))
    ph, mi = usable["phash"].to_numpy(), usable["phash_mirror"].to_numpy()
    plain, t_plain = Step(f"near_pair_proposals, radius {r}, no mirror")(near_pair_proposals, ph, None, r)
    pairs, t_mirror = Step(f"near_pair_proposals, radius {r}, with mirror")(near_pair_proposals, ph, mi, r)
    print(f"   pairs: {plain.num_rows:,} without mirror, {pairs.num_rows:,} with; mirror costs {t_mirror / t_plain:.2f}x "
          f"the plain search (measured)")  # fmt: skip
    del usable, ph, mi
    cfg = DedupConfig(phash_radius=r, mirror=True)
    manifest, t_decide = Step("decide (whole table)")(decide, joined, filters, pairs, cfg, PRIORITY)
    problems, _ = Step(f"check_invariants (radius {r}, mirror)")(check_invariants, manifest, r, True)
    total = sum(row[1] for row in Step.rows[1:])
    print(f"proposals (with mirror) + decide + invariants: {total:.1f} s wall; invariant violations: {problems or 'none'}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; peak RSS of the whole process: {rss_gib():.2f} GiB")
    assert manifest.num_rows == n
    for k, v in quality(manifest, truth, survivor, phash, r, True).items():
        print(f"   {k}: {v}")
    del manifest, plain

    m = min(n, args.pandas_exact_rows)
    sub, fsub = joined.slice(0, m), filters.slice(0, m)
    want, t_pd = timed(pandas_exact, sub, fsub)
    exact_only = DedupConfig(near=False, mirror=False)
    got, t_pm = timed(decide, sub, fsub, pairs.slice(0, 0), exact_only, PRIORITY)
    same = duplicate_uids(got) == want
    print(f"exact @ {m:,} rows: pandas sort + duplicated {t_pd:.2f} s, decide (exact only, captions included) {t_pm:.2f} s, "
          f"speed-up {t_pd / t_pm:.1f}x (measured); same drops: {same}")  # fmt: skip

    m = min(n, args.pandas_near_rows)
    sub, fsub = joined.slice(0, m), filters.slice(0, m)
    near_only = DedupConfig(exact=False, mirror=False, phash_radius=r)
    want, t_pd = timed(pandas_near, sub, fsub, r)

    def plantmix_near():
        t = sub.filter(pc.and_(sub["keep"], pc.is_valid(sub["phash"])))
        return decide(sub, fsub, near_pair_proposals(t["phash"].to_numpy(), None, r), near_only, PRIORITY)

    got, t_pm = timed(plantmix_near)
    same = duplicate_uids(got) == want
    print(f"near @ {m:,} rows: pandas all-pairs {t_pd:.2f} s, plantmix proposals + decide {t_pm:.2f} s, "
          f"speed-up {t_pd / t_pm:.1f}x (measured); same drops: {same}")  # fmt: skip
    if m < n:
        t_pd_n = t_pd * (n / m) ** 2
        t_pm_n = t_plain + t_decide
        print(f"near @ {n:,} rows: pandas all-pairs ≈ {t_pd_n:,.0f} s (extrapolated quadratically), plantmix "
              f"{t_pm_n:.1f} s (measured, plain proposals + decide): speed-up ≈ {t_pd_n / t_pm_n:,.0f}x (extrapolated)")  # fmt: skip

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
