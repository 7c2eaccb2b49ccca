"""Dedup proposals and the decision step: pHash robustness, the pair search, the keep rule, dup_of links,
chains, untouched rows, group captions and label conflicts, and agreement of `decide` with a
brute-force reference written independently in plain Python from the documented semantics (DESIGN §3,
`plantmix.curate.decide` and `plantmix.curate.dedup` module docs)."""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

import plantmix.curate.dedup as dd
from plantmix.core.errors import PlantmixError
from plantmix.core.hashing import hamming, phash64, phash_bytes, phash_pair_bytes, popcount64
from plantmix.core.recipe import DedupConfig
from plantmix.core.schema import (
    CANDIDATE_FIELDS, DECISION_FIELDS, DROP_DOWNLOAD_FAILED, DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR,
    MANIFEST_EXTRA_FIELDS,
)  # fmt: skip
from plantmix.curate.decide import check_invariants, decide
from plantmix.curate.dedup import PAIR_SCHEMA, KeepRule, greedy_keep, near_pair_proposals, near_pairs

PRIORITY = {"a": 2, "b": 0, "c": 1}
FLAT = {"a": 0, "b": 0, "c": 0}  # no source preference: sizes and bytes decide
MIRROR = 0x5555555555555555  # test model of a mirror: odd DCT columns change sign (an involution)
TOO_SMALL, TOO_SHORT = "image_too_small", "caption_too_short"

_TYPES = {f.name: f.type for f in (*CANDIDATE_FIELDS, *MANIFEST_EXTRA_FIELDS)}
JOINED_COLUMNS = ["uid", "source", "sha256", "phash", "phash_mirror", "width", "height", "original_width",
                  "original_height", "stored_bytes", "original_bytes", "keep", "drop_reason", "dup_of", "caption",
                  "taxon_species"]  # fmt: skip
SCHEMA = pa.schema([pa.field(c, _TYPES[c]) for c in JOINED_COLUMNS])
FILTER_SCHEMA = pa.schema([("uid", pa.string()), ("image_reason", pa.string()), ("caption_reason", pa.string())])
_AUTO = object()


def row(uid, source="a", sha=None, phash=None, mirror=_AUTO, w=100, h=100, ow=None, oh=None, sb=None, ob=None,
        keep=True, drop_reason=None, caption=_AUTO, species=None, image_reason=None, caption_reason=None) -> dict:  # fmt: skip
    """One joined row plus its filter proposal (image_reason / caption_reason)."""
    if mirror is _AUTO:
        mirror = None if phash is None else phash ^ MIRROR
    return {"uid": uid, "source": source, "sha256": sha, "phash": phash, "phash_mirror": mirror, "width": w, "height": h,
            "original_width": ow, "original_height": oh, "stored_bytes": sb, "original_bytes": ob, "keep": keep,
            "drop_reason": drop_reason, "dup_of": None, "caption": f"caption of {uid}" if caption is _AUTO else caption,
            "taxon_species": species, "image_reason": image_reason, "caption_reason": caption_reason}  # fmt: skip


def table(rows) -> pa.Table:
    return pa.Table.from_pylist([{c: r[c] for c in JOINED_COLUMNS} for r in rows], schema=SCHEMA)


def filter_table(rows) -> pa.Table:
    return pa.Table.from_pylist([{c: r[c] for c in FILTER_SCHEMA.names} for r in rows], schema=FILTER_SCHEMA)


def proposals(joined: pa.Table, cfg: DedupConfig) -> pa.Table:
    """The dedup stage's pairs, as the build computes them (over every usable row, rejected ones too)."""
    if not cfg.near:
        return PAIR_SCHEMA.empty_table()
    t = joined.filter(pc.and_(joined["keep"], pc.is_valid(joined["phash"])))
    mirror = t["phash_mirror"].to_numpy() if cfg.mirror else None
    return near_pair_proposals(t["phash"].to_numpy(), mirror, cfg.phash_radius)


def run(rows_or_table, cfg: DedupConfig | None = None, priority=PRIORITY, filters: pa.Table | None = None) -> pa.Table:
    """filters + near_pair_proposals + decide on a joined-like table."""
    cfg = cfg or DedupConfig()
    joined = rows_or_table if isinstance(rows_or_table, pa.Table) else table(rows_or_table)
    if filters is None:
        filters = filter_table(rows_or_table)
    return decide(joined, filters, proposals(joined, cfg), cfg, priority)


def decisions(t: pa.Table) -> dict[str, tuple]:
    """uid → (keep, drop_reason, dup_of, dup_distance)."""
    d = t.to_pydict()
    return {u: (k, r, o, x) for u, k, r, o, x in zip(d["uid"], d["keep"], d["drop_reason"], d["dup_of"], d["dup_distance"])}


def full(t: pa.Table) -> dict[str, tuple]:
    """uid → (keep, drop_reason, dup_of, dup_distance, captions, label_conflict)."""
    d = t.to_pydict()
    cols = ("keep", "drop_reason", "dup_of", "dup_distance", "captions", "label_conflict")
    return {u: tuple(v) for u, *v in zip(d["uid"], *(d[c] for c in cols))}


KEPT = (True, None, None, None)


def near(uid, d):
    return (False, DROP_DUPLICATE_NEAR, uid, d)


def exact(uid, d=0):
    return (False, DROP_DUPLICATE_EXACT, uid, d)


def flip(x: int, bits) -> int:
    for b in bits:
        x ^= 1 << int(b)
    return x


# ---- reference: the documented semantics, the slow obvious way ----------------------------------------


def _bits(x: int) -> int:
    return bin(x).count("1")


def ref_distance(r: dict, s: dict, mirror: bool) -> int:
    """Smallest Hamming distance over orientations: as is, either one mirrored, both mirrored."""
    d = _bits(r["phash"] ^ s["phash"])
    if mirror:
        d = min(d, _bits(r["phash"] ^ s["phash_mirror"]), _bits(r["phash_mirror"] ^ s["phash"]),
                _bits(r["phash_mirror"] ^ s["phash_mirror"]))  # fmt: skip
    return d


def ref_rank(r: dict, i: int, priority: dict) -> tuple:
    """Keep rule as a sort key (smaller = better): priority, original pixels, bytes per pixel, uid, position."""
    stored = (r["width"] or 0) * (r["height"] or 0)
    original = (r["original_width"] or 0) * (r["original_height"] or 0)
    pixels = original if original > 0 else stored
    if r["original_bytes"] and original > 0:
        per_pixel = r["original_bytes"] / original
    else:
        per_pixel = (r["stored_bytes"] or 0) / stored if stored > 0 else 0.0
    return (-priority[r["source"]], -pixels, -per_pixel, r["uid"], i)


# How decide breaks a tie between kept rows at the same distance from a row rejected at row level. The
# documented rule (nearest kept twin, then the keep rule) says "rank"; decide today takes the kept row
# with the smaller pHash value ("phash"; see test_rejected_row_tie_follows_the_keep_rule). Switch to "rank"
# once decide is fixed.
REJECTED_TIE = "rank"


def reference(rows: list[dict], cfg: DedupConfig, priority=PRIORITY) -> dict[str, tuple]:
    """uid → (keep, drop_reason, dup_of, dup_distance, captions, label_conflict), O(n²)."""
    n, radius, mirror = len(rows), cfg.phash_radius, cfg.mirror
    rank = {i: ref_rank(rows[i], i, priority) for i in range(n) if rows[i]["keep"]}
    usable = [r["keep"] for r in rows]
    survivor = [r["keep"] and r["image_reason"] is None and r["caption_reason"] is None for r in rows]
    survivors = [i for i in range(n) if survivor[i]]

    # 1. exact groups among survivors elect their best member
    rep = {i: i for i in survivors}
    if cfg.exact:
        groups = defaultdict(list)
        for i in survivors:
            if rows[i]["sha256"] is not None:
                groups[rows[i]["sha256"]].append(i)
        for members in groups.values():
            best = min(members, key=rank.get)
            for i in members:
                rep[i] = best

    # 2. greedy over representatives in keep-rule order; the rest go to their nearest kept twin
    reps = sorted(set(rep.values()), key=rank.get)
    dist = {}

    def d(i, j):
        if (i, j) not in dist:
            dist[i, j] = dist[j, i] = ref_distance(rows[i], rows[j], mirror)
        return dist[i, j]

    kept: list[int] = []
    if cfg.near:
        for i in reps:
            if not any(d(i, k) <= radius for k in kept):
                kept.append(i)
    else:
        kept = reps
    kept_set = set(kept)

    def nearest_kept(i, tie=lambda k: rank[k]):
        twins = [k for k in kept if d(i, k) <= radius]
        if not twins:
            return None
        k = min(twins, key=lambda k: (d(i, k), tie(k)))
        return k, d(i, k)

    target: dict[int, tuple[int, int]] = {}  # row → (kept row, distance)
    for i in survivors:
        r = rep[i]
        if r in kept_set:
            if r != i:
                target[i] = (r, 0)
        else:
            target[i] = nearest_kept(r)

    # 3. rows rejected at row level that copy a kept row point at it (same sha256 first, then nearest)
    kept_by_sha = {rows[k]["sha256"]: k for k in kept if rows[k]["sha256"] is not None}
    for i in range(n):
        if not usable[i] or survivor[i]:
            continue
        if cfg.exact and rows[i]["sha256"] in kept_by_sha:
            target[i] = (kept_by_sha[rows[i]["sha256"]], 0)
        elif cfg.near and rows[i]["phash"] is not None:
            hit = nearest_kept(i, tie=(lambda k: rank[k]) if REJECTED_TIE == "rank" else (lambda k: rows[k]["phash"]))
            if hit:
                target[i] = hit

    # output
    valid = [usable[i] and rows[i]["caption_reason"] is None and bool(rows[i]["caption"]) for i in range(n)]
    members = defaultdict(list)
    for i, (k, _) in target.items():
        members[k].append(i)
    out = {}
    conflict = set()
    for k in kept:
        group = [k, *sorted(members[k], key=lambda i: (target[i][1], rows[i]["uid"]))]
        if len({rows[i]["taxon_species"] for i in group if rows[i]["taxon_species"]}) > 1:
            conflict.update(group)
    for i, r in enumerate(rows):
        if i in kept_set:
            group = [i, *sorted(members[i], key=lambda j: (target[j][1], rows[j]["uid"]))]
            captions = list(dict.fromkeys(rows[j]["caption"] for j in group if valid[j]))
            out[r["uid"]] = (True, None, None, None, captions, i in conflict)
            continue
        reason = r["drop_reason"] or r["image_reason"] or r["caption_reason"]
        dup_of = distance = None
        if i in target:
            k, distance = target[i]
            dup_of = rows[k]["uid"]
            if survivor[i]:
                same = r["sha256"] is not None and r["sha256"] == rows[k]["sha256"]
                reason = DROP_DUPLICATE_EXACT if same else DROP_DUPLICATE_NEAR
        out[r["uid"]] = (False, reason, dup_of, distance, None, i in conflict)
    return out


CAPTION_POOL = [f"a common caption {k}" for k in range(6)]
SPECIES = [None, None, "Quercus robur", "Quercus alba", "Acer campestre"]


def random_rows(seed: int, n: int, radius: int, dense: bool, reject: float = 0.15) -> list[dict]:
    """Random joined rows with planted exact copies, near copies (≤ radius flips), mirrored copies, chains,
    filter rejections, failed downloads, shared captions and species, and keep-rule ties."""
    rng = np.random.default_rng(seed)
    uids = [f"{u:06x}" for u in rng.choice(1 << 24, n, replace=False)]
    truth: list[tuple] = []  # (sha, phash) of every row, null or not in the table
    rows: list[dict] = []
    for i in range(n):
        u = rng.random()
        j = int(rng.integers(0, i)) if i else 0
        if dense:  # few distinct values: big clusters, long chains, many identical hashes
            ph = int(rng.integers(0, 1 << 11)) << 20
        else:
            ph = int(rng.integers(0, 2**64, dtype=np.uint64, endpoint=False))
        sha = hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()
        if i and u < 0.15:
            sha, ph = truth[j]
        elif i and u < 0.35:
            ph = flip(truth[j][1], rng.choice(64, rng.integers(0, radius + 1), replace=False))
        elif i and u < 0.42:  # a mirrored copy
            ph = flip(truth[j][1] ^ MIRROR, rng.choice(64, rng.integers(0, radius + 1), replace=False))
        elif i and u < 0.50:  # chain link from the previous row
            ph = flip(truth[-1][1], rng.choice(64, radius, replace=False))
        truth.append((sha, ph))
        usable = bool(rng.random() >= 0.05)
        v = rng.random()
        orig = [(None, None), (200, 200), (400, 300), (100, 100)][int(rng.integers(0, 4))]
        r = row(uids[i], source=str(rng.choice(list(PRIORITY))),
                sha=None if rng.random() < 0.03 else sha, phash=ph,
                w=int(rng.choice([64, 100, 128])), h=None if rng.random() < 0.03 else int(rng.choice([64, 100])),
                ow=orig[0], oh=orig[1], sb=None if rng.random() < 0.1 else int(rng.choice([1000, 2000, 3000])),
                ob=None if rng.random() < 0.3 else int(rng.choice([5000, 10000, 20000])),
                keep=usable, drop_reason=None if usable else DROP_DOWNLOAD_FAILED,
                caption=str(rng.choice(CAPTION_POOL)) if rng.random() < 0.3 else f"a photo numbered {i}",
                species=SPECIES[int(rng.integers(0, len(SPECIES)))],
                image_reason=TOO_SMALL if usable and v < reject / 2 else None,
                caption_reason=TOO_SHORT if usable and reject / 2 <= v < reject else None)  # fmt: skip
        if not usable and rng.random() < 0.5:  # a failed download has no hashes; the others must be ignored
            r.update(sha256=None, phash=None, phash_mirror=None)
        rows.append(r)
    return rows


# ---- hashing ------------------------------------------------------------------------------------------


def test_hamming_and_popcount_match_python():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**64, 500, dtype=np.uint64, endpoint=False)
    b = rng.integers(0, 2**64, 500, dtype=np.uint64, endpoint=False)
    assert hamming(a, b).tolist() == [(int(x) ^ int(y)).bit_count() for x, y in zip(a, b)]
    assert popcount64(np.array([0, 2**64 - 1, 1 << 63], np.uint64)).tolist() == [0, 64, 1]
    assert hamming(a[:, None], b[None, :5]).shape == (500, 5)


def test_phash64_is_imagehash_packed_msb_first():
    import imagehash

    img = _image(3)
    h = phash64(img)
    assert 0 <= h < 2**64 and h == int(str(imagehash.phash(img)), 16)
    assert pa.array([h], pa.uint64())[0].as_py() == h
    assert phash_bytes(_encode(img, "PNG")) == h


def test_phash_pair_bytes_mirror_is_the_flipped_image_hash():
    img = _image(4)
    h, m = phash_pair_bytes(_encode(img, "PNG"))
    hf, mf = phash_pair_bytes(_encode(ImageOps.mirror(img), "PNG"))
    assert (h, m) == (mf, hf)  # mirroring swaps the two
    assert hamming(np.uint64(h), np.uint64(m)) > 16  # an asymmetric scene is far from its own mirror


def test_phash_bytes_rejects_undecodable():
    with pytest.raises(PlantmixError, match="cannot decode image bytes"):
        phash_bytes(b"<html>not an image</html>")
    with pytest.raises(PlantmixError, match="cannot decode image bytes"):
        phash_bytes(_encode(_image(1), "JPEG")[:300])  # truncated


# ---- pair proposals and greedy ------------------------------------------------------------------------


@pytest.mark.parametrize("radius,dense", [(0, False), (1, False), (2, False), (4, False), (6, False), (9, False),
                                          (0, True), (2, True), (4, True)])  # fmt: skip
def test_near_pairs_equals_all_pairs(radius, dense):
    rng = np.random.default_rng(radius)
    n = 1500
    if dense:  # 1024 possible values: repeated hashes and long equal-key runs
        h = rng.integers(0, 1 << 10, n).astype(np.uint64) << np.uint64(30)
    else:
        h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
        for i in range(0, n - 1, 7):  # planted neighbours at distance ≤ radius
            h[i + 1] = flip(int(h[i]), rng.choice(64, rng.integers(0, radius + 1), replace=False))
    a, b = near_pairs(h, radius)
    got = list(zip(a.tolist(), b.tolist()))
    d = hamming(h[:, None], h[None, :])
    i, j = np.nonzero(np.triu(d <= radius, 1))
    assert len(got) == len(set(got))  # each pair once
    assert set(got) == set(zip(i.tolist(), j.tolist()))
    assert got


def _all_pairs(phash: list[int], mirror: list[int] | None, radius: int) -> set[tuple]:
    """(a, b, distance) over distinct values a < b, the smallest distance over orientations."""
    m = dict(zip(phash, mirror)) if mirror is not None else None
    values = sorted(set(phash))
    out = set()
    for x in range(len(values)):
        for y in range(x + 1, len(values)):
            a, b = values[x], values[y]
            dist = _bits(a ^ b)
            if m is not None:
                dist = min(dist, _bits(a ^ m[b]), _bits(m[a] ^ b), _bits(m[a] ^ m[b]))
            if dist <= radius:
                out.add((a, b, dist))
    return out


@pytest.mark.parametrize("radius,mirrored", [(0, True), (3, False), (3, True), (6, True)])
def test_near_pair_proposals_equal_all_pairs(radius, mirrored):
    rng = np.random.default_rng(10 + radius)
    base = [int(x) for x in rng.integers(0, 2**64, 250, dtype=np.uint64, endpoint=False)]
    ph = list(base)
    for x in base[:120]:  # near copies, mirrored copies, exact repeats
        ph.append(flip(x, rng.choice(64, rng.integers(0, radius + 1), replace=False)))
        ph.append(flip(x ^ MIRROR, rng.choice(64, rng.integers(0, radius + 1), replace=False)))
        ph.append(x)
    # mirror hashes: a function of the hash here, partly the test's model, partly independent noise
    noise = {v: int(rng.integers(0, 2**64, dtype=np.uint64, endpoint=False)) for v in set(ph)}
    mir = {v: (v ^ MIRROR) if v % 3 else noise[v] for v in set(ph)}
    mirror = [mir[v] for v in ph]
    t = near_pair_proposals(np.array(ph, np.uint64), np.array(mirror, np.uint64) if mirrored else None, radius)
    assert t.schema == PAIR_SCHEMA
    got = list(zip(*(t[c].to_pylist() for c in PAIR_SCHEMA.names)))
    assert len(got) == len(set(got)) and all(a < b for a, b, _ in got)
    assert set(got) == _all_pairs(ph, mirror if mirrored else None, radius)
    if mirrored and radius:
        assert any(_bits(a ^ b) > radius for a, b, _ in got)  # found only through a mirror


def test_near_pair_proposals_edges():
    # an image equal to its own mirror is not a pair; one equal to another's mirror is, at distance 0
    sym = near_pair_proposals(np.array([5], np.uint64), np.array([5], np.uint64), 4)
    assert sym.num_rows == 0
    t = near_pair_proposals(np.array([1, 1 ^ MIRROR], np.uint64), np.array([1 ^ MIRROR, 1], np.uint64), 0)
    assert t.to_pylist() == [{"phash_a": 1, "phash_b": 1 ^ MIRROR, "distance": 0}]
    assert near_pair_proposals(np.zeros(0, np.uint64), None, 4).num_rows == 0
    assert near_pair_proposals(np.array([7, 7, 7], np.uint64), None, 4).num_rows == 0  # repeats are not pairs
    for bad in (-1, 33):
        with pytest.raises(PlantmixError, match="radius must be within"):
            near_pair_proposals(np.array([1, 2], np.uint64), None, bad)


def test_greedy_keep_rounds_and_sequential_finish_agree():
    rng = np.random.default_rng(5)
    n = 400
    a, b = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    a, b = a[a != b], b[a != b]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    # plain-Python greedy
    nbrs = {}
    for x, y in zip(lo.tolist(), hi.tolist()):
        nbrs.setdefault(y, set()).add(x)
    parent = []
    for v in range(n):
        kept = sorted(x for x in nbrs.get(v, ()) if parent[x] == -1)
        parent.append(kept[0] if kept else -1)
    assert greedy_keep(n, lo, hi).tolist() == parent
    assert greedy_keep(n, lo, hi, max_rounds=0).tolist() == parent
    assert greedy_keep(n, lo, hi, max_rounds=2).tolist() == parent


# ---- keep rule ----------------------------------------------------------------------------------------


def test_keep_rule_priority_then_original_pixels_then_bytes_per_pixel_then_uid():
    rows = [
        row("u1", "b", sha="s", w=500, h=500),  # largest, but lowest priority
        row("u2", "a", sha="s", w=100, h=100),
        row("u3", "a", sha="s", w=200, h=100),  # priority a, larger area than u2
        row("u0", "a", sha="s", w=100, h=200),  # same area as u3: the smaller uid wins the tie
    ]
    out = decisions(run(rows))
    assert out["u0"] == KEPT
    assert out["u3"] == out["u2"] == out["u1"] == exact("u0")

    # original pixels beat stored pixels: img2dataset resized u5 from a bigger original
    rows = [row("u4", sha="s", w=300, h=300), row("u5", sha="s", w=100, h=100, ow=1000, oh=1000)]
    assert decisions(run(rows))["u5"] == KEPT
    # equal original pixels: more bytes per original pixel wins (the lighter re-encode loses)
    rows = [row("u6", sha="s", ow=400, oh=300, ob=60_000, sb=1), row("u7", sha="s", ow=300, oh=400, ob=90_000, sb=1)]
    assert decisions(run(rows))["u7"] == KEPT
    # without original_bytes, stored bytes per stored pixel decide (stored sizes differ, originals equal)
    rows = [row("u8", sha="s", w=100, h=100, ow=400, oh=300, sb=10_000),
            row("u9", sha="s", w=200, h=100, ow=400, oh=300, sb=15_000)]  # fmt: skip
    assert decisions(run(rows))["u8"] == KEPT  # 1.0 vs 0.75 bytes per stored pixel
    # original_bytes recorded but no original size: falls back to stored bytes per stored pixel too
    rows = [row("v1", sha="s", w=100, h=100, sb=5_000, ob=10**9), row("v2", sha="s", w=100, h=100, sb=6_000, ob=1)]
    assert decisions(run(rows))["v2"] == KEPT


def test_keep_rule_order_falls_back_to_row_position_for_repeated_uids():
    t = table([row("x", w=50), row("x"), row("x"), row("w", w=10)])
    rule = KeepRule(t, PRIORITY, np.arange(4))
    assert rule.order(np.array([2, 1, 3, 0])).tolist() == [1, 0, 3, 2]  # rows 1, 2, 0, 3


def test_within_and_cross_source_near_and_exact():
    rows = [
        row("p1", "a", sha="x", phash=0b1111),
        row("p2", "a", sha="y", phash=0b0111),  # near twin of p1, same source
        row("q1", "c", sha="z", phash=0b1111 << 40),
        row("q2", "b", sha="z", phash=0b1111 << 40),  # exact twin of q1, other source
        row("q3", "b", sha="w", phash=(0b1111 << 40) | 0b11),  # near twin of q1, other source
    ]
    out = decisions(run(rows, DedupConfig(phash_radius=2)))
    assert out == {"p1": KEPT, "p2": near("p1", 1), "q1": KEPT, "q2": exact("q1"), "q3": near("q1", 2)}


@pytest.mark.parametrize("best", ["a", "b"])
def test_chain_is_not_transitive(best):
    a, b, c = 0, 0b111, 0b111111  # a~b (3), b~c (3), a≁c (6) at radius 3
    area = {"a": 100, "b": 100}
    area[best] = 300
    rows = [row("a", sha="1", phash=a, h=area["a"]), row("b", sha="2", phash=b, h=area["b"]), row("c", sha="3", phash=c)]
    out = decisions(run(rows, DedupConfig(exact=False, phash_radius=3, mirror=False)))
    if best == "a":  # b goes to a; c is kept: its only neighbour b was dropped
        assert out == {"a": KEPT, "b": near("a", 3), "c": KEPT}
    else:  # b is best and reaches both ends
        assert out == {"a": near("b", 3), "b": KEPT, "c": near("b", 3)}


def test_exact_twins_follow_their_winner_when_it_is_near_dropped():
    rows = [
        row("big", "a", sha="s1", phash=0, w=400),
        row("e1", "a", sha="s2", phash=1),
        row("e2", "a", sha="s2", phash=1),
    ]
    out = decisions(run(rows, DedupConfig(phash_radius=2)))
    # e2 points at the kept row, whose sha256 differs: a near duplicate of it, at e1's distance
    assert out == {"big": KEPT, "e1": near("big", 1), "e2": near("big", 1)}


def test_dup_of_is_the_nearest_kept_twin_not_the_best():
    # k1 (best) and k2 are 6 apart, both kept at radius 4; x is within 4 of both, nearer k2
    k1, k2 = 0, 0b111111
    x = 0b001111  # 4 from k1, 2 from k2
    rows = [row("k1", sha="1", phash=k1, w=400), row("k2", sha="2", phash=k2, w=300), row("x", sha="3", phash=x)]
    out = decisions(run(rows, DedupConfig(phash_radius=4, mirror=False)))
    assert out == {"k1": KEPT, "k2": KEPT, "x": near("k2", 2)}
    # equal distances: the keep rule picks
    y = 0b000111  # 3 from k1, 3 from k2
    rows[2] = row("x", sha="3", phash=y)
    assert decisions(run(rows, DedupConfig(phash_radius=4, mirror=False)))["x"] == near("k1", 3)


def test_rejected_row_tie_follows_the_keep_rule():
    # k1 (priority a) and k2 (priority c, smaller pHash value) are 4 apart: both kept at radius 2;
    # r (rejected) and s (survivor) are 2 from each: the nearest kept twin, then the keep rule, is k1
    rows = [row("k1", "a", sha="1", phash=0b1100), row("k2", "c", sha="2", phash=0b0011),
            row("s", "b", sha="3", phash=0b0110), row("r", "b", sha="4", phash=0b0110, image_reason=TOO_SMALL)]  # fmt: skip
    out = decisions(run(rows, DedupConfig(phash_radius=2, mirror=False)))
    assert out["s"] == near("k1", 2)
    assert out["r"] == (False, TOO_SMALL, "k1", 2)  # decide gives k2


def test_near_pair_proposals_do_not_depend_on_row_order():
    # two images share pHash 0 but not their mirror hash; the second one's mirror is 1 bit from z
    z = 0xFFFF_FFFF
    phash = np.array([0, 0, z], np.uint64)
    mirrors = [0xFFFF << 48, z ^ 1]
    got = [near_pair_proposals(phash, np.array([*m, z ^ MIRROR], np.uint64), 4).to_pylist() for m in (mirrors, mirrors[::-1])]
    assert got[0] == got[1] == [{"phash_a": 0, "phash_b": z, "distance": 1}]  # the first order gives []


def test_mirrored_copy_is_a_near_twin_only_with_mirror_matching():
    rows = [row("orig", sha="1", phash=0xF0F0, w=400), row("flip", sha="2", phash=0xF0F0 ^ MIRROR ^ 0b11)]
    assert decisions(run(rows, DedupConfig(phash_radius=4)))["flip"] == near("orig", 2)
    assert decisions(run(rows, DedupConfig(phash_radius=4, mirror=False)))["flip"] == KEPT


# ---- survivors first, untouched rows, switches ----------------------------------------------------------


def test_non_participants_untouched_and_rejected_rows_keep_their_reason():
    rows = [
        row("k", sha="s", phash=5),
        row("off", sha="s", phash=5, keep=False, drop_reason=DROP_DOWNLOAD_FAILED),
        row("ingest", sha=None, phash=None, keep=False, drop_reason="missing_url"),
        row("nosha", sha=None, phash=5),  # no sha: only near applies
        row("small", sha="s", phash=5, image_reason=TOO_SMALL),  # rejected copy of k
        row("short", sha="t", phash=6, caption_reason=TOO_SHORT),  # rejected near copy of k
        row("alone", sha="u", phash=1 << 63, image_reason=TOO_SMALL),  # rejected, copies nothing
    ]
    t = table(rows)
    out = run(t, DedupConfig(phash_radius=2), filters=filter_table(rows))
    assert out.num_rows == t.num_rows
    assert out.schema.names == t.schema.names + [f.name for f in DECISION_FIELDS]
    assert out.select(t.schema.names).drop(["keep", "drop_reason", "dup_of"]).equals(t.drop(["keep", "drop_reason", "dup_of"]))
    assert decisions(out) == {
        "k": KEPT, "off": (False, DROP_DOWNLOAD_FAILED, None, None), "ingest": (False, "missing_url", None, None),
        "nosha": near("k", 0), "small": (False, TOO_SMALL, "k", 0), "short": (False, TOO_SHORT, "k", 2),
        "alone": (False, TOO_SMALL, None, None),
    }  # fmt: skip
    assert check_invariants(out, radius=2) == []


def test_group_is_not_lost_when_its_best_member_is_rejected():
    rows = [
        row("best", sha="s", phash=0, w=900, image_reason=TOO_SMALL, caption="the best caption"),
        row("second", sha="s", phash=0, w=500),
        row("third", sha="s", phash=0, w=100, caption_reason=TOO_SHORT, caption="x"),
        row("near", sha="t", phash=1, w=300),
    ]
    out = full(run(rows, DedupConfig(phash_radius=2)))
    assert out["second"] == (True, None, None, None, ["caption of second", "the best caption", "caption of near"], False)
    assert out["best"][:4] == (False, TOO_SMALL, "second", 0)
    assert out["third"][:4] == (False, TOO_SHORT, "second", 0)
    assert out["near"][:4] == near("second", 1)


def test_empty_and_all_dropped_tables():
    empty = run([], DedupConfig())
    assert empty.num_rows == 0 and "captions" in empty.schema.names
    rows = [row("a", sha="s", phash=1, keep=False, drop_reason=DROP_DOWNLOAD_FAILED),
            row("b", sha="s", phash=1, keep=False, drop_reason=DROP_DOWNLOAD_FAILED)]  # fmt: skip
    out = full(run(rows, DedupConfig()))
    assert out == {u: (False, DROP_DOWNLOAD_FAILED, None, None, None, False) for u in "ab"}
    rejected = [row("a", sha="s", phash=1, image_reason=TOO_SMALL), row("b", sha="s", phash=1, image_reason=TOO_SMALL)]
    assert decisions(run(rejected)) == {u: (False, TOO_SMALL, None, None) for u in "ab"}


def test_radius_zero_versus_r_and_config_switches():
    rows = [row("a", sha="1", phash=0), row("b", sha="2", phash=0), row("c", sha="3", phash=0b11),
            row("d", sha="1", phash=0), row("e", sha="4", phash=(1 << 60) | (1 << 50) | (1 << 40))]  # fmt: skip
    at0 = decisions(run(rows, DedupConfig(phash_radius=0)))
    at2 = decisions(run(rows, DedupConfig(phash_radius=2)))
    assert at0["b"] == at2["b"] == near("a", 0)
    assert at0["c"] == KEPT and at2["c"] == near("a", 2)
    assert at0["d"] == at2["d"] == exact("a")
    assert at0["e"] == at2["e"] == KEPT
    assert decisions(run(rows, DedupConfig(phash_radius=3)))["e"] == near("a", 3)
    only_near = decisions(run(rows, DedupConfig(exact=False, phash_radius=2)))
    assert only_near["d"] == exact("a")  # equal pHash found by near; same sha256 names the reason
    only_exact = decisions(run(rows, DedupConfig(near=False, phash_radius=2)))
    assert only_exact == {"a": KEPT, "b": KEPT, "c": KEPT, "d": exact("a"), "e": KEPT}
    nothing = decisions(run(rows, DedupConfig(exact=False, near=False)))
    assert nothing == {u: KEPT for u in "abcde"}


def test_pairs_beyond_the_configured_radius_are_ignored():
    rows = [row("a", sha="1", phash=0), row("b", sha="2", phash=0b111)]
    pairs = proposals(table(rows), DedupConfig(phash_radius=4))  # proposed at a larger radius
    out = decide(table(rows), filter_table(rows), pairs, DedupConfig(phash_radius=2), PRIORITY)
    assert decisions(out)["b"] == KEPT


# ---- against the reference ------------------------------------------------------------------------------

CASES = [  # seed, n, radius, dense, mirror, priority
    (1, 900, 4, False, True, PRIORITY),
    (2, 900, 2, True, True, PRIORITY),
    (3, 900, 6, False, False, FLAT),
    (4, 700, 0, True, True, FLAT),
    (5, 700, 8, False, True, PRIORITY),
    (6, 700, 3, True, False, PRIORITY),
]


@pytest.mark.parametrize("seed,n,radius,dense,mirror,priority", CASES)
def test_matches_brute_force_reference(seed, n, radius, dense, mirror, priority):
    rows = random_rows(seed, n, radius, dense)
    cfg = DedupConfig(phash_radius=radius, mirror=mirror)
    out = run(rows, cfg, priority)
    got, want = full(out), reference(rows, cfg, priority)
    reasons = [v[1] for v in want.values()]
    assert reasons.count(DROP_DUPLICATE_EXACT) > 10 and reasons.count(DROP_DUPLICATE_NEAR) > 30
    assert sum(1 for v in want.values() if not v[0] and v[1] not in (DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR) and v[2]) > 5
    assert sum(v[5] for v in want.values()) > 5
    assert {u: v for u, v in got.items() if v != want[u]} == {}
    assert check_invariants(out, radius=radius, mirror=mirror) == []
    # input order does not matter
    perm = np.random.default_rng(seed).permutation(len(rows))
    assert full(run([rows[i] for i in perm], cfg, priority)) == got


@pytest.mark.parametrize("exact_on,near_on", [(True, False), (False, True)])
def test_switches_match_reference(exact_on, near_on):
    rows = random_rows(9, 500, 4, True)
    cfg = DedupConfig(exact=exact_on, near=near_on, phash_radius=4)
    got, want = full(run(rows, cfg)), reference(rows, cfg)
    assert {u: v for u, v in got.items() if v != want[u]} == {}


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_a_group_is_never_lost_while_one_member_survives(seed):
    rows = random_rows(seed, 600, 4, True, reject=0.4)
    out = run(rows, DedupConfig(phash_radius=4))
    d = out.to_pydict()
    keep = dict(zip(d["uid"], d["keep"]))
    survivor = [r["keep"] and r["image_reason"] is None and r["caption_reason"] is None for r in rows]
    groups = defaultdict(list)
    for r, alive, k, dup in zip(rows, survivor, d["keep"], d["dup_of"]):
        if r["keep"] and r["sha256"] is not None:
            groups[r["sha256"]].append((alive, k, dup))
    checked = 0
    for members in groups.values():
        if any(alive for alive, _, _ in members):
            # a kept member, or the survivors point at a kept row
            assert any(k for _, k, _ in members) or all(keep[dup] for alive, _, dup in members if alive)
            checked += len(members) > 1 and not all(alive for alive, _, _ in members)
    assert checked > 10
    for alive, k, dup in zip(survivor, d["keep"], d["dup_of"]):
        assert not alive or k or keep[dup]  # every survivor is kept or names a kept row


def test_check_invariants_catches_a_corrupted_manifest():
    rows = random_rows(21, 400, 4, True)
    out = run(rows, DedupConfig(phash_radius=4))
    assert check_invariants(out, radius=4) == []
    d = out.to_pydict()
    dropped = next(i for i, r in enumerate(d["drop_reason"]) if r == DROP_DOWNLOAD_FAILED)
    near_row = next(i for i, r in enumerate(d["drop_reason"]) if r == DROP_DUPLICATE_NEAR)
    bad = list(d["dup_of"])
    bad[near_row] = d["uid"][dropped]  # dup_of to a dropped row
    corrupted = out.set_column(out.schema.get_field_index("dup_of"), "dup_of", pa.array(bad, pa.string()))
    assert any("not kept" in p for p in check_invariants(corrupted))
    reasons = list(d["drop_reason"])
    reasons[near_row] = DROP_DUPLICATE_EXACT  # duplicate_exact with another sha256
    corrupted = out.set_column(out.schema.get_field_index("drop_reason"), "drop_reason", pa.array(reasons, pa.string()))
    assert any("duplicate_exact with another sha256" in p for p in check_invariants(corrupted))
    keep = list(d["keep"])
    keep[near_row] = True  # two kept rows within the radius (and a kept row with a reason)
    corrupted = out.set_column(out.schema.get_field_index("keep"), "keep", pa.array(keep))
    problems = check_invariants(corrupted, radius=4)
    assert any("within radius" in p for p in problems) and any("kept row with a drop reason" in p for p in problems)


# ---- captions and label conflicts ------------------------------------------------------------------------


def test_group_captions_own_first_then_by_distance_then_uid():
    rows = [
        row("k", sha="s", phash=0, w=900, caption="kept caption"),
        row("z1", sha="t", phash=0b1, caption="one bit, uid z1"),
        row("a1", sha="u", phash=0b10, caption="one bit, uid a1"),
        row("e", sha="s", phash=0, caption="exact copy"),
        row("far", sha="v", phash=0b111, caption="three bits"),
        row("dup", sha="w", phash=0b11, caption="kept caption"),  # same text: listed once
        row("bad", sha="x", phash=0b1, caption="!!", caption_reason=TOO_SHORT),  # invalid caption: not listed
        row("img", sha="y", phash=0b1000, caption="bad image, good caption", image_reason=TOO_SMALL),
        row("alone", sha="z", phash=0xFFFF << 40, caption="alone"),
    ]
    out = full(run(rows, DedupConfig(phash_radius=4)))
    assert out["k"][4] == ["kept caption", "exact copy", "one bit, uid a1", "bad image, good caption", "one bit, uid z1",
                           "three bits"]  # fmt: skip
    assert out["alone"][4] == ["alone"]
    assert all(out[u][4] is None for u in ("z1", "a1", "e", "far", "dup", "bad", "img"))
    assert out["bad"][:4] == (False, TOO_SHORT, "k", 1) and out["img"][:4] == (False, TOO_SMALL, "k", 1)


def test_label_conflict_flags_every_member_of_the_group():
    rows = [
        row("k", sha="s", phash=0, species="Quercus robur", w=900),
        row("m1", sha="s", phash=0, species="Quercus alba"),
        row("m2", sha="t", phash=1, species=None),
        row("m3", sha="u", phash=2, species="Quercus robur", image_reason=TOO_SMALL),  # rejected members count
        row("k2", sha="v", phash=0xFFFF << 16, species="Acer campestre", w=900),  # one species, and nulls
        row("n1", sha="w", phash=(0xFFFF << 16) | 1, species="Acer campestre"),
        row("n2", sha="x", phash=(0xFFFF << 16) | 2, species=None),
        row("lone", sha="y", phash=0xFFFF << 32, species="Acer campestre"),
        row("k3", sha="z", phash=0xFFFF << 48, species="Acer campestre", w=900),
        row("r1", sha="z2", phash=(0xFFFF << 48) | 1, species="Betula pendula", caption_reason=TOO_SHORT),
    ]
    out = full(run(rows, DedupConfig(phash_radius=2)))
    assert {u for u, v in out.items() if v[5]} == {"k", "m1", "m2", "m3", "k3", "r1"}
    assert out["k"][0] and out["k3"][0] and out["r1"][2] == "k3"


def test_real_filter_proposals_feed_decide():
    from plantmix.core.recipe import FilterConfig
    from plantmix.curate.filters import filter_proposals

    rows = [row("k", sha="s", phash=0, w=400, h=400, caption="a leaf of an oak tree"),
            row("tiny", sha="s", phash=0, w=20, h=20, caption="the same leaf, tiny"),
            row("img", sha="t", phash=1, w=300, h=300, caption="IMG_2041.jpg")]  # fmt: skip
    t = table(rows)
    filters = filter_proposals(t, FilterConfig())
    out = full(run(t, DedupConfig(phash_radius=2), filters=filters))
    assert out["k"][4] == ["a leaf of an oak tree", "the same leaf, tiny"]
    assert out["tiny"][:4] == (False, "image_too_small", "k", 0)
    assert out["img"][:4] == (False, "caption_garbage", "k", 1)


# ---- scale details and bad input -------------------------------------------------------------------------


def test_sha_hash_collisions_are_split_by_the_strings(monkeypatch):
    rows = random_rows(7, 400, 3, False)
    cfg = DedupConfig(phash_radius=3)
    monkeypatch.setattr(dd, "_hash_strings", lambda values: np.zeros(len(values), np.uint64))
    got, want = full(run(rows, cfg)), reference(rows, cfg)
    assert {u: v for u, v in got.items() if v != want[u]} == {}


def test_multi_chunk_input():
    rows = random_rows(8, 600, 4, False)
    cfg = DedupConfig(phash_radius=4)
    t = pa.concat_tables([table(rows[:250]), table(rows[250:])])
    f = pa.concat_tables([filter_table(rows[:100]), filter_table(rows[100:])])  # read from another file
    assert t["uid"].num_chunks == 2
    want = reference(rows, cfg)
    assert full(run(t, cfg, filters=f)) == want
    assert full(run(t, cfg, filters=filter_table(rows))) == want


def test_bad_input_names_the_problem():
    rows = [row("a", sha="s", phash=1), row("b", source="zz", sha="s", phash=1)]
    with pytest.raises(PlantmixError, match=r"source\(s\) \['zz'\] have no priority"):
        run(rows)
    rows[1]["image_reason"] = TOO_SMALL  # a rejected row is still ranked (it may be attached)
    with pytest.raises(PlantmixError, match=r"source\(s\) \['zz'\] have no priority"):
        run(rows)
    rows[1].update(keep=False, drop_reason=DROP_DOWNLOAD_FAILED)  # a failed download never is
    assert decisions(run(rows))["a"] == KEPT
    t = table(rows)
    with pytest.raises(PlantmixError, match="filter proposals do not match"):
        decide(t, filter_table(rows[:1]), PAIR_SCHEMA.empty_table(), DedupConfig(), PRIORITY)
    with pytest.raises(PlantmixError, match="filter proposals do not match"):
        decide(t, filter_table(rows[::-1]), PAIR_SCHEMA.empty_table(), DedupConfig(), PRIORITY)


# ---- real images --------------------------------------------------------------------------------------


def _image(seed: int, size: int = 320) -> Image.Image:
    """A smooth random scene with shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(20, size // 2, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(img) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _crop(img: Image.Image, f: float) -> Image.Image:
    p = round(min(img.size) * f)
    return img.crop((p, p, img.width - p, img.height - p))


def test_phash_distances_of_edited_copies():
    edits = {
        **{f"jpeg q{q}": (lambda im, q=q: Image.open(io.BytesIO(_encode(im, "JPEG", quality=q)))) for q in (60, 75, 95)},
        **{f"resize {f:.0%}": (lambda im, f=f: im.resize((int(im.width * f), int(im.height * f)))) for f in (0.6, 0.85)},
        **{f"crop {f:.0%}/side": (lambda im, f=f: _crop(im, f)) for f in (0.02, 0.05)},
    }
    originals = [_image(s) for s in range(16)]
    h0 = np.array([phash64(im) for im in originals], np.uint64)
    dist = {name: hamming(h0, np.array([phash64(e(im)) for im in originals], np.uint64)) for name, e in edits.items()}
    unrelated = hamming(h0[:, None], h0[None, :])[np.triu_indices(len(h0), 1)]
    for name, d in {**dist, "different images": unrelated}.items():
        print(f"{name:18s} median {np.median(d):4.1f}  max {d.max():2d}")
    for name in ("jpeg q60", "jpeg q75", "jpeg q95", "resize 60%", "resize 85%"):
        assert dist[name].max() <= 4, name  # within the default radius
    assert np.median(dist["crop 2%/side"]) <= 8
    assert np.median(dist["crop 5%/side"]) > np.median(dist["crop 2%/side"])  # pHash is not crop-invariant
    assert unrelated.min() > 12


def test_decide_on_real_image_bytes():
    img = _image(11)
    variants = {
        "orig": img,
        "jpeg": Image.open(io.BytesIO(_encode(img, "JPEG", quality=70))),
        "small": img.resize((200, 200)),
        "flipped": ImageOps.mirror(img),
        "other": _image(12),
    }
    rows = []
    for uid, im in variants.items():
        data = _encode(im, "PNG")
        ph, mirror = phash_pair_bytes(data)
        rows.append(row(uid, "b" if uid == "orig" else "a" if uid == "small" else "c",
                        sha=hashlib.sha256(data).hexdigest(), phash=ph, mirror=mirror, w=im.width, h=im.height,
                        sb=len(data)))  # fmt: skip
    rows.append(dict(rows[0], uid="orig-copy", source="b"))
    for cfg in (DedupConfig(), DedupConfig(mirror=False)):
        out = run(rows, cfg)
        got = decisions(out)
        # source a (priority 2) wins although its copy is the smallest image
        assert got["small"] == KEPT and got["other"] == KEPT
        assert got["orig"][:3] == got["jpeg"][:3] == (False, DROP_DUPLICATE_NEAR, "small")
        assert got["orig-copy"][:3] == (False, DROP_DUPLICATE_NEAR, "small")  # exact twin of orig, not of small
        assert got["flipped"][:3] == ((False, DROP_DUPLICATE_NEAR, "small") if cfg.mirror else (True, None, None))
        assert check_invariants(out, radius=cfg.phash_radius, mirror=cfg.mirror) == []
