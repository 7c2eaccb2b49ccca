"""`plantmix split BUILD`: set part of a build aside as an ImageFolder evaluation set, and keep it out of
every later mix of that build.

Held-out rows are chosen by a seeded hash (the mixing hash, `plantmix.mix.select`), so the same
command gives the same split anywhere: `--by species` holds out a fraction of the species with all
their images (zero-shot on unseen species), `--by image` a fraction of each species' images (seen
species, unseen images; a species with one image stays in training). The split writes the kept
images to EVAL_DIR/<species folder>/<uid>.<ext> with `classnames.json`, and a proposal
`proposals/held_out/<name>.parquet` listing the held-out rows and every row of their duplicate groups;
the decision step then gives them `held_out` (counted in the funnel) and rewrites the manifest, so a
mix made afterwards cannot contain an evaluation image or a copy of one.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plantmix.core.errors import PlantmixError
from plantmix.core.lock import directory_lock
from plantmix.core.schema import species_folder
from plantmix.core.stage import atomic_path, write_parquet
from plantmix.mix.select import fnv1a64, selection_keys

HELD_OUT_SCHEMA = pa.schema([pa.field("uid", pa.string()), pa.field("split", pa.string()), pa.field("role", pa.string())])
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def choose_held_out(manifest: pa.Table, by: Literal["species", "image"], fraction: float, seed: int) -> pa.Table:
    """The kept rows with a species that the split holds out: (uid, taxon_species)."""
    if not 0 < fraction < 1:
        raise PlantmixError(f"--fraction must be within (0, 1); got {fraction}")
    kept = manifest.filter(pc.and_(manifest["keep"], pc.is_valid(manifest["taxon_species"])))
    kept = kept.select(["uid", "taxon_species"])
    if not kept.num_rows:
        raise PlantmixError("split: the build has no kept rows with a species (taxon_species) to hold out")
    if by == "species":
        species = pc.unique(kept["taxon_species"]).sort()
        order = np.argsort(selection_keys(fnv1a64(species), seed), kind="stable")[::-1]
        n = max(1, round(fraction * len(species)))
        if n >= len(species):
            raise PlantmixError(f"split: --fraction {fraction} of {len(species)} species would hold out every species")
        chosen = species.take(pa.array(order[:n]))
        return kept.filter(pc.is_in(kept["taxon_species"], value_set=chosen))
    keys = selection_keys(fnv1a64(kept["uid"]), seed)
    con = duckdb.connect()
    con.register("k", kept.append_column("k", pa.array(keys)))
    return con.execute(
        """SELECT uid, taxon_species FROM (
             SELECT *, row_number() OVER (PARTITION BY taxon_species ORDER BY k DESC, uid) AS i,
                    count(*) OVER (PARTITION BY taxon_species) AS n FROM k)
           WHERE n > 1 AND i <= greatest(1, least(n - 1, round(? * n)))""",
        [fraction],
    ).to_arrow_table()


def split_build(build_dir: Path, by: Literal["species", "image"], fraction: float, seed: int, out_dir: Path,
                name: str | None = None) -> dict:
    """Write the evaluation set and the held-out proposal, then re-decide the build; returns a summary."""
    build_dir, out_dir = Path(build_dir), Path(out_dir)
    manifest_path = build_dir / "manifest.parquet"
    if not manifest_path.is_file():
        raise PlantmixError(f"{manifest_path}: not found; run `plantmix build` first")
    name = name or f"{by}-f{fraction:g}-s{seed}"
    if not _NAME.match(name):
        raise PlantmixError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PlantmixError(f"--out {out_dir}: exists and is not an empty directory")
    with directory_lock(build_dir, "plantmix command"):
        return _split_locked(build_dir, manifest_path, by, fraction, seed, out_dir, name)


def _split_locked(build_dir: Path, manifest_path: Path, by, fraction: float, seed: int, out_dir: Path, name: str) -> dict:
    from plantmix.build import lock_recipe
    from plantmix.report import REPORT_COLUMNS, load_manifest

    lock_recipe(build_dir)  # the re-decision needs the build's recipe: refuse before writing anything
    manifest = load_manifest(build_dir, (*REPORT_COLUMNS, "dup_of", "taxon_species", "common_name", "shard", "key"))
    heads = choose_held_out(manifest, by, fraction, seed)
    members = manifest.filter(pc.is_in(manifest["dup_of"], value_set=heads["uid"].combine_chunks())).column("uid")
    proposal = pa.table(
        [pa.concat_arrays([heads["uid"].combine_chunks(), members.combine_chunks()]),
         pa.array([name] * (heads.num_rows + len(members)), pa.string()),
         pa.array(["held_out"] * heads.num_rows + ["duplicate_of_held_out"] * len(members), pa.string())],
        schema=HELD_OUT_SCHEMA,
    )  # fmt: skip
    images = _write_image_folder(build_dir, manifest, heads, out_dir)
    write_parquet(proposal, build_dir / "proposals" / "held_out" / f"{name}.parquet")
    redecide(build_dir)
    summary = {
        "split": name, "build": str(build_dir), "by": by, "fraction": fraction, "seed": seed,
        "species": len(pc.unique(heads["taxon_species"])), "images": images, "duplicates_excluded": len(members),
    }  # fmt: skip
    (out_dir / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _write_image_folder(build_dir: Path, manifest: pa.Table, heads: pa.Table, out_dir: Path) -> int:
    from plantmix.mix.shards import read_images, scan_tar

    rows = manifest.filter(pc.is_in(manifest["uid"], value_set=heads["uid"].combine_chunks()))
    rows = rows.select(["uid", "taxon_species", "common_name", "shard", "key"]).to_pylist()
    located = {}
    for tar in sorted({r["shard"] for r in rows}):
        members = scan_tar(build_dir / tar)
        located.update({(tar, k): v for k, v in members.items()})
    hits = [located.get((r["shard"], r["key"])) for r in rows]
    if None in hits:
        raise PlantmixError(f"split: {hits.count(None)} held-out image(s) missing from the download shards")
    data = read_images(build_dir, [r["shard"] for r in rows], np.array([h[0] for h in hits]), np.array([h[1] for h in hits]))
    names: dict[str, dict] = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for r, (_, _, ext), image in zip(rows, hits, data):
            folder = species_folder(r["taxon_species"])
            names[folder] = {"scientific": r["taxon_species"], **({"common": r["common_name"]} if r["common_name"] else {})}
            (tmp / folder).mkdir(exist_ok=True)
            (tmp / folder / f"{r['uid']}.{ext}").write_bytes(image)
        (tmp / "classnames.json").write_text(json.dumps(dict(sorted(names.items())), indent=1, ensure_ascii=False) + "\n")
    return len(rows)


def read_held_out(held_dir: Path) -> pa.Table | None:
    """Every held-out proposal of a build (all splits), or None when there is none."""
    files = sorted(Path(held_dir).glob("*.parquet")) if Path(held_dir).is_dir() else []
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def check_held_out(held: pa.Table | None, uids: pa.ChunkedArray, held_dir: Path) -> None:
    """Refuse held-out proposals that name rows the build no longer has: after a change of the rows'
    uids (a newer ingest) the same images would come back unmarked and leak into the mixes."""
    if held is None or not held.num_rows:
        return
    missing = held.num_rows - (pc.sum(pc.is_in(held["uid"], value_set=uids.combine_chunks())).as_py() or 0)
    if missing:
        raise PlantmixError(
            f"{held_dir}: {missing:,} held-out row(s) are not rows of this build (their uids changed, e.g. by a "
            f"newer ingest, or their source was removed); delete {held_dir} and rerun `plantmix split`"
        )


def redecide(build_dir: Path) -> None:
    """Rerun the decide and report stages of a build (its recipe from recipe.lock.yaml)."""
    from plantmix.build import BuildContext, build_stages, lock_recipe
    from plantmix.core.stage import run_stage
    from plantmix.report import make_console

    recipe = lock_recipe(build_dir)
    with contextlib.ExitStack() as stack:
        ctx = BuildContext(recipe, Path(build_dir), Path(build_dir), None, make_console(stderr=True), stack)
        for stage in build_stages(ctx):
            if stage.name in ("decide", "report"):
                run_stage(stage)
