"""The funnel (rows in → drops by reason → kept, per source and domain) and the build's PNG plots."""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from plantmix.core.errors import PlantmixError
from plantmix.core.schema import DROP_DOWNLOAD_FAILED, DROP_OVER_MAX_ROWS
from plantmix.core.stage import require_columns

COLLAPSED = "duplicate_uid_collapsed"


def make_console(stderr: bool = False) -> Console:
    """A console that stays readable in logs: 120 columns when not attached to a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 120)


def funnel(manifest: pa.Table, over_max_rows: pa.Table | None = None) -> pa.Table:
    """Long-form funnel: (source, domain, stage, reason, rows).

    stage is one of `in`, `ingest`, `download`, `curation`, `kept`, and `flag`. Download failures are
    split by img2dataset status; rows collapsed at ingest (same uid within a source) and the rows past a
    source's `max_rows` (`over_max_rows`: (source, domain, rows), from the ingest report) count under
    ingest. For every source, rows `in` = the sum of the stages other than `in` and `flag` — the
    accounting identity tests check. `flag` counts rows in label-conflict groups (kept or not) and rows
    that relevance routing moved to another domain (`routed_to_<domain>`): not drops. `domain` is the
    source's domain: a moved row counts where it came from (`routed_from`).
    """
    con = duckdb.connect()
    con.register("raw", manifest)
    con.register("capped", over_max_rows if over_max_rows is not None else _NO_CAPPED_ROWS)
    conflict = "label_conflict" if "label_conflict" in manifest.column_names else "false"
    routed = "routed_from" in manifest.column_names
    con.execute(
        "CREATE TEMP VIEW m AS SELECT * REPLACE (coalesce(routed_from, domain) AS domain), domain AS routed_to FROM raw"
        if routed else "CREATE TEMP VIEW m AS SELECT *, NULL::VARCHAR AS routed_to, NULL::VARCHAR AS routed_from FROM raw"
    )
    return con.sql(
        f"""
        SELECT source, domain, 'in' AS stage, 'rows read' AS reason, sum(rows) AS rows FROM (
          SELECT source, domain, input_rows AS rows FROM m UNION ALL SELECT source, domain, rows FROM capped
        ) GROUP BY 1, 2
        UNION ALL
        SELECT source, domain, 'ingest', '{COLLAPSED}', sum(input_rows - 1) FROM m GROUP BY 1, 2 HAVING sum(input_rows - 1) > 0
        UNION ALL
        SELECT source, domain, 'ingest', '{DROP_OVER_MAX_ROWS}', sum(rows) FROM capped GROUP BY 1, 2 HAVING sum(rows) > 0
        UNION ALL
        SELECT source, domain, 'ingest', drop_reason, count(*) FROM m
          WHERE NOT keep AND status = 'not_attempted' GROUP BY 1, 2, 4
        UNION ALL
        SELECT source, domain, 'download', status, count(*) FROM m
          WHERE NOT keep AND drop_reason = '{DROP_DOWNLOAD_FAILED}' GROUP BY 1, 2, 4
        UNION ALL
        SELECT source, domain, 'curation', drop_reason, count(*) FROM m
          WHERE NOT keep AND status <> 'not_attempted' AND drop_reason <> '{DROP_DOWNLOAD_FAILED}' GROUP BY 1, 2, 4
        UNION ALL
        SELECT source, domain, 'kept', 'kept', count(*) FILTER (WHERE keep) FROM m GROUP BY 1, 2
        UNION ALL
        SELECT source, domain, 'flag', 'label_conflict', count(*) FROM m WHERE {conflict} GROUP BY 1, 2
        UNION ALL
        SELECT source, domain, 'flag', 'routed_to_' || routed_to, count(*) FROM m WHERE routed_from IS NOT NULL GROUP BY 1, 2, 4
        ORDER BY source, CASE stage WHEN 'in' THEN 0 WHEN 'ingest' THEN 1 WHEN 'download' THEN 2
                 WHEN 'curation' THEN 3 WHEN 'kept' THEN 4 ELSE 5 END, rows DESC, reason
        """
    ).to_arrow_table()


_NO_CAPPED_ROWS = pa.table({"source": pa.array([], pa.string()), "domain": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})


def funnel_table(f: pa.Table, title: str = "Funnel") -> Table:
    """A rich table: one row per (stage, reason), one column per source, plus plant/general/total."""
    rows = f.to_pylist()
    sources = list(dict.fromkeys(r["source"] for r in rows))
    domain_of = {r["source"]: r["domain"] for r in rows}
    order = list(dict.fromkeys((r["stage"], r["reason"]) for r in sorted(rows, key=_stage_rank)))
    counts = {(r["stage"], r["reason"], r["source"]): int(r["rows"]) for r in rows}
    table = Table(title=title, show_lines=False)
    table.add_column("stage", no_wrap=True)
    table.add_column("reason", no_wrap=True)
    for s in sources:
        table.add_column(f"{s}\n({domain_of[s]})", justify="right", overflow="fold")
    for d in ("plant", "general"):
        table.add_column(d, justify="right")
    table.add_column("total", justify="right", style="bold")
    for stage, reason in order:
        vals = [counts.get((stage, reason, s), 0) for s in sources]
        per_domain = [sum(v for v, s in zip(vals, sources) if domain_of[s] == d) for d in ("plant", "general")]
        style = "bold green" if stage == "kept" else ("bold" if stage == "in" else None)
        table.add_row(stage, reason, *[f"{v:,}" for v in vals], *[f"{v:,}" for v in per_domain], f"{sum(vals):,}", style=style)
    return table


def _stage_rank(r: dict) -> tuple:
    return ({"in": 0, "ingest": 1, "download": 2, "curation": 3, "kept": 4, "flag": 5}[r["stage"]], -int(r["rows"]), r["reason"])


def write_plots(manifest: pa.Table, out_dir: Path) -> list[Path]:
    """Image size and caption length histograms, and composition by source and domain (kept rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.register("m", manifest)
    written = []

    sizes = con.execute(
        "SELECT coalesce(original_width, width) w, coalesce(original_height, height) h FROM m WHERE status = 'success'"
    ).fetchnumpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(sizes["w"]):
        ax.hist([sizes["w"], sizes["h"]], bins=40, label=["width", "height"], log=True)
        ax.legend()
    ax.set(title="Downloaded image sizes (original)", xlabel="pixels", ylabel="images")
    written.append(save_figure(fig, out_dir / "image_sizes.png"))

    words = con.execute(
        "SELECT keep, length(string_split(trim(coalesce(caption, '')), ' ')) AS n FROM m WHERE status = 'success'"
    ).fetchnumpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(words["n"]):
        ax.hist([words["n"][words["keep"]], words["n"][~words["keep"]]], bins=30, stacked=True, label=["kept", "dropped"])
        ax.legend()
    ax.set(title="Caption length", xlabel="words", ylabel="rows")
    written.append(save_figure(fig, out_dir / "caption_lengths.png"))

    comp = con.execute(
        "SELECT source, domain, count(*) FILTER (WHERE keep) AS kept FROM m GROUP BY 1, 2 ORDER BY 2 DESC, 1"
    ).fetchall()
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"plant": "tab:green", "general": "tab:blue"}
    ax.barh([c[0] for c in comp], [c[2] for c in comp], color=[colors.get(c[1], "gray") for c in comp])
    ax.set(title="Kept rows by source (green: plant, blue: general)", xlabel="rows")
    written.append(save_figure(fig, out_dir / "composition.png"))
    return written


def save_figure(fig, path: Path) -> Path:
    """Save and close a matplotlib figure as PNG, with no software tag, so reruns give the same bytes."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


# what the funnel and the plots read of a manifest
REPORT_COLUMNS = ("uid", "source", "domain", "input_rows", "keep", "status", "drop_reason", "caption", "width", "height",
                  "original_width", "original_height")  # fmt: skip


def load_manifest(build_dir: Path, required: tuple[str, ...] = REPORT_COLUMNS) -> pa.Table:
    """A build's manifest.parquet, checked to be readable and to have the `required` columns."""
    path = Path(build_dir) / "manifest.parquet"
    if not path.is_file():
        raise PlantmixError(f"{build_dir}: no manifest.parquet (run `plantmix build` first)")
    require_columns(path, required)
    return pq.read_table(path)


LABEL_CONFLICT_COLUMNS = ["group", "uid", "keep", "source", "priority", "taxon_species", "caption", "drop_reason", "dup_distance", "url", "path"]


def label_conflicts(manifest: pa.Table, source_priority: dict[str, int] | None = None) -> pa.Table:
    """One row per member of each label-conflict group (`group` = the kept row's uid), kept row first,
    with `resolved_by`: `source priority` when the kept row's source outranks every member naming
    another species, else `image quality (equal priority): check the labels`."""
    if "label_conflict" not in manifest.column_names:
        return pa.table({c: pa.array([], pa.string()) for c in LABEL_CONFLICT_COLUMNS + ["resolved_by"]})
    con = duckdb.connect()
    con.register("m", manifest)
    prio = pa.table({"source": list((source_priority or {}).keys()), "priority": list((source_priority or {}).values())})
    con.register("prio", prio)
    return con.sql(
        """
        WITH g AS (SELECT coalesce(dup_of, uid) AS "group", m.*, p.priority FROM m LEFT JOIN prio p USING (source)
                   WHERE label_conflict),
             head AS (SELECT "group", priority AS kept_priority, taxon_species AS kept_species FROM g WHERE keep),
             verdict AS (SELECT g."group", bool_and(g.priority < h.kept_priority) FILTER (
                           WHERE g.taxon_species IS DISTINCT FROM h.kept_species AND g.taxon_species IS NOT NULL) AS by_priority
                         FROM g JOIN head h USING ("group") GROUP BY 1)
        SELECT g."group", g.uid, g.keep, g.source, g.priority, g.taxon_species, g.caption, g.drop_reason,
               g.dup_distance, g.url, g.path,
               CASE WHEN v.by_priority THEN 'source priority' ELSE 'image quality (equal priority): check the labels' END
                 AS resolved_by
        FROM g JOIN verdict v USING ("group")
        ORDER BY g."group", g.keep DESC, g.dup_distance NULLS FIRST, g.uid
        """
    ).to_arrow_table()


def write_reports(build_dir: Path, source_priority: dict[str, int] | None = None) -> pa.Table:
    """reports/funnel.csv, reports/label_conflicts.csv and the PNG plots of a build; returns the funnel."""
    import pyarrow.csv as pacsv

    from plantmix.stages.ingest import over_max_rows

    manifest = load_manifest(build_dir)
    reports = Path(build_dir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    f = funnel(manifest, over_max_rows(Path(build_dir) / "candidates.parquet"))
    pacsv.write_csv(f, reports / "funnel.csv")
    pacsv.write_csv(label_conflicts(manifest, source_priority), reports / "label_conflicts.csv")
    write_plots(manifest, reports)
    return f


def write_stats(build_dir: Path, console: Console | None = None) -> pa.Table:
    """Print the funnel of a build and (re)write its reports/ (funnel, label conflicts, PNG plots)."""
    console = console or make_console()
    priority = _priorities(build_dir)
    f = write_reports(build_dir, priority)
    console.print(funnel_table(f, title=f"Funnel — {build_dir}"))
    console.print(f"wrote {Path(build_dir) / 'reports'}/: funnel.csv, label_conflicts.csv, PNG plots")
    return f


def _priorities(build_dir: Path) -> dict[str, int]:
    """Source priorities from the build's lock file (none without one)."""
    from plantmix.build import lock_recipe

    if not (Path(build_dir) / "recipe.lock.yaml").exists():
        return {}
    return {s.name: s.priority for s in lock_recipe(build_dir).sources}
