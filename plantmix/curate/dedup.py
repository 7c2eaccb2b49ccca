"""Exact (sha256) and near (pHash within Hamming radius r) deduplication of the manifest (DESIGN §3–4).

Only rows with keep = true and the stage's hash (sha256, resp. phash) take part; all other rows pass
through untouched. Rows come out in input order; none is removed.

Keep rule, inside any set of duplicates: higher source priority, then larger area (width × height, a
missing size counts as 0), then smaller uid (then earlier input position, should uids repeat).

Exact: rows with equal sha256 form a group; all but the best are dropped as `duplicate_exact`.

Near: greedy in keep-rule order. Visit rows best first; a row is kept unless a row already kept lies
within Hamming distance r of its pHash; then it is dropped as `duplicate_near` with `dup_of` = the best
such kept row. Consequences:
  * every dropped row is within r of the row it names: no transitive chaining (with a~b, b~c, a≁c and
    a best, b points to a and c stays kept), so precision does not decay along chains;
  * kept rows are pairwise more than r apart, so re-running dedup on its output changes nothing;
  * the result does not depend on row order.
`dup_of` always names a kept row: when near dedup drops a row that exact dedup had kept, its exact
twins are re-pointed to the row it now duplicates (their drop_reason stays `duplicate_exact`).

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
from plantmix.core.recipe import DedupConfig
from plantmix.core.schema import DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR

REQUIRED_COLUMNS = ("uid", "source", "sha256", "phash", "width", "height", "keep", "drop_reason", "dup_of")
_PAIR_CHUNK = 1 << 22  # candidate pairs verified at once: bounds temporaries on dense duplicate clusters


# ---- public API -------------------------------------------------------------------------------------


def dedup(table: pa.Table, config: DedupConfig, source_priority: dict[str, int]) -> pa.Table:
    """Exact then near deduplication, as configured. Same rows, same order; decisions in keep/drop_reason/dup_of."""
    out = table
    if config.exact:
        out = dedup_exact(out, source_priority)
    if config.near:
        out = dedup_near(out, source_priority, config.phash_radius)
    assert out.num_rows == table.num_rows
    return out


def dedup_exact(table: pa.Table, source_priority: dict[str, int]) -> pa.Table:
    """Drop all but the best row of every group of kept rows with equal sha256 (`duplicate_exact`)."""
    _check_columns(table)
    rows = np.nonzero(_keep(table) & _valid(table.column("sha256")))[0]
    rule = _KeepRule(table, source_priority, rows)
    winner = _group_winners(_sha_groups(table.column("sha256"), rows), rows, rule)
    lose = winner != np.arange(len(rows))
    return _mark(table, rows[lose], rows[winner[lose]], DROP_DUPLICATE_EXACT)


def dedup_near(table: pa.Table, source_priority: dict[str, int], radius: int) -> pa.Table:
    """Greedy near dedup of kept rows on pHash within Hamming `radius` (`duplicate_near`); see module doc."""
    _check_columns(table)
    if not pa.types.is_uint64(table.column("phash").type):
        raise PlantmixError(f"dedup: column 'phash' must be uint64, got {table.column('phash').type}")
    if not 0 <= radius <= 32:
        raise PlantmixError(f"dedup: phash radius must be within 0..32, got {radius}")
    phash = table.column("phash")
    rows = np.nonzero(_keep(table) & _valid(phash))[0]
    rule = _KeepRule(table, source_priority, rows)
    values = pc.fill_null(phash, 0).to_numpy()[rows]
    # Rows with identical pHash collapse onto one node first: the greedy outcome is the same (they share
    # all neighbours), and a large cluster of identical hashes then costs no pairs.
    uniq, node = _distinct(values)
    rep = np.empty(len(uniq), np.int64)  # best row (position in rows) of each node
    rep[node] = _group_winners(node, rows, rule)
    target = np.arange(len(uniq))  # node whose representative each node's rows end up with
    a, b = near_pairs(uniq, radius)
    if len(a):
        touched = np.unique(np.concatenate([a, b]))
        touched = touched[rule.order(rows[rep[touched]])]  # best first: rank = position
        rank = np.full(len(uniq), -1, np.int64)
        rank[touched] = np.arange(len(touched))
        ra, rb = rank[a], rank[b]
        parent = greedy_keep(len(touched), np.minimum(ra, rb), np.maximum(ra, rb))
        dropped = parent >= 0
        target[touched[dropped]] = touched[parent[dropped]]
    final = rep[target[node]]
    lose = final != np.arange(len(rows))
    return _mark(table, rows[lose], rows[final[lose]], DROP_DUPLICATE_NEAR)


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


class _KeepRule:
    """Orders rows best first: priority desc, area desc, uid asc, input position asc."""

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
        width = pc.fill_null(t.column("width").take(take), 0).to_numpy().astype(np.int64)
        height = pc.fill_null(t.column("height").take(take), 0).to_numpy().astype(np.int64)
        sub = pa.table({"p": priority, "a": width * height, "u": t.column("uid").take(take), "i": take})
        keys = [("p", "descending"), ("a", "descending"), ("u", "ascending"), ("i", "ascending")]
        return pc.sort_indices(sub, sort_keys=keys).to_numpy()


def _group_winners(group: np.ndarray, rows: np.ndarray, rule: _KeepRule) -> np.ndarray:
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


def _sha_groups(sha: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
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


# ---- table plumbing ---------------------------------------------------------------------------------


def _check_columns(table: pa.Table) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise PlantmixError(f"dedup: manifest lacks column(s) {missing}")
    keep = table.column("keep")
    if not pa.types.is_boolean(keep.type):
        raise PlantmixError(f"dedup: column 'keep' must be bool, got {keep.type}")
    if keep.null_count:
        raise PlantmixError(f"dedup: column 'keep' has {keep.null_count} null value(s)")


def _keep(table: pa.Table) -> np.ndarray:
    return table.column("keep").to_numpy()


def _valid(column: pa.ChunkedArray) -> np.ndarray:
    return pc.is_valid(column).to_numpy()


def _mark(table: pa.Table, losers: np.ndarray, winners: np.ndarray, reason: str) -> pa.Table:
    """Set keep=false, drop_reason, dup_of on `losers`; re-point older dup_of links that named a loser."""
    if not len(losers):
        return table
    order = np.argsort(losers)  # replace_with_mask fills masked slots in row order
    losers, winners = losers[order], winners[order]
    uid = table.column("uid")
    winner_uid = uid.take(pa.array(winners))
    mask = np.zeros(table.num_rows, bool)
    mask[losers] = True
    keep = _keep(table).copy()
    keep[losers] = False
    reason_col = table.column("drop_reason")
    reasons = pc.replace_with_mask(reason_col, pa.array(mask), pa.repeat(pa.scalar(reason, reason_col.type), len(losers)))
    dup_col = table.column("dup_of")
    # rows that pointed at a row dropped now (exact twins of a near loser) follow it to its kept row
    hit = pc.index_in(dup_col, value_set=uid.take(pa.array(losers)).combine_chunks())
    follow = _valid(hit)
    if follow.any():
        targets = winner_uid.take(pc.drop_null(hit)).cast(dup_col.type)
        dup_col = pc.replace_with_mask(dup_col, pa.array(follow), targets.combine_chunks())
    dup_col = pc.replace_with_mask(dup_col, pa.array(mask), winner_uid.cast(dup_col.type).combine_chunks())
    for name, values in (("keep", pa.array(keep)), ("drop_reason", reasons), ("dup_of", dup_col)):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), values)
    return table
