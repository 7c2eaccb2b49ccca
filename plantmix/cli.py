"""The `plantmix` command line: a thin layer over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from plantmix.errors import PlantmixError

app = typer.Typer(
    name="plantmix",
    help="Build plant/general image-text datasets: ingest, download, dedup, filter, mix and shard.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see pipelines/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Build directory [default: builds/<recipe name>]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe and print the plan; touch nothing."),
    distributor: Optional[str] = typer.Option(
        None, "--distributor", help="img2dataset distributor: multiprocessing or pyspark (overrides the recipe)."
    ),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage (ingest, download, manifest, dedup, filter, mix)."),
) -> None:
    """Run a recipe end to end. Finished stages are skipped; an interrupted build resumes."""
    from plantmix.recipe import load_recipe

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
