"""The dataset card of a mix: BUILD/mixes/<name>/README.md plus its PNG plots.

It reports the build's funnel (reusing plantmix.report.funnel), the mix's composition by domain,
source and taxon, the licences of the selected rows, and how the shards were made.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from plantmix.report import funnel, save_figure
from plantmix.core.duck import sql_quote
from plantmix.core.stage import atomic_write_text

TOP_TAXA = 20
_FUNNEL_COLUMNS = ["source", "domain", "input_rows", "keep", "status", "drop_reason"]


def _md_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.1%}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v if v is not None else "(none)").replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _funnel_rows(build_dir: Path) -> list[list]:
    """(stage, reason, plant, general, total) summed over sources."""
    path = build_dir / "manifest.parquet"
    optional = ["routed_from"] if "routed_from" in pq.read_schema(path).names else []  # rows moved by relevance routing
    from plantmix.stages.ingest import over_max_rows

    f = funnel(pq.read_table(path, columns=_FUNNEL_COLUMNS + optional), over_max_rows(build_dir / "candidates.parquet"))
    con = duckdb.connect()
    con.register("f", f)
    return [
        list(r)
        for r in con.execute(
            """SELECT stage, reason, sum(rows) FILTER (WHERE domain = 'plant')::BIGINT,
                      sum(rows) FILTER (WHERE domain = 'general')::BIGINT, sum(rows)::BIGINT
               FROM f GROUP BY 1, 2
               ORDER BY CASE stage WHEN 'in' THEN 0 WHEN 'ingest' THEN 1 WHEN 'download' THEN 2
                        WHEN 'curation' THEN 3 ELSE 4 END, 5 DESC, 2"""
        ).fetchall()
    ]


def write_plots(mix_dir: Path, by_source: list[tuple], taxa: list[tuple]) -> list[Path]:
    """composition.png (samples per source, coloured by domain) and taxa.png (top species)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"plant": "tab:green", "general": "tab:blue"}
    out = []
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(by_source) + 1.5))
    ax.barh([s for s, _, _ in by_source], [n for _, _, n in by_source], color=[colors.get(d, "gray") for _, d, _ in by_source])
    ax.invert_yaxis()
    ax.set(title=f"{mix_dir.name}: samples by source (green plant, blue general)", xlabel="samples")
    out.append(save_figure(fig, mix_dir / "composition.png"))

    fig, ax = plt.subplots(figsize=(6, 0.3 * max(len(taxa), 1) + 1.5))
    if taxa:
        ax.barh([t for t, _ in taxa], [n for _, n in taxa], color="tab:green")
        ax.invert_yaxis()
    ax.set(title=f"{mix_dir.name}: top {len(taxa)} species", xlabel="samples")
    out.append(save_figure(fig, mix_dir / "taxa.png"))
    return out


def write_card(build_dir: Path, mix_dir: Path) -> Path:
    """Write mix_dir/README.md (and its plots) from the build manifest, the mix manifest and dataset.json."""
    build_dir, mix_dir = Path(build_dir), Path(mix_dir)
    info = json.loads((mix_dir / "dataset.json").read_text())
    con = duckdb.connect()
    con.execute(f"CREATE VIEW mix AS SELECT * FROM read_parquet({sql_quote(str(mix_dir / 'manifest.parquet'))})")
    n = info["samples"] or 1
    by_domain = con.execute("SELECT domain, count(*) FROM mix GROUP BY 1 ORDER BY 1 DESC").fetchall()
    by_source = con.execute(
        "SELECT source, domain, count(*) AS n FROM mix GROUP BY 1, 2 ORDER BY 2 DESC, 3 DESC, 1"
    ).fetchall()
    has_species = "taxon_species" in [r[0] for r in con.execute("DESCRIBE mix").fetchall()]
    taxa = (
        con.execute(
            f"""SELECT taxon_species, count(*) FROM mix WHERE taxon_species IS NOT NULL
                GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {TOP_TAXA}"""
        ).fetchall()
        if has_species
        else []
    )
    n_species = con.execute("SELECT count(DISTINCT taxon_species) FROM mix").fetchone()[0] if has_species else 0
    licenses = con.execute(
        """SELECT license, count(*) AS n, string_agg(DISTINCT source, ', ' ORDER BY source)
           FROM mix GROUP BY 1 ORDER BY 2 DESC, 1 NULLS LAST"""
    ).fetchall()
    plots = write_plots(mix_dir, by_source, taxa)

    spec = info["spec"]
    caps = ", ".join(f"{k.replace('per_', '').replace('_cap', '')} ≤ {v}" for k, v in spec.items() if k.endswith("_cap") and v)
    caps = caps.replace("taxon", "species")
    weights = ", ".join(f"{k} = {v:g}" for k, v in sorted(spec["source_weights"].items())) or "none (all 1)"
    last = info["num_shards"] - 1
    req = info["requested"]
    requested = f"{req['plant_rows']:,} plant + {req['general_rows']:,} general"
    if req["ratio"] is not None:
        requested = f"ratio {req['ratio']:g} of {req['total']:,} → {requested}"
    text = f"""# {info['name']}

A plant/general image–text mix built with plantmix: **{info['samples']:,} samples** in
{info['num_shards']} webdataset shards of {info['shard_size']:,}, plant share
{(info['plant_share'] or 0):.4f} (requested: {requested}), seed {info['seed']}.

- recipe hash: `{info['recipe_hash']}` — mix fingerprint: `{info['mix_fingerprint'][:16]}`
- selection: eligible rows (keep = true) ordered by a seeded hash of uid, weighted by source
  (weights: {weights}); per-taxon caps: {caps or 'none'}; repeats allowed: {spec['allow_repeat']}
  ({info['repeated_samples']:,} repeated samples)
- caption written as `<key>.txt`: `{spec['caption_field']}`

## Files

| file | content |
|---|---|
| `shards/NNNNN.tar` | `<key>.jpg` (image bytes as downloaded), `<key>.txt` (caption), `<key>.json` (uid, source, domain, taxonomy, licence, attribution, caption variants) |
| `shards/NNNNN.parquet` | one row per sample of that shard, with the sha256 of the image bytes as written |
| `shards/sizes.json` | samples per shard (read by open_clip) |
| `manifest.parquet` | the selected manifest rows in shard order (`mix_key`, `mix_shard`, `mix_position`) |
| `dataset.json` | counts per domain, source and shard; ratio, seed, recipe hash, package versions |

Train with open_clip: `python -m open_clip_train.main --dataset-type webdataset --train-data
'shards/{{00000..{last:05d}}}.tar' --train-num-samples {info['samples']} ...`; check the shards with
`plantmix verify shards`.

## Funnel of the build

{_md_table(['stage', 'reason', 'plant', 'general', 'total'], _funnel_rows(build_dir))}

## Composition

{_md_table(['domain', 'samples', 'share'], [[d, c, c / n] for d, c in by_domain])}

{_md_table(['source', 'domain', 'samples', 'share'], [[s, d, c, c / n] for s, d, c in by_source])}

![samples by source]({plots[0].name})

### Top taxa

{n_species:,} species in the mix; the {len(taxa)} most frequent:

{_md_table(['species', 'samples'], [list(t) for t in taxa]) if taxa else '(no species recorded)'}

![top species]({plots[1].name})

## Licences

Each sample keeps its source's licence and attribution in `<key>.json`; respect them when you use
or redistribute the images.

{_md_table(['license', 'samples', 'sources'], [list(r) for r in licenses])}
"""
    path = mix_dir / "README.md"
    atomic_write_text(path, text)
    return path
