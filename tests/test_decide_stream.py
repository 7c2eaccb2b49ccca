"""`decide_to_parquet` (columns read dictionary-encoded, the captions column built in spans, the manifest
streamed row group by row group) writes exactly the manifest that the in-memory `decide` returns."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import plantmix.curate.decide as decide_module
from plantmix.core.recipe import DedupConfig
from plantmix.curate.decide import decide, decide_to_parquet
from test_dedup import PRIORITY, filter_table, proposals, random_rows, table


@pytest.mark.parametrize("seed,dense", [(0, False), (1, True), (2, True)])
def test_streamed_decide_equals_in_memory_decide(tmp_path, monkeypatch, seed, dense):
    cfg = DedupConfig(phash_radius=6)
    rows = random_rows(seed, 700, cfg.phash_radius, dense)
    for i, r in enumerate(rows):  # empty captions and species count as missing, as null ones do
        if i % 17 == 0:
            r["caption"] = ""
        if i % 23 == 0:
            r["taxon_species"] = ""
    joined, filters = table(rows), filter_table(rows)
    pairs = proposals(joined, cfg)
    want = decide(joined, filters, pairs, cfg, PRIORITY)
    path = tmp_path / "joined.parquet"
    pq.write_table(joined, path, row_group_size=64)  # chunks that do not line up with the spans below
    monkeypatch.setattr(decide_module, "_SPAN_ROWS", 50)
    decide_to_parquet(path, filters, pairs, cfg, PRIORITY, None, tmp_path / "manifest.parquet")
    got = pq.read_table(tmp_path / "manifest.parquet")
    assert got.schema.equals(pq.read_table(_written(tmp_path, want)).schema, check_metadata=True)
    assert sum(got["label_conflict"].to_pylist()) > 0 and any(len(c or []) > 1 for c in got["captions"].to_pylist())
    for name in want.column_names:
        assert got[name].to_pylist() == want[name].to_pylist(), name


def _written(tmp_path, t):
    path = tmp_path / "want.parquet"
    pq.write_table(t, path)
    return path
