"""`plantmix build RECIPE --dry-run`: the plan of a build, from the recipe alone.

Nothing is read but the recipe: no network, no source files. Row counts come from each source's
`expected_rows` (capped by `max_rows`); everything after ingest is an estimate from the stated
assumptions below, which are deliberately round numbers, not measurements of your sources.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from plantmix.report import make_console
from rich.table import Table

from plantmix.build import STAGE_DESCRIPTIONS
from plantmix.core.recipe import Recipe


# Assumptions (stated in the printed plan).
URL_SUCCESS = 0.85  # share of URLs that still download and decode (older crawls lose more)
LOCAL_SUCCESS = 0.99  # local files (image folders, webdataset) that decode
DEDUP_KEEP = 0.95
FILTER_KEEP = 0.93
BITS_PER_PIXEL = {"jpg": 2.0, "webp": 1.2, "png": 12.0}  # at quality ≥ 90
ASPECT_AREA = 0.75  # stored area = image_size² × this (typical 4:3 photos, longest side = image_size)
UNRESIZED_PIXELS = 1024 * 768
SAMPLE_OVERHEAD = 1_500  # bytes per sample for tar headers, .json and .txt
MANIFEST_BYTES_PER_ROW = 400  # zstd parquet
DOWNLOAD_PER_PROCESS = 90  # samples/s per img2dataset process (≈1,400/s on 16 cores, as img2dataset reports)
LOCAL_PER_PROCESS = 150  # samples/s per process to decode, resize and re-encode local images
PHASH_PER_PROCESS = 300  # images/s per process
SHARD_WRITE_BYTES = 150e6  # bytes/s for copying samples into mix shards (one process, local disk)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1000
    raise AssertionError


def _human_time(s: float) -> str:
    if s < 90:
        return f"{s:,.0f} s"
    if s < 5400:
        return f"{s / 60:,.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:,.1f} h"
    return f"{s / 86400:,.1f} days"


def make_plan(recipe: Recipe) -> dict:
    """The plan as data: per-source and per-domain row estimates, mixes, disk and time."""
    dl = recipe.download
    processes = dl.processes_count
    pixels = dl.image_size**2 * ASPECT_AREA if dl.resize_mode != "no" else UNRESIZED_PIXELS
    image_bytes = pixels * BITS_PER_PIXEL[dl.encode_format] / 8

    sources, kept = [], {"plant": 0.0, "general": 0.0}
    for s in recipe.sources:
        rows = s.expected_rows
        if rows is not None and s.max_rows is not None:
            rows = min(rows, s.max_rows)
        success = URL_SUCCESS if s.format == "url_list" else LOCAL_SUCCESS
        stored = rows * success if rows is not None else None
        est_kept = stored * DEDUP_KEEP * FILTER_KEEP if stored is not None else None
        if est_kept is not None:
            kept[s.domain] += est_kept
        sources.append(
            {"name": s.name, "domain": s.domain, "format": s.format, "expected_rows": s.expected_rows,
             "max_rows": s.max_rows, "candidates": rows, "stored": stored, "kept": est_kept,
             "caption": s.caption, "license": s.license, "homepage": s.homepage}
        )  # fmt: skip
    unknown = [s["name"] for s in sources if s["candidates"] is None]

    mixes = []
    for m in recipe.mix or []:
        counts = m.counts()
        short = [d for d, n in counts.items() if n > kept[d] and not unknown]
        mixes.append(
            {"name": m.resolved_name(), "counts": counts, "shards": -(-sum(counts.values()) // m.shard_size),
             "shard_size": m.shard_size, "short": short, "bytes": sum(counts.values()) * (image_bytes + SAMPLE_OVERHEAD)}
        )  # fmt: skip

    candidates = sum(s["candidates"] or 0 for s in sources)
    url_rows = sum(s["candidates"] or 0 for s in sources if s["format"] == "url_list")
    stored = sum(s["stored"] or 0 for s in sources)
    disk = {
        "download": stored * (image_bytes + SAMPLE_OVERHEAD),
        "manifests": 2 * candidates * MANIFEST_BYTES_PER_ROW,
        "mixes": sum(m["bytes"] for m in mixes),
    }
    time = {
        "download": url_rows / (processes * DOWNLOAD_PER_PROCESS) + (candidates - url_rows) / (processes * LOCAL_PER_PROCESS),
        "phash": stored / (processes * PHASH_PER_PROCESS),
        "shards": disk["mixes"] / SHARD_WRITE_BYTES,
    }
    return {
        "recipe": recipe.name, "hash": recipe.hash(), "sources": sources, "unknown_rows": unknown,
        "candidates": candidates, "kept": kept, "mixes": mixes, "image_bytes": image_bytes,
        "disk": disk, "time": time, "processes": processes,
    }  # fmt: skip


def _n(v: float | None) -> str:
    return "?" if v is None else f"{v:,.0f}"


def print_plan(recipe: Recipe, recipe_path: str | Path | None = None, console: Console | None = None) -> dict:
    """Validate-only run: print stages, sources, expected counts, disk and time; touch nothing."""
    console = console or make_console()
    plan = make_plan(recipe)
    dl = recipe.download
    console.rule(f"plan: {recipe.name} ({recipe_path or 'recipe'}), recipe hash {plan['hash']}")
    if recipe.description:
        console.print(recipe.description, highlight=False)

    t = Table(title="Sources (expected rows from the recipe; later columns are estimates)")
    for col in ("source", "domain", "format", "expected\nrows", "max\nrows", "candi-\ndates", "stored\n(est.)", "kept\n(est.)", "caption"):  # fmt: skip
        numeric = "\n" in col
        t.add_column(col, justify="right" if numeric else "left", no_wrap=numeric or col == "source")
    for s in plan["sources"]:
        t.add_row(s["name"], s["domain"], s["format"], _n(s["expected_rows"]), _n(s["max_rows"]), _n(s["candidates"]),
                  _n(s["stored"]), _n(s["kept"]), s["caption"])  # fmt: skip
    console.print(t)
    # Provenance in its own table: licence notes are long and would squeeze the counts above.
    t = Table(title="Provenance")
    for col in ("source", "license", "homepage"):
        t.add_column(col, no_wrap=col == "source")
    for s in plan["sources"]:
        t.add_row(s["name"], s["license"] or "", s["homepage"] or "")
    console.print(t)
    if plan["unknown_rows"]:
        console.print(f"[yellow]no expected_rows for {', '.join(plan['unknown_rows'])}: counts below leave them out[/]")

    t = Table(title="Stages")
    t.add_column("#", justify="right")
    t.add_column("stage")
    t.add_column("what it does")
    for i, (name, what) in enumerate(STAGE_DESCRIPTIONS.items(), 1):
        t.add_row(str(i), name, what)
    console.print(t)

    t = Table(title="Mixes")
    for col in ("mix", "plant", "general", "est. kept plant", "est. kept general", "shards", "status"):
        t.add_column(col, justify="left" if col in ("mix", "status") else "right")
    for m in plan["mixes"]:
        status = f"[red]short of {', '.join(m['short'])} (estimate)[/]" if m["short"] else "[green]ok[/]"
        t.add_row(m["name"], _n(m["counts"]["plant"]), _n(m["counts"]["general"]), _n(plan["kept"]["plant"]),
                  _n(plan["kept"]["general"]), f"{m['shards']:,} × {m['shard_size']:,}", status)  # fmt: skip
    console.print(t)

    t = Table(title="Disk and time (estimates)")
    t.add_column("item")
    t.add_column("estimate", justify="right")
    for k, v in plan["disk"].items():
        t.add_row(f"disk: {k}", _human_bytes(v))
    t.add_row("disk: total", _human_bytes(sum(plan["disk"].values())), style="bold")
    for k, v in plan["time"].items():
        t.add_row(f"time: {k}", _human_time(v))
    t.add_row("time: total", _human_time(sum(plan["time"].values())), style="bold")
    console.print(t)

    console.print(
        "Assumptions: "
        f"{URL_SUCCESS:.0%} of URLs and {LOCAL_SUCCESS:.0%} of local files yield an image; dedup keeps {DEDUP_KEEP:.0%} and "
        f"filters keep {FILTER_KEEP:.0%}; stored images average {ASPECT_AREA:.0%} of {dl.image_size}² px at "
        f"{BITS_PER_PIXEL[dl.encode_format]:g} bits/px ({dl.encode_format}) ≈ {_human_bytes(plan['image_bytes'])}, plus "
        f"{_human_bytes(SAMPLE_OVERHEAD)} per sample for tar headers, JSON and caption; {dl.processes_count} processes "
        f"({dl.distributor}) download {DOWNLOAD_PER_PROCESS} URLs/s or convert {LOCAL_PER_PROCESS} local images/s each "
        f"and hash {PHASH_PER_PROCESS} images/s each, with enough bandwidth; shards are written at "
        f"{_human_bytes(SHARD_WRITE_BYTES)}/s. Manifest stages (DuckDB) take minutes and are left out.",
        highlight=False,
    )
    if recipe.ablation is not None:
        print_ablation_plan(recipe.ablation, console)
    console.print("[dim]dry run: nothing was downloaded, read or written.[/]")
    return plan


def print_ablation_plan(cfg, console: Console | None = None) -> dict:
    """The mixing-law ablation's runs, samples seen and estimated accelerator-hours (plantmix.ablate)."""
    from plantmix.ablate import ablation_plan

    console = console or make_console()
    plan = ablation_plan(cfg)
    t = Table(title=f"Mixing-law ablation '{plan['name']}' (plantmix ablate)")
    t.add_column("item")
    t.add_column("value", justify="right")
    hours = lambda h: "? (needs throughput and batch size)" if h is None else f"{h:,.1f} GPU-h"  # noqa: E731
    for item, value in (
        ("ratios", ", ".join(f"{r:g}" for r in plan["ratios"])), ("seeds", ", ".join(map(str, plan["seeds"]))),
        ("proxy runs", f"{plan['proxy_runs']:,}"), ("confirmation run", f"{plan['confirmation_runs']}"),
        ("model", plan["model"] or "?"), ("steps × batch", f"{plan['steps']:,} × {_n(plan['batch_size'])}"),
        ("samples seen per run", _n(plan["samples_per_run"])), ("mix size", f"{plan['total']:,}"),
        ("epochs of the mix per run", "?" if plan["epochs_per_run"] is None else f"{plan['epochs_per_run']:,.2f}"),
        ("evaluations per run", f"{plan['evaluations_per_run']}"),
        ("estimate per run", hours(plan["hours_per_run"])), ("estimate, all runs", hours(plan["hours_total"])),
    ):  # fmt: skip
        t.add_row(item, value)
    console.print(t)
    if plan["throughput"]:
        console.print(f"Assumption: {plan['throughput']:,.0f} training samples/s per GPU (ablation.throughput); "
                      "evaluation time is left out.", highlight=False)  # fmt: skip
    return plan
