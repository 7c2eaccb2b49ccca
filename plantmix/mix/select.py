"""Mixing (DESIGN §5): pick plant and general rows from a build's manifest, deterministically.

Each eligible row (keep = true) gets a 64-bit key k = splitmix64(fnv1a64(uid) ^ splitmix64(seed)).
Within a domain rows are taken in order of k, largest first; with source weights the order is
Efraimidis–Spirakis weighted sampling without replacement: ascending -log(u)/w with u = k mapped to
(0, 1), ties by k. Per-taxon caps keep the first K rows of each taxon in that same order (species
first, then genus, then family). Every step is a fixed order followed by a prefix, so the same
command gives the same mix on any machine, and a smaller mix at the same seed and caps is a subset
of a larger one. Both hashes are published algorithms, vectorised here with numpy.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.text import string_buffers
from plantmix.core.errors import PlantmixError, ShortfallError
from plantmix.core.schema import DOMAINS
from plantmix.core.stage import require_columns

if TYPE_CHECKING:
    from plantmix.mix.spec import MixSpec

# ---- stable hashing ---------------------------------------------------------------------------

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_SHUFFLE_SALT = np.uint64(0x53485546464C4521)  # b"SHUFFLE!": separates shuffle from selection
_FNV_BLOCK = 1 << 15


def fnv1a64(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """FNV-1a 64-bit hash of each string's UTF-8 bytes, vectorised over byte positions."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks() if strings.num_chunks else pa.array([], pa.string())
    if strings.null_count:
        raise PlantmixError("uid column has null values")
    offsets, data = string_buffers(strings)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(strings), _FNV_OFFSET, np.uint64)
    if len(strings) == 0:
        return h
    with np.errstate(over="ignore"):
        if lengths.min() == lengths.max():
            # Equal lengths (e.g. hex digests): an (n, L) byte matrix, one column per step, in
            # blocks of rows that stay in cache across the L steps.
            matrix = data[offsets[0] : offsets[-1]].reshape(len(strings), -1)
            for a in range(0, len(strings), _FNV_BLOCK):
                block, hb = matrix[a : a + _FNV_BLOCK], h[a : a + _FNV_BLOCK]
                for j in range(block.shape[1]):
                    hb ^= block[:, j]
                    hb *= _FNV_PRIME
        else:
            for j in range(int(lengths.max())):
                live = np.flatnonzero(lengths > j)
                h[live] = (h[live] ^ data[starts[live] + j]) * _FNV_PRIME
    return h


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """The splitmix64 output function of state x (Steele et al. 2014); splitmix64(0) = 0xe220a8397b1dcdaf."""
    z = np.array(x, dtype=np.uint64)  # a copy, updated in place: two arrays in all, not eight
    shifted = np.empty_like(z)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        for shift, multiplier in ((30, _M1), (27, _M2)):
            np.right_shift(z, np.uint64(shift), out=shifted)
            z ^= shifted
            z *= multiplier
        np.right_shift(z, np.uint64(31), out=shifted)
        z ^= shifted
    return z


def selection_keys(uid_digest: np.ndarray, seed: int) -> np.ndarray:
    return splitmix64(uid_digest ^ splitmix64(np.uint64(seed)))


def shuffle_keys(keys: np.ndarray, repeat: np.ndarray) -> np.ndarray:
    """Keys that order the whole mix for shard writing, independent of the selection order."""
    salts = splitmix64(np.arange(int(repeat.max(initial=0)) + 1, dtype=np.uint64) + _SHUFFLE_SALT)
    return splitmix64(keys ^ salts[repeat])


def argsort_u64(key: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Stable argsort by (key, tiebreak, index) for uint64 arrays.

    One in-place sort of words packing a key prefix above the row index (numpy's vectorised sort is
    several times faster than its argsort); the rare runs that share a prefix are then put in full
    key order. The result is the unique permutation defined by the keys, whatever sort numpy uses.
    """
    n = len(key)
    index_bits = max(1, (n - 1).bit_length())
    if index_bits > 40:
        return np.lexsort((np.arange(n), *(() if tiebreak is None else (tiebreak,)), key))
    shift = np.uint64(index_bits)
    packed = (key >> shift) << shift
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64)
    prefix = packed >> shift
    ties = np.flatnonzero(prefix[1:] == prefix[:-1])
    if len(ties) > 10_000:  # many equal keys (duplicated input): let lexsort handle it
        return np.lexsort((np.arange(n), *(() if tiebreak is None else (tiebreak,)), key))
    run_starts = ties[np.r_[True, ties[1:] != ties[:-1] + 1]] if len(ties) else ties
    run_ends = ties[np.r_[ties[1:] != ties[:-1] + 1, True]] + 2 if len(ties) else ties
    for a, b in zip(run_starts, run_ends):
        seg = order[a:b]  # index order already; lexsort is stable
        sort_by = (key[seg],) if tiebreak is None else (tiebreak[seg], key[seg])
        order[a:b] = seg[np.lexsort(sort_by)]
    return order


def priority_order(keys: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Indices of rows in selection order (a fixed permutation: selections are its prefixes)."""
    if weights is None:
        return argsort_u64(~keys)  # largest key first
    u = ((keys >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    e = -np.log(u) / weights  # Efraimidis–Spirakis: ascending -log(u)/w; positive, so its bits sort as integers
    return argsort_u64(e.view(np.uint64), tiebreak=~keys)


def apply_caps(order: np.ndarray, groups: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """Keep the first K rows of each group along `order`; code -1 (taxon unknown) is never capped."""
    for codes, cap in groups:
        g = codes[order]
        known = np.flatnonzero(g >= 0)
        # (group, position) packed in unique words: one sort groups rows, selection order inside
        bits = np.uint64(max(1, (len(g) - 1).bit_length()))
        words = (g[known].astype(np.uint64) << bits) | known.astype(np.uint64)
        words.sort()
        by_group = (words & ((np.uint64(1) << bits) - np.uint64(1))).astype(np.int64)
        g_sorted = words >> bits
        starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
        rank = np.arange(len(by_group)) - np.repeat(starts, np.diff(np.r_[starts, len(by_group)]))
        keep = np.ones(len(g), bool)
        keep[by_group[rank >= cap]] = False
        order = order[keep]
    return order


# ---- selection over a manifest --------------------------------------------------------------


@dataclass
class Selection:
    """Selected manifest rows: `row` indexes the build manifest; `position` is the shuffled slot."""

    row: np.ndarray  # int64
    repeat: np.ndarray  # int32, copy number of the row (0 unless the domain needed repeats)
    repeated: np.ndarray  # bool, the row's domain was repeated: its key gets a "-<repeat>" suffix
    position: np.ndarray  # int64, 0..n-1
    available: dict[str, int]  # eligible rows per domain after caps

    def __len__(self) -> int:
        return len(self.row)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """Dictionary codes (int32, -1 for null) and the dictionary of a string or dictionary column."""
    if column.num_chunks == 0 or len(column) == 0:
        return np.zeros(0, np.int32), []
    if pa.types.is_null(column.type):
        return np.full(len(column), -1, np.int32), []
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column.cast(pa.string()))
    column = pa.table({"c": column}).unify_dictionaries()["c"].combine_chunks()
    return pc.fill_null(column.indices, -1).to_numpy().astype(np.int32), column.dictionary.to_pylist()


def read_selection_columns(manifest: Path, spec: MixSpec) -> pa.Table:
    taxa = [f"taxon_{rank}" for rank, _ in spec.caps()]
    wanted = ["uid", "domain", "source", "keep", *taxa]
    require_columns(manifest, wanted)
    return pq.read_table(manifest, columns=wanted, read_dictionary=["domain", "source", *taxa])


def select(table: pa.Table, spec: MixSpec, where: str = "manifest") -> Selection:
    """Pick the mix's rows from a table with uid, domain, source, keep (and taxon_* for caps)."""
    keep = table["keep"].to_numpy() if table.num_rows else np.zeros(0, bool)
    keep = np.asarray(keep, dtype=bool)
    domain, domains = _codes(table["domain"])
    source, sources = _codes(table["source"])
    present = np.flatnonzero(np.bincount(domain[keep] + 1, minlength=len(domains) + 1)) - 1
    unknown = sorted({domains[c] for c in present if c >= 0} - set(DOMAINS))
    if unknown or (domain[keep] < 0).any():
        raise PlantmixError(f"{where}: domain must be one of {list(DOMAINS)}; found {unknown or [None]}")
    missing = sorted(set(spec.source_weights) - set(sources))
    if missing:
        raise PlantmixError(f"{where}: source weight given for unknown source(s) {missing}; sources: {sorted(sources)}")
    src_weight = np.array([spec.source_weights.get(s, 1.0) for s in sources] or [1.0])
    uid = table["uid"].combine_chunks() if table.num_rows else pa.array([], pa.string())
    # the sorts, hashes and codes release the GIL: the uid hash and the plant domain's sorts each
    # share the second core with the rest
    with ThreadPoolExecutor(2) as pool:
        hashed = pool.submit(lambda: selection_keys(fnv1a64(uid), spec.seed))
        caps = [(_codes(table[f"taxon_{rank}"])[0], k) for rank, k in spec.caps()]
        keys = hashed.result()

        def pick(name: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
            code = domains.index(name) if name in domains else -2
            eligible = np.flatnonzero(keep & (domain == code))
            return _pick_domain(name, n, eligible, keys, uid, source, src_weight, caps, spec, where)

        picked = list(pool.map(lambda item: pick(*item), spec.counts().items()))
    rows, repeats, repeated = (list(x) for x in zip(*[p[:3] for p in picked]))
    available = {name: p[3] for name, p in zip(spec.counts(), picked)}
    row = np.concatenate(rows).astype(np.int64)
    repeat = np.concatenate(repeats)
    unsafe = _first_row_with_bytes(uid, b"./ \t\n\r\x0b\x0c")
    if unsafe is not None:
        raise PlantmixError(f"{where}: uid {uid[unsafe].as_py()!r} cannot be a webdataset key ('.', '/' or whitespace)")

    shuffled = argsort_u64(shuffle_keys(keys[row], repeat))
    position = np.empty(len(row), np.int64)
    position[shuffled] = np.arange(len(row))
    return Selection(row, repeat, np.concatenate(repeated), position, available)


def _pick_domain(
    name: str, n: int, eligible: np.ndarray, keys: np.ndarray, uid: pa.Array, source: np.ndarray,
    src_weight: np.ndarray, caps: list[tuple[np.ndarray, int]], spec: MixSpec, where: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One domain's (rows, repeats, repeated flags, rows available after caps) among its eligible rows."""
    w = src_weight[source[eligible]] if spec.source_weights else None
    order = eligible[priority_order(keys[eligible], None if w is None or np.all(w == w[:1]) else w)]
    _check_unique(uid, order, keys[order], where)  # a repeated uid has equal keys: adjacent here
    order = apply_caps(order, caps)
    if n > len(order) and (not spec.allow_repeat or len(order) == 0):
        capped = "".join(f", at most {k} per {r}" for r, k in spec.caps())
        hint = "" if spec.allow_repeat else "; pass --allow-repeat to repeat samples"
        raise ShortfallError(
            f"{where}: domain '{name}' needs {n} rows but only {len(order)} are available "
            f"(keep = true{capped}){hint}"
        )
    if n <= len(order):
        return order[:n], np.zeros(n, np.int32), np.full(n, False), len(order)
    take = np.arange(n)  # cycle through the whole order: copy r of row i is sample r * len(order) + i
    return order[take % len(order)], (take // len(order)).astype(np.int32), np.full(n, True), len(order)


def _check_unique(uid: pa.Array, order: np.ndarray, sorted_keys: np.ndarray, where: str) -> None:
    """uids become sample keys, so they must be unique; equal uids have equal, adjacent keys."""
    if len(sorted_keys) > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any():
        counts = pc.value_counts(uid.take(pa.array(order)))
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        if dup:
            raise PlantmixError(f"{where}: uid {dup[0]!r} appears more than once")


def _first_row_with_bytes(strings: pa.Array, chars: bytes) -> int | None:
    """Index of the first string containing any of `chars` (memchr scans of the data buffer), or None."""
    if len(strings) == 0:
        return None
    offsets, data = string_buffers(strings)
    data = data[offsets[0] : offsets[-1]]
    if len(data) == 0 or data.min() > max(chars):  # e.g. hex or base64url uids: no copy, no scan
        return None
    blob = data.tobytes()
    hits = [at for at in (blob.find(bytes([c])) for c in chars) if at >= 0]
    return int(np.searchsorted(offsets, min(hits) + offsets[0], side="right") - 1) if hits else None


# ---- the mix stage ----------------------------------------------------------------------------

