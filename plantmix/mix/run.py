"""Run one mix: select, write the mix manifest in shard order, shard it, document it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rich.console import Console

from plantmix.core.errors import PlantmixError
from plantmix.core.lock import directory_lock
from plantmix.core.overlap import ahead
from plantmix.core.recipe import ResourcesConfig
from plantmix.core.stage import (
    atomic_path, clear_done, done_marker, fingerprint, mark_done, read_json_object, remove_stale_temporaries,
    require_columns,
)
from plantmix.mix.verify import VerifyReport, file_record, output_intact, read_marker, record_matches, verify_shards
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
    manifest: Path, sel: Selection, out: Path, shard_size: int, resources: ResourcesConfig | None = None
) -> None:
    """Gather the selected rows of the build manifest, in shard order, into `out`.

    Two streaming passes, memory bounded by one manifest row group and one bucket of
    `resources.batch_rows` rows (rounded to whole shards): (1) read the manifest a row group at a time
    and append each selected row, once per copy, to the spill file of its output bucket (a range of
    shards); (2) per bucket, order by position and write one row group per shard, so the shard writer
    reads shard i as row group i.
    """
    resources = resources or ResourcesConfig()
    bucket_rows = max(1, resources.batch_rows // shard_size) * shard_size
    target = pa.schema([f.with_nullable(True) for f in pq.read_schema(manifest)] + MIX_FIELDS)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=".spill-") as spill:
        buckets = _spill_by_bucket(manifest, sel, shard_size, bucket_rows, target, Path(spill))
        # One writer thread encodes every row: it bounds the stage's wall time. Snappy costs it a quarter
        # less than zstd (the file is ~1.8x larger; the shard writer reads it once); statistics only
        # where readers filter (by shard, position): string statistics cost a fifth of the write.
        with pq.ParquetWriter(tmp, target, compression="snappy", use_dictionary=False,
                              write_statistics=["mix_shard", "mix_position"]) as writer:
            for path, part in ahead(_sorted_bucket, buckets):
                writer.write_table(part, row_group_size=shard_size)
                path.unlink()
        if not buckets:
            pq.write_table(target.empty_table(), tmp, compression="zstd")


def _spill_by_bucket(
    manifest: Path, sel: Selection, shard_size: int, bucket_rows: int, target: pa.Schema, spill: Path
) -> list[Path]:
    """Pass 1 of write_mix_manifest: selected rows (with their mix columns) → one IPC file per bucket."""
    by_row = np.argsort(sel.row, kind="stable")
    rows_sorted = sel.row[by_row]
    n_buckets = -(-len(sel) // bucket_rows)
    paths = [spill / f"bucket-{k:05d}.arrow" for k in range(n_buckets)]
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    writers = [pa.ipc.new_file(str(p), target, options=options) for p in paths]
    pf = pq.ParquetFile(manifest)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])

    def picked_rows(rg: int) -> tuple[pa.Table, np.ndarray] | None:
        """Row group rg's selected rows, grouped by bucket, and the bucket boundaries."""
        a, b = np.searchsorted(rows_sorted, starts[rg : rg + 2])
        if a == b:
            return None
        picked = by_row[a:b]
        bucket = sel.position[picked] // bucket_rows
        order = np.argsort(bucket, kind="stable")
        picked, bucket = picked[order], bucket[order]
        # a reader per call: two loads run at once, and one parquet reader is not meant to be shared
        rows = pq.ParquetFile(manifest, metadata=pf.metadata).read_row_group(rg).take(pa.array(sel.row[picked] - starts[rg]))
        return _with_mix_columns(rows, sel, picked, shard_size).cast(target), np.searchsorted(bucket, np.arange(n_buckets + 1))

    for _, result in ahead(picked_rows, range(pf.num_row_groups), depth=2):
        if result is not None:
            part, bounds = result
            for k in np.flatnonzero(np.diff(bounds)):
                writers[k].write_table(part.slice(bounds[k], bounds[k + 1] - bounds[k]))
    for w in writers:
        w.close()
    return paths


def _sorted_bucket(path: Path) -> pa.Table:
    """Pass 2's input: one spilled bucket, in mix_position order."""
    with pa.OSFile(str(path)) as source:
        part = pa.ipc.open_file(source).read_all()
    return part.take(pa.array(np.argsort(part["mix_position"].to_numpy(), kind="stable")))


def _with_mix_columns(rows: pa.Table, sel: Selection, picked: np.ndarray, shard_size: int) -> pa.Table:
    """Append mix_key (uid, or uid-<repeat> in a repeated domain), mix_repeat, mix_position, mix_shard."""
    repeat = pa.array(sel.repeat[picked], pa.int32())
    position = sel.position[picked]
    suffixed = pc.binary_join_element_wise(rows["uid"], repeat.cast(pa.string()), "-")
    key = pc.if_else(pa.array(sel.repeated[picked]), suffixed, rows["uid"])
    return (rows.append_column("mix_key", key).append_column("mix_repeat", repeat)
            .append_column("mix_position", pa.array(position, pa.int64()))
            .append_column("mix_shard", pa.array(position // shard_size, pa.int64())))


def run_mix(
    build_dir: Path, spec: MixSpec, recipe_hash: str | None = None, workers: int = 1,
    resources: ResourcesConfig | None = None, force: bool = False, console: Console | None = None,
) -> Path:
    """Select, shard and document one mix of a built manifest; return BUILD/mixes/<name>/.

    Resumable and self-repairing: the selection, each shard and the final files are separate atomic
    steps whose markers record the fingerprint of the build manifest and the spec and the size and
    sha256 of what they wrote, so a rerun redoes exactly what is missing or no longer matches (an
    interrupted run, a deleted or truncated shard, an edited dataset.json) and ends byte-identical.
    A mix dir holding another spec's or another manifest's mix is refused unless `force`.
    `recipe_hash` defaults to the build's (recipe.lock.yaml). One process per mix dir (a lock).
    """
    build_dir = Path(build_dir)
    manifest = build_dir / "manifest.parquet"
    if not manifest.is_file():
        raise PlantmixError(f"{manifest}: not found; run `plantmix build` first")
    # a broken build is refused before anything is written (the lock creates the mix dir)
    require_columns(manifest, ["uid", "domain", "source", "keep", *(f"taxon_{rank}" for rank, _ in spec.caps())])
    recipe_hash = recipe_hash if recipe_hash is not None else build_recipe_hash(build_dir)
    resources = resources or build_resources(build_dir)
    mix_dir = build_dir / "mixes" / spec.resolved_name()
    with directory_lock(mix_dir, "plantmix mix"):
        remove_stale_temporaries(mix_dir)
        for spill in mix_dir.glob(".spill-*"):  # a killed run's spill files: under the lock, nobody else's
            shutil.rmtree(spill, ignore_errors=True)
        return _run_mix_locked(build_dir, mix_dir, spec, recipe_hash, workers, resources, force, console)


def _run_mix_locked(
    build_dir: Path, mix_dir: Path, spec: MixSpec, recipe_hash: str | None, workers: int,
    resources: ResourcesConfig, force: bool, console: Console | None,
) -> Path:
    from plantmix.mix.card import write_card
    from plantmix.mix.shards import write_shards

    manifest = build_dir / "manifest.parquet"
    manifest_fp, select_key, final_key = mix_keys(build_dir, spec, recipe_hash)
    damage = mix_damage(mix_dir, select_key, final_key)
    if not damage:
        return mix_dir
    check_same_mix(mix_dir, spec, manifest_fp, force)
    if console is not None and read_marker(mix_dir / "dataset.json") is not None:
        console.print(f"  {mix_dir.name}: redoing {'; '.join(damage[:4])}{' …' if len(damage) > 4 else ''}", highlight=False)
    mix_manifest = mix_dir / "manifest.parquet"
    if not output_intact(mix_manifest, select_key):
        sel = select(read_selection_columns(manifest, spec), spec, where=str(manifest))
        write_mix_manifest(manifest, sel, mix_manifest, spec.shard_size, resources)
        mark_done(mix_manifest, select_key, rows=len(sel), available=sel.available, spec=spec.model_dump(mode="json"),
                  manifest_fingerprint=manifest_fp, file=file_record(mix_manifest))  # fmt: skip
    info = write_shards(build_dir, mix_dir, spec, select_key=select_key, recipe_hash=recipe_hash,
                        manifest_fingerprint=manifest_fp, workers=workers)  # fmt: skip
    write_card(build_dir, mix_dir)
    small = {name: file_record(mix_dir / name) for name in _documents(mix_dir)}
    mark_done(mix_dir / "dataset.json", final_key, file=small.pop("dataset.json"), files=small,
              shards=info["num_shards"], spec=spec.model_dump(mode="json"), recipe_hash=recipe_hash,
              manifest_fingerprint=manifest_fp)  # fmt: skip
    return mix_dir


def mix_keys(build_dir: Path, spec: MixSpec, recipe_hash: str | None) -> tuple[str, str, str]:
    """(build manifest fingerprint, selection fingerprint, final fingerprint) of a mix."""
    manifest = Path(build_dir) / "manifest.parquet"
    manifest_fp = fingerprint({}, [manifest])
    select_key = fingerprint({"stage": "mix", "version": _MIX_VERSION, "spec": spec.model_dump(mode="json")}, [manifest])
    return manifest_fp, select_key, fingerprint({"select": select_key, "recipe_hash": recipe_hash})


def mix_is_current(build_dir: Path, spec: MixSpec, recipe_hash: str | None) -> bool:
    """Whether a rerun of this mix would do nothing: finished with these inputs, and intact."""
    _, select_key, final_key = mix_keys(build_dir, spec, recipe_hash)
    return not mix_damage(Path(build_dir) / "mixes" / spec.resolved_name(), select_key, final_key)


def _documents(mix_dir: Path) -> list[str]:
    """The small files of a finished mix, relative to it: dataset.json, the card and its plots, sizes.json."""
    top = [p.name for p in sorted(mix_dir.iterdir()) if p.is_file() and not p.name.startswith(".")
           and not p.name.endswith(".done.json") and p.name not in ("manifest.parquet", "source_index.parquet")]
    return top + ["shards/sizes.json"]


def mix_damage(mix_dir: Path, select_key: str, final_key: str) -> list[str]:
    """What of a mix is missing or no longer matches its markers (empty: finished and intact)."""
    from plantmix.mix.shards import shard_intact, shard_stem

    final = read_marker(mix_dir / "dataset.json")
    if final is None or final.get("key") != final_key:
        return ["everything (not finished with these inputs)"]
    damage = [name for name in ("manifest.parquet", "source_index.parquet") if not output_intact(mix_dir / name, select_key)]
    if not output_intact(mix_dir / "dataset.json", final_key):
        damage.append("dataset.json")
    marker = done_marker(mix_dir / "dataset.json")
    damage += [name for name, rec in (final.get("files") or {}).items() if not record_matches(mix_dir / name, rec, marker)]
    shards = final.get("shards")
    if not isinstance(shards, int):
        return damage + ["shard list"]
    return damage + [f"shards/{shard_stem(i)}.tar" for i in range(shards) if not shard_intact(mix_dir / "shards", select_key, i)]


def previous_mix(mix_dir: Path) -> dict | None:
    """What an existing mix dir was made with (spec, manifest_fingerprint, recipe_hash), from its
    final marker, else its dataset.json, else its selection's marker; None when nothing is there."""
    for found in (read_marker(mix_dir / "dataset.json"), read_json_object(mix_dir / "dataset.json"), read_marker(mix_dir / "manifest.parquet")):
        if isinstance(found, dict) and isinstance(found.get("spec"), dict):
            return found
    return None


def check_same_mix(mix_dir: Path, spec: MixSpec, manifest_fp: str, force: bool) -> None:
    """Refuse to replace a mix made with another spec or from another build manifest, unless `force`."""
    previous = previous_mix(mix_dir)
    if previous is None or force:
        return
    mine = spec.model_dump(mode="json")
    changed = [f"{k} {previous['spec'].get(k)!r} → {mine.get(k)!r}" for k in sorted(set(mine) | set(previous["spec"]))
               if previous["spec"].get(k) != mine.get(k)]  # fmt: skip
    if previous.get("manifest_fingerprint") not in (None, manifest_fp):
        changed.append("the build manifest changed since (the build was rerun)")
    if changed:
        raise PlantmixError(
            f"{mix_dir}: a mix named '{mix_dir.name}' exists with other inputs ({'; '.join(changed)}); "
            "pass --force to replace it, or choose another --name"
        )


def repair_mix(shards_dir: Path, workers: int = 1, console: Console | None = None) -> VerifyReport:
    """`plantmix verify --repair`: redo what the markers show missing or changed (run_mix with the
    options the mix was made with), re-read every shard, rewrite those that fail; the final report.

    Refused when the build manifest changed since the mix was made: the original cannot be rebuilt."""
    shards_dir = Path(shards_dir)
    mix_dir = shards_dir.parent
    build_dir = mix_dir.parent.parent
    if mix_dir.parent.name != "mixes" or not (build_dir / "manifest.parquet").is_file():
        raise PlantmixError(f"{shards_dir}: --repair needs a mix inside its build (BUILD/mixes/NAME/shards)")
    previous = previous_mix(mix_dir)
    if previous is None:
        raise PlantmixError(f"{mix_dir}: no record of the options this mix was made with; rerun `plantmix mix` with them")
    spec = MixSpec.model_validate(previous["spec"])
    if spec.resolved_name() != mix_dir.name:
        raise PlantmixError(f"{mix_dir}: was made as '{spec.resolved_name()}' and renamed; repair it under that name")

    def redo() -> VerifyReport:
        run_mix(build_dir, spec, recipe_hash=previous.get("recipe_hash"), workers=workers, console=console)
        return verify_shards(shards_dir, workers=workers)

    report = redo()
    if not report.ok:  # damage the markers could not see (same size, same mtime): rewrite what fails
        for check in report.shards:
            if not check.ok:
                clear_done(shards_dir / check.shard)
        report = redo()
    return report


def build_recipe_hash(build_dir: Path) -> str | None:
    """The hash of the recipe a build was made with (None when it has no recipe.lock.yaml)."""
    from plantmix.build import read_lock

    if not (Path(build_dir) / "recipe.lock.yaml").exists():
        return None
    return read_lock(build_dir).get("recipe_hash")


def build_resources(build_dir: Path) -> ResourcesConfig:
    """The `resources:` of the recipe a build was made with (defaults when it has no lock file)."""
    from plantmix.build import read_lock

    if not (Path(build_dir) / "recipe.lock.yaml").exists():
        return ResourcesConfig()
    return ResourcesConfig.model_validate(read_lock(build_dir).get("recipe", {}).get("resources", {}))
