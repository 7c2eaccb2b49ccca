"""Duplicate proposals (DESIGN §3): which images are exact or near copies of which, not who is kept.

Exact duplicates are rows with equal sha256 (grouped by `sha_groups`). Near duplicates are pairs of
distinct pHash values within Hamming radius r, where an image is also compared in its mirror image
(`phash_mirror`), so a flipped copy is found like a re-encoded one: the proposal stage writes them
as `(phash_a, phash_b, distance)`, distance the smallest over orientations. The decision step
(`plantmix.curate.decide`) turns groups and pairs into keep / dup_of with the keep rule below.

Keep rule, inside any set of duplicates: higher source priority, then more original pixels (the size
img2dataset saw before resizing), then more bytes per original pixel of the downloaded file (a
heavier re-encode, or an edited copy saved again, is lighter than the file it came from), then
smaller uid (then earlier input position, should uids repeat).

Scale: numpy over integer arrays. Strings are touched only to hash sha256 (DuckDB) and to order the
rows that do have duplicates (Arrow sort). Near candidates come from multi-index hashing (`near_pairs`).
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plantmix.core.errors import PlantmixError
from plantmix.core.hashing import popcount64

_PAIR_CHUNK = 1 << 22  # candidate pairs verified at once: bounds temporaries on dense duplicate clusters
PAIR_SCHEMA = pa.schema([pa.field("phash_a", pa.uint64()), pa.field("phash_b", pa.uint64()), pa.field("distance", pa.uint8())])
MAX_RADIUS = 32


# ---- proposals ----------------------------------------------------------------------------------------


def near_pair_proposals(phash: np.ndarray, phash_mirror: np.ndarray | None, radius: int) -> pa.Table:
    """Pairs (a < b) of distinct pHash values within `radius`, a value's mirror hash counting too.

    `phash` holds the hashes of usable images (repeats allowed); `phash_mirror` their mirror hashes,
    aligned, or None for no mirror matching. With mirrors, the search runs over the hashes and the
    mirror hashes together, and each hit is mapped back to the pair of images' own hashes.
    """
    if not 0 <= radius <= MAX_RADIUS:
        raise PlantmixError(f"dedup: phash radius must be within 0..{MAX_RADIUS}, got {radius}")
    phash = np.asarray(phash, np.uint64)
    values = np.unique(phash)
    u = len(values)
    if phash_mirror is None:
        search, owner = values, np.arange(u)
    else:  # every distinct (hash, mirror hash) of the images, each mirror owned by its image's hash
        both = np.unique(np.stack([phash, np.asarray(phash_mirror, np.uint64)], axis=1), axis=0)
        search = np.concatenate([values, both[:, 1]])
        owner = np.concatenate([np.arange(u), np.searchsorted(values, both[:, 0])])
    a, b = near_pairs(search, radius)
    dist = popcount64(search[a] ^ search[b])
    a, b = owner[a], owner[b]
    keep = a != b  # an image near its own mirror is symmetric, not a duplicate
    lo, hi, dist = np.minimum(a, b)[keep], np.maximum(a, b)[keep], dist[keep]
    order = np.lexsort((dist, hi, lo))  # per pair, the smallest distance first
    lo, hi, dist = lo[order], hi[order], dist[order]
    first_of_pair = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])] if len(lo) else np.zeros(0, bool)
    lo, hi, dist = lo[first_of_pair], hi[first_of_pair], dist[first_of_pair]
    return pa.table([pa.array(values[lo]), pa.array(values[hi]), pa.array(dist.astype(np.uint8))], schema=PAIR_SCHEMA)


def near_pairs(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) with hamming(hashes[i], hashes[j]) <= radius, each exactly once.

    Multi-index hashing: the 64 bits are cut into m = radius + k contiguous blocks. Two hashes within
    `radius` differ in at most `radius` blocks, so they agree on at least k blocks, i.e. on one of the
    C(m, k) keys made of k blocks. Per key: one sort of packed (key, index) words; equal-key runs are the
    candidates; a candidate is verified by popcount and emitted only under the first key it agrees on.
    k is chosen by a cost model (keys × (n + expected random candidates)).
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if radius == 0:
        order = np.argsort(h, kind="stable")
        for i, j in _equal_runs_pairs(h[order], order):
            out_a.append(np.minimum(i, j))
            out_b.append(np.maximum(i, j))
        return _concat(out_a), _concat(out_b)
    idx_bits = max(1, (n - 1).bit_length())
    widths, k = _plan_blocks(n, radius, idx_bits)
    m = len(widths)
    shifts = [64 - sum(widths[: i + 1]) for i in range(m)]  # block 0 = most significant bits
    block_mask = [np.uint64(((1 << w) - 1) << s) for s, w in zip(shifts, widths)]
    slot = max(widths)  # each block takes a slot of equal width in the key, so key prefixes can be reused
    small = np.uint16 if slot <= 16 else np.uint32 if slot <= 32 else np.uint64
    fields = [((h >> np.uint64(s)) & np.uint64((1 << w) - 1)).astype(small) for s, w in zip(shifts, widths)]
    index = np.arange(n, dtype=np.uint64)
    packed = np.empty(n, np.uint64)
    keys = np.empty(n, np.uint64)
    low = np.uint64((1 << idx_bits) - 1)
    for prefix in combinations(range(m - 1), k - 1):
        base = index.copy()  # packed word: [prefix blocks | last block | row index]
        for p, blk in enumerate(prefix):
            base |= fields[blk].astype(np.uint64) << np.uint64(idx_bits + (k - 1 - p) * slot)
        for last in range(prefix[-1] + 1 if prefix else 0, m):
            np.left_shift(fields[last], np.uint64(idx_bits), out=packed, dtype=np.uint64)
            packed |= base
            packed.sort()
            np.right_shift(packed, np.uint64(idx_bits), out=keys)
            combo = (*prefix, last)
            # blocks before the combo's last one that are not in it: the pair must disagree on all of
            # them, else an earlier combination of blocks already emitted it
            earlier = [block_mask[x] for x in range(last) if x not in combo]
            for pi, pj in _equal_runs_pairs(keys, packed):
                i, j = (pi & low).astype(np.int64), (pj & low).astype(np.int64)
                x = h[i] ^ h[j]
                ok = np.nonzero(popcount64(x) <= radius)[0]
                i, j, x = i[ok], j[ok], x[ok]
                first = np.ones(len(x), bool)
                for mask in earlier:
                    first &= (x & mask) != 0
                out_a.append(np.minimum(i[first], j[first]))
                out_b.append(np.maximum(i[first], j[first]))
    return _concat(out_a), _concat(out_b)


def greedy_keep(n: int, better: np.ndarray, worse: np.ndarray, max_rounds: int = 64) -> np.ndarray:
    """Greedy keep decision over nodes 0..n-1 ranked best first (smaller id = better).

    Edges (better[e] < worse[e]) join near duplicates. Visiting nodes in id order, a node is kept unless
    an already kept node is joined to it. Returns parent: -1 for kept nodes, else the smallest kept
    node joined to it. Vectorised in rounds (a node is decided once all its better neighbours are);
    after `max_rounds` rounds (long chains) the rest is finished by a plain loop.
    """
    parent = np.full(n, -2, np.int64)  # -2 undecided
    order = np.lexsort((better, worse))  # by worse node, then best neighbour first
    better, worse = better[order], worse[order]
    has_better = np.zeros(n, bool)
    has_better[worse] = True
    parent[~has_better] = -1
    for _ in range(max_rounds):
        if not len(worse):
            return parent
        state = parent[better]
        blocked = np.zeros(n, bool)
        blocked[worse[state == -2]] = True
        ready = ~blocked[worse]
        kept_nb = ready & (state == -1)
        w, b = worse[kept_nb], better[kept_nb]
        first = np.r_[True, w[1:] != w[:-1]] if len(w) else np.zeros(0, bool)
        parent[w[first]] = b[first]
        rw = worse[ready]
        parent[rw[parent[rw] == -2]] = -1  # every better neighbour was dropped
        better, worse = better[~ready], worse[~ready]
    # sequential finish: edges are sorted by worse node, so better nodes are decided before they are read
    starts = np.r_[0, np.nonzero(worse[1:] != worse[:-1])[0] + 1] if len(worse) else []
    ends = list(starts[1:]) + [len(worse)]
    for s, e in zip(starts, ends):
        kept = [int(b) for b in better[s:e] if parent[b] == -1]
        parent[worse[s]] = kept[0] if kept else -1
    return parent


# ---- keep rule and grouping -------------------------------------------------------------------------


class KeepRule:
    """Orders rows best first by the keep rule (module doc); `rows` are the rows that may be ranked."""

    def __init__(self, table: pa.Table, source_priority: dict[str, int], rows: np.ndarray):
        self.table = table
        self.names = pa.array(list(source_priority), pa.string())
        self.values = pa.array([int(v) for v in source_priority.values()], pa.int64())
        source = table.column("source")
        unknown = [s for s in pc.unique(source).to_pylist() if s not in source_priority]
        if unknown:  # fail only if a participating row carries it
            mask = np.zeros(table.num_rows, bool)
            mask[rows] = True
            hit = pc.and_(pa.array(mask), pc.fill_null(pc.is_in(source, value_set=pa.array(unknown, pa.string())), False))
            if pc.any(hit).as_py():
                raise PlantmixError(f"dedup: source(s) {sorted(map(str, unknown))} have no priority (known: {sorted(source_priority)})")

    def order(self, rows: np.ndarray) -> np.ndarray:
        """Permutation that sorts `rows` (table row indices) best first."""
        if len(rows) < 2:
            return np.arange(len(rows))
        t = self.table
        take = pa.array(rows)
        priority = pc.take(self.values, pc.index_in(t.column("source").take(take), value_set=self.names))
        stored = _area(t, take, "width", "height")
        original = _area(t, take, "original_width", "original_height")
        known = original > 0
        original = np.where(known, original, stored)
        # bytes per original pixel; builds downloaded before img2dataset's size was recorded fall back
        # to the stored image's bytes per stored pixel
        raw, stored_bytes = _counts(t, take, "original_bytes"), _counts(t, take, "stored_bytes")
        use_raw = (raw > 0) & known
        nbytes = np.where(use_raw, raw, stored_bytes)
        pixels = np.where(use_raw, original, stored)
        per_pixel = np.divide(nbytes, pixels, out=np.zeros(len(rows)), where=pixels > 0)
        sub = pa.table({"p": priority, "a": original, "b": per_pixel, "u": t.column("uid").take(take), "i": take})
        keys = [("p", "descending"), ("a", "descending"), ("b", "descending"), ("u", "ascending"), ("i", "ascending")]
        return pc.sort_indices(sub, sort_keys=keys).to_numpy()


def _counts(t: pa.Table, take: pa.Array, name: str) -> np.ndarray:
    """A byte-count column at `take` as float64, 0 where unknown (or absent: manifests joined before it existed)."""
    if name not in t.column_names:
        return np.zeros(len(take))
    return pc.fill_null(t.column(name).take(take), 0).to_numpy().astype(np.float64)


def _area(t: pa.Table, take: pa.Array, w: str, h: str) -> np.ndarray:
    width = pc.fill_null(t.column(w).take(take), 0).to_numpy().astype(np.int64)
    height = pc.fill_null(t.column(h).take(take), 0).to_numpy().astype(np.int64)
    return width * height


def group_winners(group: np.ndarray, rows: np.ndarray, rule: KeepRule) -> np.ndarray:
    """For each position p in `rows` (group ids in `group`), the position of its group's best row."""
    n = len(rows)
    winner = np.arange(n)
    if n < 2:
        return winner
    order = _stable_argsort(group)
    g = group[order]
    new = np.r_[True, g[1:] != g[:-1]]
    starts = np.nonzero(new)[0]
    size = np.diff(np.r_[starts, n])[np.cumsum(new) - 1]
    pos = order[size > 1]  # only rows that have duplicates need the (string) keep-rule sort
    if not len(pos):
        return winner
    pos = pos[rule.order(rows[pos])]
    pos = pos[_stable_argsort(group[pos])]  # grouped, best first inside each group
    g = group[pos]
    first = np.r_[True, g[1:] != g[:-1]]
    winner[pos] = pos[first][np.cumsum(first) - 1]
    return winner


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each value's distinct entry): np.unique without its stable sort."""
    order = np.argsort(values)
    sorted_values = values[order]
    new = np.r_[True, sorted_values[1:] != sorted_values[:-1]] if len(values) else np.zeros(0, bool)
    node = np.empty(len(values), np.int64)
    node[order] = np.cumsum(new) - 1
    return sorted_values[new], node


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative int keys < n: one sort of packed (key, position) words, several
    times faster than numpy's stable argsort."""
    n = len(keys)
    bits = max(1, (n - 1).bit_length())
    if n == 0 or int(keys.max()) >= 1 << (64 - bits):
        return np.argsort(keys, kind="stable")
    packed = (keys.astype(np.uint64) << np.uint64(bits)) | np.arange(n, dtype=np.uint64)
    packed.sort()
    return (packed & np.uint64((1 << bits) - 1)).astype(np.int64)


def _hash_strings(values: pa.ChunkedArray) -> np.ndarray:
    """64-bit hash of each string (DuckDB's hash; nulls hash to a constant)."""
    con = duckdb.connect()
    try:
        con.execute("SET preserve_insertion_order = true")
        con.register("t", pa.table({"s": values}))
        return con.sql("SELECT hash(s) AS h FROM t").fetchnumpy()["h"]
    finally:
        con.close()


def sha_groups(sha: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    """Group id per row of `rows`, equal iff sha256 strings are equal (hash, then verify)."""
    h = _hash_strings(sha)[rows]
    order = np.argsort(h)
    hs = h[order]
    new = np.r_[True, hs[1:] != hs[:-1]] if len(hs) else np.zeros(0, bool)
    gid = np.cumsum(new) - 1
    head = np.nonzero(new)[0][gid]
    pos = np.nonzero(head != np.arange(len(hs)))[0]
    if len(pos):
        same = pc.equal(sha.take(pa.array(rows[order[pos]])), sha.take(pa.array(rows[order[head[pos]]])))
        same = same.to_numpy()
        if not same.all():  # a 64-bit hash collision: regroup the affected runs by the strings themselves
            bad = np.isin(gid, gid[pos[~same]])
            strings = sha.take(pa.array(rows[order[bad]])).combine_chunks()
            gid[bad] = gid.max() + 1 + pc.dictionary_encode(strings).indices.to_numpy()
    out = np.empty_like(gid)
    out[order] = gid
    return out


# ---- near-pair helpers ------------------------------------------------------------------------------


def _plan_blocks(n: int, radius: int, idx_bits: int) -> tuple[list[int], int]:
    """Block widths and k minimising keys × (n + 4 · expected random candidates per key).

    m = radius + k near-equal blocks; a key is k blocks in slots of the widest block's width, followed
    by the row index, and must fit in 64 bits.
    """
    pairs = n * (n - 1) / 2
    best = None
    for k in range(1, 64 - radius + 1):
        m = radius + k
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        if k * max(widths) + idx_bits > 64 or comb(m, k) > 200_000:
            continue
        key_bits = sum(sorted(widths)[:k])
        cost = comb(m, k) * (n + 4 * pairs / 2.0**key_bits)
        if best is None or cost < best[0]:
            best = (cost, widths, k)
    if best is None:
        raise PlantmixError(f"dedup: no multi-index layout for radius {radius} and {n} hashes")
    return best[1], best[2]


def _equal_runs_pairs(keys: np.ndarray, payload: np.ndarray):
    """Yield (payload[p], payload[q]) chunks for all p < q with keys[p] == keys[q] (keys sorted)."""
    pos = np.nonzero(keys[1:] == keys[:-1])[0]
    d = 1
    while len(pos):
        for s in range(0, len(pos), _PAIR_CHUNK):
            p = pos[s : s + _PAIR_CHUNK]
            yield payload[p], payload[p + d]
        d += 1  # keys sorted: keys[p + d] == keys[p] implies keys[p + d - 1] == keys[p]
        pos = pos[pos + d < len(keys)]
        pos = pos[keys[pos + d] == keys[pos]]


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
