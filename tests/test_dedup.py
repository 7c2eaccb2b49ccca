"""Dedup: keep rule, dup_of links, chains, untouched rows, pHash robustness, and agreement with a
brute-force all-pairs reference written independently in plain Python."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFilter

import plantmix.curate.dedup as dd
from plantmix.curate.dedup import dedup, dedup_exact, dedup_near, greedy_keep, near_pairs
from plantmix.core.errors import PlantmixError
from plantmix.core.hashing import hamming, phash64, phash_bytes, popcount64
from plantmix.core.recipe import DedupConfig
from plantmix.core.schema import DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR

PRIORITY = {"a": 2, "b": 0, "c": 1}
SCHEMA = pa.schema([
    ("uid", pa.string()), ("source", pa.string()), ("sha256", pa.string()), ("phash", pa.uint64()),
    ("width", pa.int64()), ("height", pa.int64()), ("keep", pa.bool_()), ("drop_reason", pa.string()),
    ("dup_of", pa.string()), ("caption", pa.string()),
])
DECISION = ("keep", "drop_reason", "dup_of")


def row(uid, source="a", sha=None, phash=None, w=100, h=100, keep=True, **kw):
    return {"uid": uid, "source": source, "sha256": sha, "phash": phash, "width": w, "height": h,
            "keep": keep, "drop_reason": kw.get("drop_reason"), "dup_of": kw.get("dup_of"), "caption": f"c-{uid}"}


def table(rows):
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def decisions(t: pa.Table) -> dict[str, tuple]:
    d = t.to_pydict()
    return {u: (k, r, o) for u, k, r, o in zip(d["uid"], d["keep"], d["drop_reason"], d["dup_of"])}


def flip(x: int, bits) -> int:
    for b in bits:
        x ^= 1 << int(b)
    return x


# ---- reference: the documented semantics, the slow obvious way ----------------------------------------


def reference(rows: list[dict], radius: int, exact=True, near=True) -> dict[str, tuple]:
    rows = [dict(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-PRIORITY[rows[i]["source"]],
                                                    -(rows[i]["width"] or 0) * (rows[i]["height"] or 0),
                                                    rows[i]["uid"], i))

    def drop(i, j, reason):
        rows[i].update(keep=False, drop_reason=reason, dup_of=rows[j]["uid"])

    if exact:
        best = {}
        for i in order:
            r = rows[i]
            if r["keep"] and r["sha256"] is not None:
                if r["sha256"] in best:
                    drop(i, best[r["sha256"]], DROP_DUPLICATE_EXACT)
                else:
                    best[r["sha256"]] = i
    if near:
        kept, now_dropped = [], {}
        for i in order:
            r = rows[i]
            if not r["keep"] or r["phash"] is None:
                continue
            twin = next((j for j in kept if (rows[j]["phash"] ^ r["phash"]).bit_count() <= radius), None)
            if twin is None:
                kept.append(i)
            else:
                drop(i, twin, DROP_DUPLICATE_NEAR)
                now_dropped[r["uid"]] = rows[twin]["uid"]
        for r in rows:  # exact twins of a row dropped as near follow it to its kept row
            if r["drop_reason"] == DROP_DUPLICATE_EXACT and r["dup_of"] in now_dropped:
                r["dup_of"] = now_dropped[r["dup_of"]]
    return {r["uid"]: (r["keep"], r["drop_reason"], r["dup_of"]) for r in rows}


def random_rows(seed: int, n: int, radius: int, dense: bool) -> list[dict]:
    """Random manifest with planted exact copies, near copies (≤ radius flips), chains and gaps."""
    rng = np.random.default_rng(seed)
    uids = [f"{u:06x}" for u in rng.choice(1 << 24, n, replace=False)]
    rows: list[dict] = []
    for i in range(n):
        u = rng.random()
        j = int(rng.integers(0, i)) if i else 0
        if dense:  # few distinct low bits: big clusters, long chains, many identical hashes
            ph = int(rng.integers(0, 1 << 11)) << 20
        else:
            ph = int(rng.integers(0, 2**64, dtype=np.uint64, endpoint=False))
        sha = hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()
        if i and u < 0.15:
            sha, ph = rows[j]["sha256"], rows[j]["phash"]
        elif i and u < 0.40 and rows[j]["phash"] is not None:
            ph = flip(rows[j]["phash"], rng.choice(64, rng.integers(0, radius + 1), replace=False))
        elif i and u < 0.50 and rows[-1]["phash"] is not None:  # chain link from the previous row
            ph = flip(rows[-1]["phash"], rng.choice(64, radius, replace=False))
        rows.append(row(uids[i], source=str(rng.choice(list(PRIORITY))),
                        sha=None if rng.random() < 0.05 else sha,
                        phash=None if rng.random() < 0.05 else ph,
                        w=int(rng.choice([64, 100, 128])), h=None if rng.random() < 0.03 else int(rng.choice([64, 100])),
                        keep=bool(rng.random() < 0.92),
                        drop_reason=None))
        if not rows[-1]["keep"]:
            rows[-1]["drop_reason"] = "download_failed"
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


def test_phash_bytes_rejects_undecodable():
    with pytest.raises(PlantmixError, match="cannot decode image bytes"):
        phash_bytes(b"<html>not an image</html>")
    with pytest.raises(PlantmixError, match="cannot decode image bytes"):
        phash_bytes(_encode(_image(1), "JPEG")[:300])  # truncated


# ---- candidate generation and greedy ------------------------------------------------------------------


@pytest.mark.parametrize("radius,dense", [(0, False), (1, False), (2, False), (4, False), (6, False), (9, False),
                                          (0, True), (2, True), (4, True)])
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


# ---- dedup semantics ----------------------------------------------------------------------------------


def test_keep_rule_priority_then_area_then_uid():
    rows = [
        row("u1", "b", sha="s", w=500, h=500),  # largest, but lowest priority
        row("u2", "a", sha="s", w=100, h=100),
        row("u3", "a", sha="s", w=200, h=100),  # priority a, larger area than u2
        row("u0", "a", sha="s", w=100, h=200),  # same area as u3: the smaller uid wins the tie
    ]
    out = decisions(dedup_exact(table(rows), PRIORITY))
    assert out["u0"] == (True, None, None)
    assert out["u3"] == out["u2"] == out["u1"] == (False, DROP_DUPLICATE_EXACT, "u0")


def test_within_and_cross_source_near_and_exact():
    rows = [
        row("p1", "a", sha="x", phash=0b1111),
        row("p2", "a", sha="y", phash=0b0111),       # near twin of p1, same source
        row("q1", "c", sha="z", phash=0b1111 << 40),
        row("q2", "b", sha="z", phash=0b1111 << 40),  # exact twin of q1, other source
        row("q3", "b", sha="w", phash=(0b1111 << 40) | 0b11),  # near twin of q1, other source
    ]
    out = decisions(dedup(table(rows), DedupConfig(phash_radius=2), PRIORITY))
    assert out == {
        "p1": (True, None, None), "p2": (False, DROP_DUPLICATE_NEAR, "p1"),
        "q1": (True, None, None), "q2": (False, DROP_DUPLICATE_EXACT, "q1"), "q3": (False, DROP_DUPLICATE_NEAR, "q1"),
    }


@pytest.mark.parametrize("best", ["a", "b"])
def test_chain_is_not_transitive(best):
    a, b, c = 0, 0b111, 0b111111  # a~b (3), b~c (3), a≁c (6) at radius 3
    area = {"a": 100, "b": 100}
    area[best] = 300
    rows = [row("a", phash=a, h=area["a"]), row("b", phash=b, h=area["b"]), row("c", phash=c)]
    out = decisions(dedup_near(table(rows), PRIORITY, 3))
    if best == "a":  # b goes to a; c is kept: its only neighbour b was dropped
        assert out == {"a": (True, None, None), "b": (False, DROP_DUPLICATE_NEAR, "a"), "c": (True, None, None)}
    else:  # b is best and reaches both ends
        assert out == {"a": (False, DROP_DUPLICATE_NEAR, "b"), "b": (True, None, None), "c": (False, DROP_DUPLICATE_NEAR, "b")}


def test_exact_twins_follow_their_winner_when_it_is_near_dropped():
    rows = [
        row("big", "a", sha="s1", phash=0, w=400),
        row("e1", "a", sha="s2", phash=1),
        row("e2", "a", sha="s2", phash=1),
    ]
    out = decisions(dedup(table(rows), DedupConfig(phash_radius=2), PRIORITY))
    assert out == {"big": (True, None, None), "e1": (False, DROP_DUPLICATE_NEAR, "big"),
                   "e2": (False, DROP_DUPLICATE_EXACT, "big")}


def test_non_participants_untouched_and_no_row_lost():
    rows = [
        row("k", sha="s", phash=5),
        row("off", sha="s", phash=5, keep=False, drop_reason="download_failed"),
        row("nohash", sha=None, phash=None),
        row("nosha", sha=None, phash=5),  # no sha: only near applies
        row("nophash", sha="s", phash=None),  # exact twin of k, no phash
    ]
    t = table(rows)
    out = dedup(t, DedupConfig(phash_radius=0), PRIORITY)
    assert out.num_rows == t.num_rows and out.schema == t.schema
    assert out.column("uid").to_pylist() == t.column("uid").to_pylist()
    assert out.column("caption").to_pylist() == t.column("caption").to_pylist()
    d = decisions(out)
    assert d["off"] == (False, "download_failed", None)
    assert d["nohash"] == (True, None, None)
    assert d["nosha"] == (False, DROP_DUPLICATE_NEAR, "k")
    assert d["nophash"] == (False, DROP_DUPLICATE_EXACT, "k")


def test_empty_and_all_dropped_tables():
    empty = table([])
    assert dedup(empty, DedupConfig(), PRIORITY).num_rows == 0
    off = table([row("a", sha="s", phash=1, keep=False), row("b", sha="s", phash=1, keep=False)])
    assert decisions(dedup(off, DedupConfig(), PRIORITY)) == decisions(off)


def test_radius_zero_versus_r_and_config_switches():
    rows = [row("a", sha="1", phash=0), row("b", sha="2", phash=0), row("c", sha="3", phash=0b11),
            row("d", sha="1", phash=(1 << 60) | (1 << 50) | (1 << 40))]
    t = table(rows)
    at0 = decisions(dedup(t, DedupConfig(phash_radius=0), PRIORITY))
    at2 = decisions(dedup(t, DedupConfig(phash_radius=2), PRIORITY))
    assert at0["b"] == at2["b"] == (False, DROP_DUPLICATE_NEAR, "a")
    assert at0["c"] == (True, None, None) and at2["c"] == (False, DROP_DUPLICATE_NEAR, "a")
    assert at0["d"] == (False, DROP_DUPLICATE_EXACT, "a")
    only_near = decisions(dedup(t, DedupConfig(exact=False, phash_radius=2), PRIORITY))
    assert only_near["d"] == (True, None, None)
    nothing = dedup(t, DedupConfig(exact=False, near=False), PRIORITY)
    assert decisions(nothing) == decisions(t)


@pytest.mark.parametrize("seed,radius,dense", [(1, 4, False), (2, 2, True), (3, 6, False), (4, 0, True)])
def test_matches_brute_force_reference(seed, radius, dense):
    rows = random_rows(seed, 1500, radius, dense)
    out = dedup(table(rows), DedupConfig(phash_radius=radius), PRIORITY)
    got = decisions(out)
    want = reference(rows, radius)
    assert sum(not k for k, _, _ in want.values()) > 200
    assert got == want
    kept = {u for u, (k, _, _) in got.items() if k}
    assert all(o in kept for _, _, o in got.values() if o)  # dup_of names kept rows only
    # invariant: input order does not matter, and a second pass changes nothing
    perm = np.random.default_rng(seed).permutation(len(rows))
    assert decisions(dedup(table([rows[i] for i in perm]), DedupConfig(phash_radius=radius), PRIORITY)) == got
    assert decisions(dedup(out, DedupConfig(phash_radius=radius), PRIORITY)) == got


def test_sha_hash_collisions_are_split_by_the_strings(monkeypatch):
    rows = random_rows(7, 400, 3, False)
    monkeypatch.setattr(dd, "_hash_strings", lambda values: np.zeros(len(values), np.uint64))
    assert decisions(dedup_exact(table(rows), PRIORITY)) == reference(rows, 3, near=False)


def test_multi_chunk_input():
    rows = random_rows(8, 600, 4, False)
    t = pa.concat_tables([table(rows[:250]), table(rows[250:])])
    assert t.column("uid").num_chunks == 2
    assert decisions(dedup(t, DedupConfig(phash_radius=4), PRIORITY)) == reference(rows, 4)


def test_bad_input_names_the_problem():
    t = table([row("a", sha="s", phash=1), row("b", source="zz", sha="s", phash=1)])
    with pytest.raises(PlantmixError, match=r"source\(s\) \['zz'\] have no priority"):
        dedup(t, DedupConfig(), PRIORITY)
    assert dedup(t.slice(0, 1), DedupConfig(), PRIORITY).num_rows == 1
    with pytest.raises(PlantmixError, match=r"lacks column\(s\) \['dup_of'\]"):
        dedup(t.drop(["dup_of"]), DedupConfig(), PRIORITY)
    bad = t.set_column(3, "phash", pa.array([1, 2], pa.int64()))
    with pytest.raises(PlantmixError, match="'phash' must be uint64"):
        dedup_near(bad, PRIORITY, 4)


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


def test_dedup_on_real_image_bytes():
    img = _image(11)
    variants = {
        "orig": img,
        "jpeg": Image.open(io.BytesIO(_encode(img, "JPEG", quality=70))),
        "small": img.resize((200, 200)),
        "other": _image(12),
    }
    rows = []
    for uid, im in variants.items():
        data = _encode(im, "PNG")
        rows.append(row(uid, "b" if uid == "orig" else "a" if uid == "small" else "c", sha=hashlib.sha256(data).hexdigest(),
                        phash=phash_bytes(data), w=im.width, h=im.height))
    rows.append(dict(rows[0], uid="orig-copy", source="b"))
    out = decisions(dedup(table(rows), DedupConfig(), PRIORITY))
    # source a (priority 2) wins although its copy is the smallest image
    assert out["small"] == (True, None, None) and out["other"] == (True, None, None)
    assert out["orig"] == out["jpeg"] == (False, DROP_DUPLICATE_NEAR, "small")
    assert out["orig-copy"] == (False, DROP_DUPLICATE_EXACT, "small")
