"""Run one mix: select, write the mix manifest in shard order (plantmix.mix.manifest), shard it, document it."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from plantmix.core.errors import PlantmixError
from plantmix.core.lock import directory_lock
from plantmix.core.recipe import ResourcesConfig
from plantmix.core.stage import (
    clear_done, done_marker, fingerprint, mark_done, read_json_object, remove_stale_temporaries,
    require_columns,
)
from plantmix.mix.manifest import write_mix_manifest
from plantmix.mix.verify import VerifyReport, file_record, output_intact, read_marker, record_matches, verify_shards
from plantmix.mix.select import read_selection_columns, select
from plantmix.mix.spec import MixSpec

_MIX_VERSION = 1  # bump when the selection or the mix manifest layout changes


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
