"""Run one mix: select, write the mix manifest in shard order, shard it, document it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError
from plantmix.core.stage import atomic_path, fingerprint, is_done, mark_done
from plantmix.mix.select import Selection, read_selection_columns, select
from plantmix.mix.spec import MixSpec

MIX_FIELDS = [
    pa.field("mix_key", pa.string()),  # the sample key in the shards: uid, or uid-<repeat> when repeated
    pa.field("mix_repeat", pa.int32()),
    pa.field("mix_position", pa.int64()),  # global shuffled position
    pa.field("mix_shard", pa.int64()),  # = mix_position // shard_size
]
_MIX_VERSION = 1  # bump when the selection or the mix manifest layout changes


def write_mix_manifest(
    manifest: Path, sel: Selection, out: Path, shard_size: int, memory_limit: str = "2GB"
) -> None:
    """Join the selection to the full manifest rows and write them in shard order.

    DuckDB does the join and the sort out of core; one row group per output shard lets the shard
    writer read shard i as row group i.
    """
    import duckdb

    sel_table = pa.table(
        {"row": sel.row, "mix_repeat": sel.repeat, "repeated": sel.repeated, "mix_position": sel.position}
    )
    target = pa.schema([f.with_nullable(True) for f in pq.read_schema(manifest)] + MIX_FIELDS)
    src = str(manifest).replace("'", "''")
    query = f"""
        SELECT m.* EXCLUDE (file_row_number),
               CASE WHEN s.repeated THEN m.uid || '-' || CAST(s.mix_repeat AS VARCHAR) ELSE m.uid END AS mix_key,
               s.mix_repeat, s.mix_position, s.mix_position // {int(shard_size)} AS mix_shard
        FROM read_parquet('{src}', file_row_number = true) m JOIN sel_table s ON m.file_row_number = s.row
        ORDER BY s.mix_position"""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=".spill-") as spill:
        con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": spill})
        con.register("sel_table", sel_table)
        reader = con.sql(query).to_arrow_reader(shard_size)
        with pq.ParquetWriter(tmp, target, compression="zstd") as writer:
            pending: list[pa.Table] = []
            rows = 0
            for batch in reader:
                pending.append(pa.Table.from_batches([batch]).cast(target))
                rows += batch.num_rows
                while rows >= shard_size:
                    t = pa.concat_tables(pending)
                    writer.write_table(t.slice(0, shard_size), row_group_size=shard_size)
                    pending, rows = [t.slice(shard_size)], rows - shard_size
            if rows:
                writer.write_table(pa.concat_tables(pending), row_group_size=shard_size)
        con.close()


def run_mix(
    build_dir: Path, spec: MixSpec, recipe_hash: str | None = None, workers: int = 1
) -> Path:
    """Select, shard and document one mix of a built manifest; return BUILD/mixes/<name>/.

    Resumable: the selection, each shard and the final files are separate atomic steps keyed on
    the build manifest and the spec, so a rerun after an interruption redoes only what is missing.
    """
    from plantmix.mix.card import write_card
    from plantmix.mix.shards import write_shards

    build_dir = Path(build_dir)
    manifest = build_dir / "manifest.parquet"
    if not manifest.is_file():
        raise PlantmixError(f"{manifest}: not found; run `plantmix build` first")
    mix_dir = build_dir / "mixes" / spec.resolved_name()
    select_key = fingerprint(
        {"stage": "mix", "version": _MIX_VERSION, "spec": spec.model_dump(mode="json")}, [manifest]
    )
    final_key = fingerprint({"select": select_key, "recipe_hash": recipe_hash})
    if is_done(mix_dir / "dataset.json", final_key):
        return mix_dir
    mix_manifest = mix_dir / "manifest.parquet"
    if not is_done(mix_manifest, select_key):
        sel = select(read_selection_columns(manifest, spec), spec, where=str(manifest))
        write_mix_manifest(manifest, sel, mix_manifest, spec.shard_size)
        mark_done(mix_manifest, select_key, rows=len(sel), available=sel.available)
    write_shards(build_dir, mix_dir, spec, select_key=select_key, recipe_hash=recipe_hash, workers=workers)
    write_card(build_dir, mix_dir)
    mark_done(mix_dir / "dataset.json", final_key)
    return mix_dir
