"""The mix manifest: the selected build rows in shard order, one row group per shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mixbuild import make_build
from plantmix.core.recipe import ResourcesConfig
from plantmix.mix.manifest import MIX_FIELDS, write_mix_manifest
from plantmix.mix.select import Selection, read_selection_columns, select
from plantmix.mix.spec import MixSpec


def plain_mix_manifest(manifest: pa.Table, sel, shard_size: int = 7) -> pa.Table:
    """The same rows written the obvious way: all in memory, taken in position order."""
    order = np.argsort(sel.position)
    rows = manifest.take(pa.array(sel.row[order]))
    repeat = sel.repeat[order]
    keys = [f"{u}-{r}" if rep else u for u, r, rep in zip(rows["uid"].to_pylist(), repeat, sel.repeated[order])]
    return (rows.append_column("mix_key", pa.array(keys)).append_column("mix_repeat", pa.array(repeat, pa.int32()))
            .append_column("mix_position", pa.array(sel.position[order], pa.int64()))
            .append_column("mix_shard", pa.array(sel.position[order] // shard_size, pa.int64())))


@pytest.mark.parametrize("spec", [MixSpec(plant=1500, general=700), MixSpec(plant=3000, general=1500, allow_repeat=True)])
def test_mix_manifest_is_the_selection_in_shard_order(tmp_path, spec):
    build = make_build(tmp_path / "b", rows={"plant_a": 1200, "plant_b": 700, "web": 900}, per_tar=400)
    path = build / "manifest.parquet"
    # small row groups and buckets (1000 rows = 142 shards of 7), so rows cross both boundaries
    pq.write_table(pq.read_table(path), path, row_group_size=500)
    sel = select(read_selection_columns(path, spec), spec)
    out = tmp_path / "mix.parquet"
    write_mix_manifest(path, sel, out, shard_size=7, resources=ResourcesConfig(batch_rows=1000))
    got = pq.read_table(out)
    want = plain_mix_manifest(pq.read_table(path), sel)
    assert got.column_names == want.column_names
    for name in want.column_names:
        assert got[name].to_pylist() == want[name].to_pylist(), name
    meta = pq.read_metadata(out)
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [7] * (len(sel) // 7) + ([len(sel) % 7] if len(sel) % 7 else [])
    assert pc.all(pc.equal(got["mix_shard"], pc.divide(got["mix_position"], 7))).as_py()


def _coded_world(n: int = 30_000) -> pa.Table:
    """String columns of every kind the writer meets: a few values (with nulls, and other values in
    later row groups), ~2,000 values, values unique per row, and all nulls."""
    rng = np.random.default_rng(0)
    few = np.array(["plant", "general", "other"], dtype=object)[rng.integers(0, 3, n)]
    few[rng.random(n) < 0.2] = None
    few[n // 2 :][rng.random(n - n // 2) < 0.3] = "late-value"  # a value the first row groups never hold
    many = np.array([f"Species {i:05d}" for i in rng.zipf(1.3, n) % 2000], dtype=object)
    many[rng.random(n) < 0.1] = None
    return pa.table({"uid": [f"{i:032x}" for i in range(n)], "few": few.tolist(), "many": many.tolist(),
                     "unique": [f"http://x/{i}" for i in rng.permutation(n)], "empty": pa.nulls(n, pa.string()),
                     "tags": [[str(i % 7)] for i in range(n)], "n": np.arange(n)})  # fmt: skip


def _shuffled_selection(n_rows: int, n: int, seed: int = 1) -> Selection:
    rng = np.random.default_rng(seed)
    row = rng.integers(0, n_rows, n).astype(np.int64)  # rows picked more than once, as a repeated domain
    repeat = np.zeros(n, np.int32)
    return Selection(row, repeat, np.zeros(n, bool), rng.permutation(n).astype(np.int64), {})


def _dictionary_columns(path) -> set[str]:
    """Columns whose first row group was written with a dictionary page: the ones that travelled as codes."""
    rg = pq.read_metadata(path).row_group(0)
    return {rg.column(i).path_in_schema for i in range(rg.num_columns) if rg.column(i).has_dictionary_page}


def test_repeating_strings_travel_as_codes_and_read_back_as_the_same_strings(tmp_path):
    world = _coded_world()
    path = tmp_path / "manifest.parquet"
    pq.write_table(world, path, row_group_size=4_000)  # row groups with dictionaries of their own
    sel = _shuffled_selection(world.num_rows, 25_000)
    out = tmp_path / "mix.parquet"
    write_mix_manifest(path, sel, out, shard_size=1_000, resources=ResourcesConfig(batch_rows=5_000))
    got, want = pq.read_table(out), plain_mix_manifest(world, sel, shard_size=1_000)
    assert got.schema == pa.schema([f.with_nullable(True) for f in world.schema] + MIX_FIELDS)
    for name in want.column_names:
        assert got[name].to_pylist() == want[name].to_pylist(), name
    meta = pq.read_metadata(out)
    coded = _dictionary_columns(out)
    assert {"few", "many", "empty"} <= coded and not {"uid", "unique", "mix_key"} & coded
    # each row group holds only the values it uses of a large dictionary, so the file does not grow by a
    # whole dictionary per shard
    reader = pq.ParquetFile(out, read_dictionary=["many"])
    for rg in (0, meta.num_row_groups - 1):
        column = reader.read_row_group(rg, columns=["many"]).column(0)
        assert sum(len(c.dictionary) for c in column.chunks) <= len(pc.unique(column)) + 1


def test_a_column_past_the_dictionary_budget_is_gathered_whole(tmp_path, monkeypatch):
    import plantmix.mix.manifest as writer

    world = _coded_world(5_000)
    path = tmp_path / "manifest.parquet"
    pq.write_table(world, path, row_group_size=1_000)
    monkeypatch.setattr(writer, "CODED_DICTIONARY_BUDGET", 8_000)  # "many" needs more, "few" fits
    sel = _shuffled_selection(world.num_rows, 4_000)
    out = tmp_path / "mix.parquet"
    write_mix_manifest(path, sel, out, shard_size=100, resources=ResourcesConfig(batch_rows=1_000))
    coded = _dictionary_columns(out)
    assert "few" in coded and "many" not in coded
    got, want = pq.read_table(out), plain_mix_manifest(world, sel, shard_size=100)
    for name in want.column_names:
        assert got[name].to_pylist() == want[name].to_pylist(), name
