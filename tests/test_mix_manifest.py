"""The mix manifest: the selected build rows in shard order, one row group per shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mixbuild import make_build
from plantmix.core.recipe import ResourcesConfig
from plantmix.mix.run import write_mix_manifest
from plantmix.mix.select import read_selection_columns, select
from plantmix.mix.spec import MixSpec


def plain_mix_manifest(manifest: pa.Table, sel) -> pa.Table:
    """The same rows written the obvious way: all in memory, taken in position order."""
    order = np.argsort(sel.position)
    rows = manifest.take(pa.array(sel.row[order]))
    repeat = sel.repeat[order]
    keys = [f"{u}-{r}" if rep else u for u, r, rep in zip(rows["uid"].to_pylist(), repeat, sel.repeated[order])]
    return (rows.append_column("mix_key", pa.array(keys)).append_column("mix_repeat", pa.array(repeat, pa.int32()))
            .append_column("mix_position", pa.array(sel.position[order], pa.int64()))
            .append_column("mix_shard", pa.array(sel.position[order] // 7, pa.int64())))


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
