"""The `plantmix` command line: a thin layer over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from plantmix.core.errors import PlantmixError

app = typer.Typer(
    name="plantmix",
    help="Build plant/general image-text datasets: ingest, download, dedup, filter, mix and shard.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich markup would eat every "[default: ...]" of our help texts
)
console = Console(stderr=True)


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see pipelines/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Build directory [default: builds/<recipe name>]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe and print the plan; touch nothing."),
    distributor: Optional[str] = typer.Option(
        None, "--distributor", help="img2dataset distributor: multiprocessing or pyspark [default: the recipe's download.distributor]."
    ),
    until: Optional[str] = typer.Option(
        None, "--until", help="Stop after this stage: ingest, download, hashes, embed, join, filter, dedup, score, decide, report, mix (embed and score exist only when the recipe has a scorer / model-based checks) [default: run them all]."
    ),
) -> None:
    """Run a recipe end to end. Finished stages are skipped; an interrupted build resumes."""
    from plantmix.core.recipe import load_recipe

    r = load_recipe(recipe)
    if dry_run:
        from plantmix.plan import print_plan

        print_plan(r, recipe_path=recipe)
        return
    from plantmix.build import run_build

    run_build(r, out or Path("builds") / r.name, distributor=distributor, until=until, recipe_path=recipe)


@app.command()
def stats(build_dir: Path = typer.Argument(..., help="A build directory.")) -> None:
    """Print the funnel (rows in, drops by reason, kept) and write PNG plots to BUILD/reports/."""
    from plantmix.report import write_stats

    write_stats(build_dir)


@app.command()
def mix(
    build_dir: Path = typer.Argument(..., help="A build directory (with manifest.parquet)."),
    ratio: Optional[str] = typer.Option(
        None, "--ratio", help="Plant share r: round(r*total) plant rows. A comma list (0.1,0.3,0.5) writes one nested mix per ratio."
    ),
    total: Optional[int] = typer.Option(None, "--total", help="Rows in the mix (with --ratio)."),
    plant: Optional[int] = typer.Option(None, "--plant", help="Absolute plant rows (instead of --ratio/--total)."),
    general: Optional[int] = typer.Option(None, "--general", help="Absolute general rows."),
    seed: int = typer.Option(0, "--seed", help="Selection and shuffle seed."),
    name: Optional[str] = typer.Option(None, "--name", help="Mix name [default: from ratio/total/seed]."),
    per_taxon_cap: Optional[int] = typer.Option(None, "--per-taxon-cap", help="At most K rows per species [default: no cap]."),
    per_genus_cap: Optional[int] = typer.Option(None, "--per-genus-cap", help="At most K rows per genus [default: no cap]."),
    per_family_cap: Optional[int] = typer.Option(None, "--per-family-cap", help="At most K rows per family [default: no cap]."),
    source_weight: list[str] = typer.Option([], "--source-weight", help="SRC=W: sampling weight of a source within its domain (repeatable) [default: 1 for every source]."),
    allow_repeat: bool = typer.Option(False, "--allow-repeat", help="Repeat rows (keys uid-0, uid-1, ...) when a domain falls short."),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Samples per output shard."),
    caption_field: str = typer.Option("caption", "--caption-field", help="Manifest column written as <key>.txt."),
    workers: int = typer.Option(1, "--workers", help="Processes for indexing and shard writing."),
    max_epochs: Optional[float] = typer.Option(
        None, "--max-epochs", help="Ratio grids: most passes over a domain's pool with --allow-repeat [default: 15]."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing mix of this name made with other options or from an older build manifest."
    ),
) -> None:
    """Select a plant/general mix (hash-ordered, nested across sizes) and write shuffled webdataset shards.

    Rerunning a finished mix checks it first and redoes only what is missing or damaged."""
    from plantmix.mix.spec import make_spec
    from plantmix.mix.run import run_mix

    if ratio is not None and "," in ratio:
        _mix_grid(build_dir, ratio, total, name, max_epochs, workers, seed=seed,
                  per_taxon_cap=per_taxon_cap, per_genus_cap=per_genus_cap, per_family_cap=per_family_cap,
                  source_weights=source_weight, allow_repeat=allow_repeat, shard_size=shard_size,
                  caption_field=caption_field, plant=plant, general=general, force=force)  # fmt: skip
        return
    if ratio is not None:
        from plantmix.mix.grid import parse_ratios

        ratio = parse_ratios(ratio)[0]
    spec = make_spec(
        ratio=ratio, total=total, plant=plant, general=general, seed=seed, name=name,
        per_taxon_cap=per_taxon_cap, per_genus_cap=per_genus_cap, per_family_cap=per_family_cap,
        source_weights=source_weight, allow_repeat=allow_repeat, shard_size=shard_size,
        caption_field=caption_field,
    )  # fmt: skip
    out = run_mix(build_dir, spec, workers=workers, force=force, console=console)
    console.print(f"[green]✓[/] mix → {out}", highlight=False)


def _mix_grid(build_dir: Path, ratios: str, total: Optional[int], prefix: Optional[str], max_epochs: Optional[float],
              workers: int, plant: Optional[int], general: Optional[int], **options) -> None:
    from plantmix.mix.grid import parse_ratios, run_grid

    if plant is not None or general is not None:
        raise PlantmixError("a ratio grid takes --ratio and --total, not --plant / --general")
    if total is None:
        raise PlantmixError("a ratio grid needs --total")
    for out in run_grid(build_dir, parse_ratios(ratios), total, prefix, max_epochs, workers, **options):
        console.print(f"[green]✓[/] mix → {out}", highlight=False)


@app.command()
def split(
    build_dir: Path = typer.Argument(..., help="A build directory (after `plantmix build`)."),
    by: str = typer.Option("species", "--by", help="species: hold out whole species; image: part of each species' images."),
    fraction: float = typer.Option(..., "--fraction", help="Share of the species (or of each species' images) to hold out, in (0, 1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the hash that picks the held-out rows."),
    out: Path = typer.Option(..., "--out", help="Evaluation set to write: an ImageFolder with classnames.json (must not exist or be empty)."),
    name: Optional[str] = typer.Option(None, "--name", help="Split name [default: <by>-f<fraction>-s<seed>]."),
) -> None:
    """Hold out an evaluation set from a build: writes it as an ImageFolder and marks its rows (and
    their duplicates) `held_out` in the manifest, so later mixes of the build exclude them."""
    from plantmix.curate.split import split_build

    if by not in ("species", "image"):
        raise PlantmixError(f"--by must be species or image; got {by!r}")
    s = split_build(build_dir, by, fraction, seed, out, name)
    console.print(
        f"[green]✓[/] split {s['split']}: {s['images']:,} images of {s['species']:,} species → {out}; "
        f"{s['duplicates_excluded']:,} duplicates of them also excluded from mixes", highlight=False,
    )


@app.command("dedup-report")
def dedup_report(
    build_dir: Path = typer.Argument(..., help="A build directory (after `plantmix build`)."),
    radius: str = typer.Option("4,6,8,10,12", "--radius", help="Comma-separated pHash radii to sweep."),
    groups: int = typer.Option(8, "--groups", min=1, help="Largest duplicate groups on the contact sheet."),
) -> None:
    """Radius sweep (rows merged per radius, decisions recomputed in memory, nothing rebuilt), the
    nearest-neighbour pHash distance histogram and a contact sheet of the largest duplicate groups,
    in BUILD/reports/dedup/."""
    from plantmix.build import lock_recipe
    from plantmix.curate.dedup_report import write_dedup_report

    try:
        radii = [int(r) for r in radius.split(",") if r.strip()]
    except ValueError:
        raise PlantmixError(f"--radius expects comma-separated integers like 4,6,8; got {radius!r}") from None
    recipe = lock_recipe(build_dir)
    priority = {s.name: s.priority for s in recipe.sources}
    out = write_dedup_report(build_dir, radii, recipe.dedup, priority, groups)
    import pyarrow.csv as pacsv

    sweep = pacsv.read_csv(out / "radius_sweep.csv").to_pylist()
    for row in sweep:
        console.print(
            f"radius {row['radius']:>2}: {row['duplicate_near']:,} near + {row['duplicate_exact']:,} exact merged, "
            f"{row['kept']:,} kept", highlight=False,
        )
    console.print(f"[green]✓[/] {out}/: radius_sweep.csv, radius_sweep.png, nearest_distance.png, groups.png", highlight=False)


@app.command()
def contamination(
    target: Path = typer.Argument(..., help="A build directory, a mix directory (BUILD/mixes/NAME) or a manifest parquet."),
    against: list[Path] = typer.Option(..., "--against", help="Evaluation image folder (class subfolders allowed); repeatable."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for exclude.parquet and report.csv."),
    scorer: Optional[str] = typer.Option(
        None, "--scorer", help="Scorer model for embedding matches (open_clip:ARCH/TAG, open_clip:ARCH//path, or a dalip export dir); default: the build's own scorer."
    ),
    phash_radius: int = typer.Option(10, "--phash-radius", help="Largest pHash Hamming distance (mirror images included) that counts as a copy."),
    embedding_cosine: Optional[float] = typer.Option(
        0.95, "--embedding-cosine", help="Smallest image-embedding cosine that counts as a copy (needs a scorer; otherwise hashes only)."
    ),
    hashes_only: bool = typer.Option(False, "--hashes-only", help="Skip embedding matches even when a scorer is available."),
) -> None:
    """Find rows that copy an evaluation image (exact sha256, pHash within the radius, embedding cosine):
    writes OUT/exclude.parquet (uid, eval_set, match, eval_file) and OUT/report.csv (counts per eval set)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from plantmix.curate.decontaminate import check_contamination

    with Progress(TextColumn("encode rows (tars)"), BarColumn(), MofNCompleteColumn(), console=console, transient=True) as bar:
        task = bar.add_task("encode", total=None)
        path, report = check_contamination(
            target, against, out, scorer, phash_radius, None if hashes_only else embedding_cosine,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    for r in report:
        console.print(
            f"{r['eval_set']}: {r['rows_matched']:,} rows copy {r['eval_images_matched']:,} of {r['eval_images']:,} eval images "
            f"(exact {r['exact']:,}, pHash {r['phash']:,}, embedding {r['embedding']:,})", highlight=False,
        )
    console.print(f"[green]✓[/] {path}/: exclude.parquet, report.csv", highlight=False)


@app.command()
def verify(
    shards_dir: Path = typer.Argument(..., help="A mix's shards directory (BUILD/mixes/NAME/shards)."),
    workers: int = typer.Option(1, "--workers", help="Processes reading shards."),
    repair: bool = typer.Option(
        False, "--repair", help="Rewrite what is missing or fails the check (shards, dataset.json, card) from the build, then check again."
    ),
) -> None:
    """Re-read every shard: counts against dataset.json, every image decodes, image sha256 against
    the shard's parquet (the hash of the bytes as written to the shard, not the manifest's sha256 of
    the originally downloaded bytes, which img2dataset may have resized or re-encoded). Exits 1 on
    any mismatch (after --repair: on any that remains)."""
    from plantmix.mix.verify import print_report, verify_shards

    if repair:
        from plantmix.mix.run import repair_mix

        report = repair_mix(shards_dir, workers=workers, console=console)
    else:
        report = verify_shards(shards_dir, workers=workers)
    print_report(report, Console())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def mine(
    build_dir: Path = typer.Argument(..., help="A build directory whose embed stage has run (a recipe with `scorer`)."),
    pool: str = typer.Option(..., "--pool", help="The source to mine: its embeddings (BUILD/embeddings/POOL) are indexed."),
    queries: str = typer.Option(
        "plant-prompts", "--queries",
        help="plant-prompts (the recipe's plant prompts plus caption templates of the build's plant taxa), or an image folder.",
    ),
    k: int = typer.Option(100, "--k", help="Neighbours retrieved per query."),
    min_score: float = typer.Option(0.25, "--min-score", help="Keep pool images whose best query cosine is at least this."),
    out: Path = typer.Option(..., "--out", help="The URL list to write (parquet: url, caption, uid, mined_from, mine_score, query, taxa)."),
    scorer: Optional[str] = typer.Option(
        None, "--scorer", help="Encode queries with this model instead of the one recorded in BUILD/embeddings/scorer.json."
    ),
    combine: str = typer.Option(
        "best", "--combine", help="best: each query searches, a pool image keeps its best; mean: one query, the mean of them all."
    ),
) -> None:
    """Find images of a pool source near plant queries (clip-retrieval index + kNN); write a URL list a
    recipe can read as a `url_list` source."""
    from plantmix.embed.mine import mine as run_mine

    with console.status(f"mining {pool}: index, encode queries, search"):
        table = run_mine(build_dir, pool, queries, k, min_score, out, scorer_model=scorer, combine=combine)
    console.print(f"[green]✓[/] {table.num_rows:,} rows from {pool} → {out}", highlight=False)


@app.command()
def ablate(
    recipe: Path = typer.Argument(..., help="A recipe with an `ablation:` section, or an ablation-only YAML."),
    build_dir: Optional[Path] = typer.Option(None, "--build", help="Build directory [default: ablation.build, else builds/<recipe name>]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (runs, samples seen, GPU-hours); touch nothing."),
) -> None:
    """Mixing-law ablation: ratio grid → mixes → proxy dalip runs → per-domain eval → fit → suggest →
    confirmation run, into BUILD/ablations/<name>/. Rerunning resumes: finished runs are not redone."""
    from plantmix.ablate import load_ablation, resolve_build_dir, run_ablation

    cfg, r = load_ablation(recipe)
    if dry_run:
        from plantmix.plan import print_ablation_plan

        print_ablation_plan(cfg)
        return
    summary = run_ablation(cfg, resolve_build_dir(cfg, r, build_dir), r, console)
    console.print(f"[green]✓[/] {summary['report']}", highlight=False)


mixlaw_app = typer.Typer(
    help="Data mixing laws: fit L(r) = c + k*exp(t*r) per validation domain, suggest the plant share r*.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(mixlaw_app, name="mixlaw")


@mixlaw_app.command("fit")
def mixlaw_fit(
    points: Path = typer.Argument(..., help="csv/parquet with columns ratio, domain, loss (optional: seed, step, metric)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for mixlaw.json and mixlaw.png."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Metric to fit when the points hold several [default: combined]."),
    target_step: Optional[int] = typer.Option(
        None, "--target-step", help="Fit a step law per ratio and the mixing law on its predictions at this step [default: off, the last step of each run]."
    ),
) -> None:
    """Fit the mixing law per domain (two-stage and joint fits, the better on held-out ratios)."""
    from plantmix.mixlaw.run import fit_points_file

    law = fit_points_file(points, out, metric=metric, target_step=target_step)
    for name, f in law.domains.items():
        loo = "n/a" if f.loo_mean_abs_rel_error is None else f"{100 * f.loo_mean_abs_rel_error:.2f} %"
        console.print(f"{name}: L(r) = {f.c:.4g} + {f.k:.4g}·exp({f.t:.4g}·r)  [{f.method}; leave-one-out error {loo}]", markup=False)
    console.print(f"[green]✓[/] {out}/mixlaw.json, {out}/mixlaw.png", highlight=False)


@mixlaw_app.command("suggest")
def mixlaw_suggest(
    law_dir: Path = typer.Argument(..., help="Directory with mixlaw.json (from `plantmix mixlaw fit`)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Minimise the weighted sum, e.g. plant=0.5,general=0.5."),
    general_tolerance: Optional[float] = typer.Option(
        None, "--general-tolerance", help="Largest r whose general loss stays within this fraction above the reference."
    ),
    reference_ratio: Optional[float] = typer.Option(None, "--reference-ratio", help="Reference: the law's general loss at this r."),
    reference_loss: Optional[float] = typer.Option(None, "--reference-loss", help="Reference: this general loss (e.g. the starting checkpoint's)."),
    plant_pool: Optional[int] = typer.Option(None, "--plant-pool", help="Kept plant rows available [default: from mixlaw.json]."),
    target_total: Optional[int] = typer.Option(None, "--target-total", help="Samples of the target mix [default: from mixlaw.json]."),
    max_epochs: Optional[float] = typer.Option(None, "--max-epochs", help="Most passes over the plant pool [default: 15]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file [default: DIR/suggest.json]."),
) -> None:
    """Suggest r*, bounded by the plant pool's repeat limit; prints it with the predicted losses."""
    from plantmix.mixlaw.fit import MixingLaw
    from plantmix.mixlaw.run import pool_limit, suggest_to_file
    from plantmix.mixlaw.suggest import parse_weights

    pool = pool_limit(MixingLaw.read(law_dir), plant_pool, target_total, max_epochs)
    suggestion, path = suggest_to_file(
        law_dir, parse_weights(weights) if weights is not None else None, general_tolerance,
        reference_ratio, reference_loss, pool, out,
    )  # fmt: skip
    losses = ", ".join(f"{d} {v:.4f}" for d, v in suggestion.predicted.items())
    bound = " (bounded by the plant pool)" if suggestion.bounded_by_pool else ""
    print(f"r* = {suggestion.ratio:.4f}{bound}; predicted loss: {losses}")
    console.print(f"[green]✓[/] {path}", highlight=False)


def main() -> None:
    try:
        app()
    except PlantmixError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
