"""Mix selection: exact counts, determinism, nesting, caps, source weights, shortfall and repeats."""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import pyarrow as pa
import pytest
import yaml

from plantmix.core.errors import PlantmixError, ShortfallError
from plantmix.mix.select import argsort_u64, fnv1a64, select, selection_keys, splitmix64
from plantmix.mix.spec import MixSpec, make_spec
from plantmix.core.recipe import Recipe

M64 = (1 << 64) - 1


def py_fnv1a64(s: str) -> int:
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def py_splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def table(n_plant=3000, n_general=1000, species=2000, seed=1, sources=("pa", "pb")) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_plant + n_general):
        plant = i < n_plant
        sp = int(min(rng.zipf(1.5), species)) if plant else None
        rows.append(
            {
                "uid": hashlib.sha256(str(i).encode()).hexdigest()[:32],
                "domain": "plant" if plant else "general",
                "source": sources[i % len(sources)] if plant else "web",
                "keep": bool(rng.random() < 0.9),
                "taxon_species": f"G{sp % 7} s{sp}" if plant else None,
                "taxon_genus": f"G{sp % 7}" if plant else None,
                "taxon_family": None,
            }
        )
    return pa.Table.from_pylist(rows)


def chosen(t: pa.Table, sel) -> list[str]:
    return t["uid"].take(pa.array(sel.row)).to_pylist()


def test_hashes_match_published_algorithms():
    assert fnv1a64(pa.array(["", "a", "foobar"])).tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    assert int(splitmix64(np.uint64(0))) == 0xE220A8397B1DCDAF
    words = ["x", "plantmix", "", "ü-ñ", "a" * 40, "0123456789abcdef0123456789abcdef"]
    assert fnv1a64(pa.chunked_array([words[:2], words[2:]])).tolist() == [py_fnv1a64(w) for w in words]
    same = [hashlib.md5(w.encode()).hexdigest() for w in words]  # equal lengths take the matrix path
    assert fnv1a64(pa.array(same)).tolist() == [py_fnv1a64(w) for w in same]
    keys = selection_keys(fnv1a64(pa.array(words)), 7).tolist()
    assert keys == [py_splitmix64(py_fnv1a64(w) ^ py_splitmix64(7)) for w in words]


def test_argsort_u64_is_a_stable_sort_by_key_then_tiebreak():
    rng = np.random.default_rng(0)
    cases = [
        rng.integers(0, 2**63, 5000, dtype=np.uint64) * np.uint64(2),
        rng.integers(0, 50, 5000).astype(np.uint64) << np.uint64(40),  # many equal keys
        rng.integers(0, 2**12, 30000).astype(np.uint64),  # all share one prefix: the fallback path
        np.zeros(0, np.uint64),
    ]
    for keys in cases:
        assert np.array_equal(argsort_u64(keys), np.argsort(keys, kind="stable"))
        tiebreak = rng.integers(0, 3, len(keys)).astype(np.uint64)
        assert np.array_equal(argsort_u64(keys, tiebreak), np.lexsort((tiebreak, keys)))


def test_selection_matches_a_plain_python_reference():
    t = table(800, 300)
    spec = MixSpec(ratio=0.5, total=400, seed=3, per_taxon_cap=25, per_genus_cap=60)
    rows = t.to_pylist()
    expected = []
    for domain, n in spec.counts().items():
        pool = [r for r in rows if r["keep"] and r["domain"] == domain]
        pool.sort(key=lambda r: -py_splitmix64(py_fnv1a64(r["uid"]) ^ py_splitmix64(3)))
        for rank, cap in (("species", 25), ("genus", 60)):
            seen = collections.Counter()
            kept = []
            for r in pool:
                g = r[f"taxon_{rank}"]
                seen[g] += 1
                if g is None or seen[g] <= cap:
                    kept.append(r)
            pool = kept
        expected += [r["uid"] for r in pool[:n]]
    assert chosen(t, select(t, spec)) == expected


@pytest.mark.parametrize("total", [1, 99, 1000, 1301])
def test_ratio_gives_exact_counts(total):
    t = table()
    sel = select(t, MixSpec(ratio=0.77, total=total))
    domains = collections.Counter(t["domain"].take(pa.array(sel.row)).to_pylist())
    assert domains["plant"] == round(0.77 * total) and domains["general"] == total - round(0.77 * total)
    assert sorted(sel.position.tolist()) == list(range(total))


def test_deterministic_and_nested():
    t = table()
    weights = {"pa": 3.0}
    big = select(t, MixSpec(ratio=0.77, total=1200, seed=5, per_taxon_cap=100, source_weights=weights))
    again = select(t, MixSpec(ratio=0.77, total=1200, seed=5, per_taxon_cap=100, source_weights=weights))
    assert np.array_equal(big.row, again.row) and np.array_equal(big.position, again.position)
    for total in (10, 300, 1000):
        small = select(t, MixSpec(ratio=0.77, total=total, seed=5, per_taxon_cap=100, source_weights=weights))
        assert set(chosen(t, small)) <= set(chosen(t, big))
    # ratios nest per domain too: fewer plant rows at a lower ratio are a prefix of the plant order
    low = select(t, MixSpec(ratio=0.5, total=1200, seed=5, per_taxon_cap=100, source_weights=weights))
    assert set(chosen(t, low)) - set(chosen(t, big)) <= set(t.filter(pa.compute.equal(t["domain"], "general"))["uid"].to_pylist())
    other = select(t, MixSpec(ratio=0.77, total=1200, seed=6))
    assert chosen(t, other) != chosen(t, big)
    # a reordered manifest gives the same mix
    perm = pa.array(np.random.default_rng(0).permutation(t.num_rows))
    shuffled = t.take(perm)
    assert sorted(chosen(shuffled, select(shuffled, MixSpec(ratio=0.77, total=1200, seed=5)))) == sorted(
        chosen(t, select(t, MixSpec(ratio=0.77, total=1200, seed=5)))
    )


def test_caps_are_respected_and_unknown_taxa_are_not_capped():
    t = table(3000, 200)
    sel = select(t, MixSpec(plant=900, seed=2, per_taxon_cap=30, per_genus_cap=200))
    sub = t.take(pa.array(sel.row)).to_pylist()
    assert max(collections.Counter(r["taxon_species"] for r in sub).values()) <= 30
    assert max(collections.Counter(r["taxon_genus"] for r in sub).values()) <= 200
    assert all(r["keep"] and r["domain"] == "plant" for r in sub)
    # general rows have no species: a species cap does not limit them
    assert len(select(t, MixSpec(general=150, per_taxon_cap=1)).row) == 150


def test_source_weights_shift_the_share_within_a_domain():
    t = table(6000, 0, species=100000)
    share = []
    for w in (1.0, 4.0):
        sel = select(t, MixSpec(plant=1000, source_weights={"pa": w}))
        share.append(collections.Counter(t["source"].take(pa.array(sel.row)).to_pylist())["pa"] / 1000)
    assert 0.4 < share[0] < 0.6 and share[1] > 0.7


def test_shortfall_names_domain_needed_and_available():
    t = table(100, 50)
    available = sum(r["keep"] for r in t.to_pylist() if r["domain"] == "general")
    with pytest.raises(ShortfallError, match=rf"domain 'general' needs 60 rows but only {available} are available"):
        select(t, MixSpec(plant=10, general=60))
    with pytest.raises(ShortfallError, match="at most 1 per species"):
        select(t, MixSpec(plant=90, per_taxon_cap=1))


def test_allow_repeat_cycles_rows_with_distinct_repeat_numbers():
    t = table(100, 50)
    available = sum(r["keep"] for r in t.to_pylist() if r["domain"] == "general")
    sel = select(t, MixSpec(plant=10, general=130, allow_repeat=True))
    general = sel.repeated
    assert general.sum() == 130 and not sel.repeated[:10].any()
    pairs = list(zip(sel.row[general].tolist(), sel.repeat[general].tolist()))
    assert len(set(pairs)) == 130  # (uid, repeat) is unique: keys uid-0, uid-1, ... differ
    assert len({r for r, _ in pairs}) == available
    assert max(sel.repeat.tolist()) == -(-130 // available) - 1


def test_bad_specs_and_inputs_fail_with_one_line():
    with pytest.raises(PlantmixError, match="ratio and total go together"):
        make_spec(ratio=0.5)
    with pytest.raises(PlantmixError, match="either ratio and total, or plant"):
        make_spec(ratio=0.5, total=10, plant=3)
    with pytest.raises(PlantmixError, match="SRC=W"):
        make_spec(ratio=0.5, total=10, source_weights=["pa:2"])
    assert make_spec(ratio=0.5, total=10, source_weights=["pa=2"]).source_weights == {"pa": 2.0}
    t = table(50, 20)
    with pytest.raises(PlantmixError, match="unknown source"):
        select(t, MixSpec(plant=5, source_weights={"nope": 2}))
    bad = t.set_column(0, "uid", pa.array([f"{u}.x" for u in t["uid"].to_pylist()]))
    with pytest.raises(PlantmixError, match="cannot be a webdataset key"):
        select(bad, MixSpec(plant=5))
    dup = t.set_column(0, "uid", pa.array(["same"] * t.num_rows))
    with pytest.raises(PlantmixError, match="appears more than once"):
        select(dup, MixSpec(plant=5))


def test_recipe_mix_entries_are_mix_specs():
    recipe = yaml.safe_load(
        """
name: r
sources: [{name: s, domain: plant, format: url_list, path: x.csv}]
mix:
  - {name: m77, ratio: 0.77, total: 100, per_taxon_cap: 5, source_weights: {s: 2}}
  - {plant: 10, general: 5, allow_repeat: true}
"""
    )
    r = Recipe.model_validate(recipe)
    assert [m.resolved_name() for m in r.mix] == ["m77", "p10-g5-s0"]
    assert r.mix[0].counts() == {"plant": 77, "general": 23}
    recipe["mix"][0]["ratio"] = 2
    with pytest.raises(Exception, match="ratio"):
        Recipe.model_validate(recipe)
