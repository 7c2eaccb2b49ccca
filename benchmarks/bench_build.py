"""Benchmark the non-network build stages on a synthetic PlantMix-shaped world, against the code of
commit c2d31ad (benchmarks/baseline_c2d31ad.py) in the same run.

    python benchmarks/bench_build.py --rows 13000000 [--baseline-rows 2000000] [--workdir DIR]

The world (built once per N and seed, cached in --workdir): plant URL lists with taxonomy (Zipf over
--species species; captions from the taxonomy templates) and general URL lists with web-like captions,
with planted repeated rows, bad schemes, missing URLs and bad captions (empty, file names, non-Latin,
too short); then simulated img2dataset outputs for every fetchable row — per-shard parquet and
`_stats.json` (statuses, sizes, sha256), and the pHash parquet the hash stage writes — with planted
exact (same sha256) and near (pHash within 3 bits) duplicates. No image bytes.

Stages, each in a fresh child process (peak RSS is per stage; a stage above --rss-limit is stopped
and reported, and the next stage reads its input instead):
  ingest → join → filter → dedup (pair proposals) → decide → mix-select → mix-manifest
and today's code at --baseline-rows (the largest N it handles here): ingest, filter, mix-manifest.
Prints per stage: wall, CPU, peak RSS, rows/s, and the ratio of rows/s against today's.
A final check times the skip decision of a no-op rerun over a --folder-files image folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mix import dict_strings, hex_strings  # noqa: E402

from plantmix.core.recipe import DedupConfig, FilterConfig, Recipe  # noqa: E402
from plantmix.mix.select import splitmix64  # noqa: E402
from plantmix.mix.spec import MixSpec  # noqa: E402

PLANT_SOURCES = {"gbif_plantae_media": 0.40, "plantclef2022_trusted": 0.25, "inat2021_urls": 0.12}
GENERAL_SOURCES = {"cc12m": 0.15, "datacomp_medium": 0.08}
CHUNK = 1_000_000
SHARD_ROWS = 10_000  # img2dataset number_sample_per_shard
ZIPF_EXPONENT = 0.9
FILTERS = FilterConfig(caption_scripts=["LATIN"], caption_max_words=80)
DEDUP = DedupConfig(phash_radius=4, mirror=False)  # the simulated hashes have no mirror pHash; 4-6 at web scale
GiB = 1 << 30

_WORDS = ("a the of in on with and near street view photo large small red blue green old new young man woman "
          "dog cat car house tree garden city river mountain beach sunset people playing walking table food "
          "kitchen window wooden modern vintage black white bright dark family children park field flowers "
          "building road night light sky clouds water boat bridge market shop sign wall door chair room").split()


# ---- the synthetic world -----------------------------------------------------------------------------


def recipe_for(world: Path) -> Recipe:
    plant = [{"name": s, "domain": "plant", "format": "url_list", "path": str(world / "lists" / f"{s}.parquet"),
              "columns": {"key": "key"}, "caption": "sample", "attribution": f"{s} contributors", "priority": 2}
             for s in PLANT_SOURCES]
    general = [{"name": s, "domain": "general", "format": "url_list", "path": str(world / "lists" / f"{s}.parquet"),
                "caption": "column", "license": "various (web crawl)", "priority": 0} for s in GENERAL_SOURCES]
    return Recipe.model_validate({"name": "bench", "sources": plant + general, "filters": FILTERS.model_dump(),
                                  "resources": {"threads": 2, "memory_limit": "3GB"}})


def _general_captions(rng: np.random.Generator, n: int) -> list:
    lengths = np.clip(rng.zipf(1.6, n) + 6, 3, 60)
    words = np.array(_WORDS, dtype=object)[rng.integers(0, len(_WORDS), int(lengths.sum()))]
    ends = np.cumsum(lengths)
    return [" ".join(words[e - k : e]) for e, k in zip(ends, lengths)]


def _plant_chunk(rng, n, start, source, species, zipf_cdf) -> pa.Table:
    sp = np.searchsorted(zipf_cdf, rng.random(n), side="right").clip(max=species - 1)
    key = np.arange(start, start + n)
    repeat = rng.random(n) < 0.01  # planted repeated rows: same key as an earlier row
    key[repeat] = np.maximum(0, key[repeat] - rng.integers(1, 1000, repeat.sum()))
    cols = {
        "key": pc.binary_join_element_wise(source, pa.array(key).cast(pa.string()), "-"),
        "url": pc.binary_join_element_wise(f"https://{source}.example.org/media/", pa.array(key).cast(pa.string()), ".jpg", ""),
        "taxon_kingdom": dict_strings(np.zeros(n, np.int32), ["Plantae"]),
        "taxon_phylum": dict_strings(np.zeros(n, np.int32), ["Tracheophyta"]),
    }
    for rank, div in (("class", 20_000), ("order", 3_000), ("family", 300), ("genus", 8)):
        cols[f"taxon_{rank}"] = dict_strings((sp // div).astype(np.int32), [f"{rank.title()}{i}" for i in range(species // div + 1)])
    cols["taxon_species"] = dict_strings(sp.astype(np.int32), [f"Genus{s // 8} species{s}" for s in range(species)])
    common = pa.array([f"common plant {s}" if s % 3 == 0 else None for s in range(species)])
    cols["common_name"] = pc.take(common, pa.array(sp))
    cols["license"] = dict_strings(rng.integers(0, 3, n).astype(np.int32), ["CC0-1.0", "CC-BY-4.0", "CC-BY-NC-4.0"])
    return _plant_faults(pa.table(cols), rng)


def _plant_faults(t: pa.Table, rng) -> pa.Table:
    n = t.num_rows
    fault = rng.random(n)
    url = pc.if_else(pa.array(fault < 0.003), pc.replace_substring(t["url"], "https://", "ftp://"), t["url"])
    url = pc.if_else(pa.array((fault >= 0.003) & (fault < 0.005)), pa.scalar(None, pa.string()), url)
    return t.set_column(t.schema.get_field_index("url"), "url", url)


def _general_chunk(rng, n, start, source) -> pa.Table:
    captions = _general_captions(rng, n)
    fault = rng.random(n)
    for i in np.flatnonzero(fault < 0.06):
        f = fault[i]
        captions[i] = ("" if f < 0.02 else f"IMG_{rng.integers(1000, 9999)}.JPG" if f < 0.03
                       else "фотография листа дуба на улице" if f < 0.04 else "街の風景の写真" if f < 0.045 else "sky")
    idx = np.arange(start, start + n)
    repeat = rng.random(n) < 0.01
    idx[repeat] = np.maximum(0, idx[repeat] - rng.integers(1, 1000, repeat.sum()))
    url = pc.binary_join_element_wise(f"https://{source}.example.com/img/", pa.array(idx).cast(pa.string()), ".jpg", "")
    t = pa.table({"url": url, "caption": pa.array(captions, pa.string()),
                  "license": dict_strings(rng.integers(0, 2, n).astype(np.int32), ["unknown", "CC-BY-SA-4.0"])})
    return _plant_faults(t, rng)


def make_lists(world: Path, rows: int, species: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    zipf_cdf = np.cumsum(1.0 / np.arange(1, species + 1) ** ZIPF_EXPONENT)
    zipf_cdf /= zipf_cdf[-1]
    (world / "lists").mkdir(parents=True, exist_ok=True)
    for source, share in {**PLANT_SOURCES, **GENERAL_SOURCES}.items():
        n_total = round(rows * share)
        path = world / "lists" / f"{source}.parquet"
        writer = None
        for start in range(0, n_total, CHUNK):
            n = min(CHUNK, n_total - start)
            t = (_plant_chunk(rng, n, start, source, species, zipf_cdf) if source in PLANT_SOURCES
                 else _general_chunk(rng, n, start, source))
            t = t.cast(pa.schema([pa.field(f.name, pa.string()) for f in t.schema]))
            writer = writer or pq.ParquetWriter(path, t.schema, compression="zstd")
            writer.write_table(t, row_group_size=256_000)
        writer.close()


def _hex_digest(g: np.ndarray) -> pa.Array:
    """A 64-hex-digit stand-in for sha256, a pure function of the image id g."""
    words = np.stack([splitmix64(g.astype(np.uint64) * np.uint64(4) + np.uint64(k)) for k in range(4)], axis=1)
    return hex_strings(words.view(np.uint8).reshape(len(g), 32))


def simulate_downloads(world: Path, candidates: Path, seed: int) -> None:
    """img2dataset's outputs (no image bytes) and the pHash parquet, per source and shard."""
    rng = np.random.default_rng(seed + 1)
    table = pq.read_table(candidates, columns=["uid", "source", "url", "caption", "drop_reason"])
    image_id = 0
    for source in (*PLANT_SOURCES, *GENERAL_SOURCES):
        rows = table.filter(pc.and_(pc.equal(table["source"], source), pc.is_null(table["drop_reason"])))
        out, hashes = world / "download" / source, world / "hashes" / source
        out.mkdir(parents=True, exist_ok=True)
        hashes.mkdir(parents=True, exist_ok=True)
        for shard, start in enumerate(range(0, rows.num_rows, SHARD_ROWS)):
            part = rows.slice(start, SHARD_ROWS)
            _write_shard(part, out, hashes, shard, image_id, rng)
            image_id += part.num_rows


def _write_shard(part: pa.Table, out: Path, hashes: Path, shard: int, image_id: int, rng) -> None:
    n = part.num_rows
    ok = rng.random(n) < 0.9
    g = image_id + np.arange(n)
    kind = rng.random(n)
    exact, near = kind < 0.03, (kind >= 0.03) & (kind < 0.05)
    twin = np.maximum(0, g - rng.integers(1, 50_000, n))  # an earlier image, maybe another source's
    g_img = np.where(exact, twin, g)
    phash = splitmix64(np.where(near, twin, g_img).astype(np.uint64) ^ np.uint64(0xABCDEF))
    flips = (np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)) | (np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64))
    phash = np.where(near, phash ^ flips, phash)
    ow = rng.integers(100, 4000, n)
    oh = (ow * rng.uniform(0.5, 1.6, n)).astype(np.int64)
    tiny, wide = kind > 0.98, (kind > 0.97) & (kind <= 0.98)
    ow[tiny], oh[tiny] = 40, 50
    oh[wide] = np.maximum(1, ow[wide] // 6)
    scale = np.minimum(1.0, 512 / np.maximum(ow, oh))
    keys = pa.array([f"{shard:05d}{i:04d}" for i in range(n)])
    status = pa.array(np.where(ok, "success", "failed_to_download"))
    null_s, null_i = pa.scalar(None, pa.string()), pa.scalar(None, pa.int64())
    okm = pa.array(ok)
    stem = f"{shard:05d}"
    pq.write_table(pa.table({
        "url": part["url"], "caption": part["caption"], "key": keys, "status": status,
        "error_message": pc.if_else(okm, null_s, pa.scalar("<urlopen error timed out>")),
        "width": pc.if_else(okm, pa.array((ow * scale).astype(np.int64)), null_i),
        "height": pc.if_else(okm, pa.array((oh * scale).astype(np.int64)), null_i),
        "original_width": pc.if_else(okm, pa.array(ow), null_i), "original_height": pc.if_else(okm, pa.array(oh), null_i),
        "sha256": pc.if_else(okm, _hex_digest(g_img), null_s), "uid": part["uid"],
    }), out / f"{stem}.parquet")
    stats = {"count": n, "successes": int(ok.sum()), "failed_to_download": int((~ok).sum()), "failed_to_resize": 0,
             "status_dict": {"success": int(ok.sum()), "<urlopen error timed out>": int((~ok).sum())}}
    (out / f"{stem}_stats.json").write_text(json.dumps(stats))
    pq.write_table(pa.table({"key": keys.filter(okm), "phash": pa.array(phash[ok], pa.uint64()),
                             "phash_error": pa.nulls(int(ok.sum()), pa.string())}), hashes / f"{stem}.parquet")


def ensure_world(workdir: Path, rows: int, species: int, seed: int) -> Path:
    world = workdir / f"world-{rows}-s{seed}-sp{species}"
    if (world / "READY").exists():
        return world
    t = time.perf_counter()
    print(f"building the synthetic world at {rows:,} rows in {world} ...", flush=True)
    make_lists(world, rows, species, seed)
    run_stage("ingest", world, world, rows, rss_limit=8 * GiB, quiet=True)  # candidates: the uids to download
    simulate_downloads(world, world / "candidates.parquet", seed)
    (world / "READY").write_text("ok")
    print(f"  world ready in {time.perf_counter() - t:.0f} s", flush=True)
    return world


# ---- stages (each runs in a child process) -------------------------------------------------------


def _input(run: Path, *names: str) -> Path:
    """The first of the named stage outputs that exists (a stage stopped for memory leaves none)."""
    for name in names:
        if (run / name).exists():
            return run / name
    raise SystemExit(f"no input among {names}")


def stage_main(stage: str, world: Path, run: Path, rows: int) -> dict:
    recipe = recipe_for(world)
    run.mkdir(parents=True, exist_ok=True)
    if stage == "ingest":
        from plantmix.stages.ingest import ingest_to_parquet

        reports = ingest_to_parquet(recipe, world, run / "extracted", None, run / "candidates.parquet", run / ".spill")
        return {"rows": sum(r.rows_read for r in reports), "out_rows": sum(r.candidates for r in reports)}
    if stage == "ingest-today":
        import baseline_c2d31ad as today

        table = today.ingest(recipe, world)
        return {"rows": int(pc.sum(table["input_rows"]).as_py()), "out_rows": table.num_rows}
    if stage == "join":  # as the build runs it: streamed to parquet, never a table in memory
        from plantmix.stages.join import join_to_parquet

        join_to_parquet(run / "candidates.parquet", world, run / "joined.parquet", recipe.resources)
        return {"rows": pq.read_metadata(run / "joined.parquet").num_rows}
    if stage == "join-standin":
        join_standin(world, run)
        return {"rows": pq.read_metadata(run / "joined.parquet").num_rows}
    if stage == "filter":
        from plantmix.core.stage import write_parquet
        from plantmix.curate.filters import filter_proposals

        columns = ["uid", "keep", "caption", "width", "height", "original_width", "original_height"]
        table = pq.read_table(run / "joined.parquet", columns=columns)
        t, c = time.perf_counter(), time.process_time()
        proposals = filter_proposals(table, FILTERS, threads=2)
        compute, compute_cpu = time.perf_counter() - t, time.process_time() - c
        write_parquet(proposals, run / "filters.parquet")
        return {"rows": table.num_rows, "compute": compute, "compute_cpu": compute_cpu}
    if stage == "dedup":
        from plantmix.core.stage import write_parquet
        from plantmix.curate.dedup import near_pair_proposals

        t = pq.read_table(run / "joined.parquet", columns=["keep", "phash"])
        t = t.filter(pc.and_(t["keep"], pc.is_valid(t["phash"])))
        write_parquet(near_pair_proposals(t["phash"].to_numpy(), None, DEDUP.phash_radius), run / "near_pairs.parquet")
        return {"rows": t.num_rows}
    if stage == "decide":
        from plantmix.curate.decide import decide_to_parquet

        priority = {s.name: s.priority for s in recipe.sources}
        filters, pairs = pq.read_table(run / "filters.parquet"), pq.read_table(run / "near_pairs.parquet")
        decide_to_parquet(run / "joined.parquet", filters, pairs, DEDUP, priority, None, run / "manifest.parquet")
        return {"rows": pq.read_metadata(run / "manifest.parquet").num_rows}
    if stage == "filter-today":
        import baseline_c2d31ad as today

        from plantmix.core.stage import write_parquet

        src = _input(run, "joined.parquet")
        table = pq.read_table(src)
        t, c = time.perf_counter(), time.process_time()
        table = today.apply_filters(table, FILTERS)
        compute, compute_cpu = time.perf_counter() - t, time.process_time() - c
        write_parquet(table, run / "manifest-today.parquet")
        return {"rows": table.num_rows, "input": src.name, "compute": compute, "compute_cpu": compute_cpu}
    if stage in ("mix-select", "mix-manifest", "mix-manifest-today"):
        return _mix_stage(stage, run, rows)
    raise SystemExit(f"unknown stage {stage}")


def join_standin(world: Path, run: Path) -> None:
    """When today's join does not fit: the same left joins (candidates ⟕ downloads ⟕ pHashes), streamed
    by DuckDB to parquet out of core, so the stages after it still run at full size. A benchmark
    stand-in, not plantmix's join stage."""
    from plantmix.core.duck import connect, sql_quote
    from plantmix.core.recipe import ResourcesConfig
    from plantmix.core.schema import CANDIDATE_SCHEMA

    con = connect(ResourcesConfig(threads=2, memory_limit="4GB"), run / ".spill")
    cols = ", ".join(f"c.{f.name}" for f in CANDIDATE_SCHEMA if f.name != "drop_reason")
    ok = "d.status = 'success' AND h.phash IS NOT NULL"
    con.execute(f"""COPY (
        SELECT {cols},
          CASE WHEN c.drop_reason IS NOT NULL THEN 'not_attempted' ELSE coalesce(d.status, 'missing_from_download') END AS status,
          d.error_message, d.sha256, h.phash, d.width::BIGINT AS width, d.height::BIGINT AS height,
          d.original_width::BIGINT AS original_width, d.original_height::BIGINT AS original_height,
          CASE WHEN d.status = 'success' THEN d.shard END AS shard, CASE WHEN d.status = 'success' THEN d.key END AS key,
          NULL::FLOAT AS clip_score, NULL::FLOAT AS plant_score, NULL::VARCHAR AS dup_of,
          (c.drop_reason IS NULL AND {ok}) AS keep,
          CASE WHEN c.drop_reason IS NOT NULL THEN c.drop_reason WHEN {ok} THEN NULL ELSE 'download_failed' END AS drop_reason
        FROM read_parquet({sql_quote(str(run / "candidates.parquet"))}, file_row_number = true) c
        LEFT JOIN (SELECT *, regexp_extract(filename, 'download/([^/]+)/', 1) AS dl_source,
                          regexp_extract(filename, '(download/[^/]+/[^/]+)\\.parquet$', 1) || '.tar' AS shard
                   FROM read_parquet({sql_quote(str(world / "download" / "*" / "*.parquet"))}, filename = true)) d
          ON d.uid = c.uid AND d.dl_source = c.source
        LEFT JOIN (SELECT key, phash, regexp_extract(filename, 'hashes/([^/]+)/', 1) AS hs_source
                   FROM read_parquet({sql_quote(str(world / "hashes" / "*" / "*.parquet"))}, filename = true)) h
          ON h.hs_source = c.source AND h.key = d.key AND d.status = 'success'
        ORDER BY c.file_row_number
    ) TO {sql_quote(str(run / "joined.parquet"))} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 256000)""")


def mix_spec(rows: int) -> MixSpec:
    plant = round(rows * 10 / 13)
    return MixSpec(plant=plant, general=rows - plant, per_taxon_cap=1000, allow_repeat=True, seed=0, shard_size=10_000)


def _mix_stage(stage: str, run: Path, rows: int) -> dict:
    from plantmix.mix.select import Selection, read_selection_columns, select

    manifest, spec = run / "manifest.parquet", mix_spec(rows)
    if stage == "mix-select":
        sel = select(read_selection_columns(manifest, spec), spec)
        np.savez(run / "selection.npz", row=sel.row, repeat=sel.repeat, repeated=sel.repeated, position=sel.position)
        return {"rows": len(sel)}
    saved = np.load(run / "selection.npz")
    sel = Selection(saved["row"], saved["repeat"], saved["repeated"], saved["position"], {})
    if stage == "mix-manifest":
        from plantmix.mix.manifest import write_mix_manifest

        write_mix_manifest(manifest, sel, run / "mix" / "manifest.parquet", spec.shard_size, recipe_for(run).resources)
    else:
        import baseline_c2d31ad as today

        today.write_mix_manifest(manifest, sel, run / "mix-today" / "manifest.parquet", spec.shard_size)
    return {"rows": len(sel)}


# ---- measuring ---------------------------------------------------------------------------------------


def run_stage(stage: str, world: Path, run: Path, rows: int, rss_limit: int, quiet: bool = False) -> dict:
    """Run one stage in a child process; wall, CPU and peak RSS (sampled, with the child's own maxrss)."""
    cmd = [sys.executable, __file__, "--stage", stage, "--world", str(world), "--run", str(run), "--rows", str(rows)]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    proc, peak, stopped = psutil.Process(child.pid), 0, False
    while child.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        if rss > rss_limit:
            child.kill()
            stopped = True
        time.sleep(0.1)
    out = child.stdout.read().strip().splitlines()
    wall = time.perf_counter() - t
    if stopped or child.returncode != 0 or not out:
        result = {"stage": stage, "ok": False, "wall": wall, "peak_rss": peak,
                  "why": f"stopped above {rss_limit / GiB:.1f} GiB RSS" if stopped else f"exit {child.returncode}"}
    else:
        result = {"stage": stage, "ok": True, **json.loads(out[-1])}
        # the stage's own time (interpreter start and imports excluded); RSS: sampled or the child's maxrss
        result["wall"], result["peak_rss"] = result.pop("child_wall"), max(peak, result.pop("maxrss"))
    result["load"] = os.getloadavg()[0]  # other work on the machine stretches wall, not CPU, times
    if not quiet:
        print(_row(result, rows), flush=True)
    return result


def _row(r: dict, n: int) -> str:
    if not r["ok"]:
        return f"  {r['stage']:<19} {n:>11,}  did not complete: {r['why']} after {r['wall']:.0f} s (peak RSS {r['peak_rss'] / GiB:.2f} GiB)"
    rate = r["rows"] / r["wall"] if r["wall"] else float("inf")
    extra = f"  (input: {r['input']})" if r.get("input") not in (None, "joined.parquet") else ""
    if r.get("compute"):
        extra += f"  [the rules alone: {r['compute']:.1f} s, {r['rows'] / r['compute']:,.0f} rows/s]"
    return (f"  {r['stage']:<19} {r['rows']:>11,}  wall {r['wall']:7.1f} s  CPU {r['cpu']:7.1f} s  "
            f"peak RSS {r['peak_rss'] / GiB:5.2f} GiB ({r['peak_rss'] / max(r['rows'], 1):6.0f} B/row)  {rate:11,.0f} rows/s  "
            f"load {r['load']:4.1f}{extra}")


STAGES = ("ingest", "join", "filter", "dedup", "decide", "mix-select", "mix-manifest")


def pipeline(world: Path, run: Path, rows: int, rss_limit: int, stages: tuple[str, ...] = STAGES) -> dict[str, dict]:
    print(f"stages at {rows:,} rows (today's code: -today):", flush=True)
    results = {}
    for s in stages:
        results[s] = run_stage(s, world, run, rows, rss_limit)
        if s == "join" and not results[s]["ok"]:  # the later stages still get a full-size input
            results["join-standin"] = run_stage("join-standin", world, run, rows, rss_limit)
    return results


def noop_rerun_check(workdir: Path, files: int) -> None:
    """Acceptance e: `plantmix build --until ingest` over a recipe with one image-folder source of
    `files` images, run twice; the second run is the no-op rerun whose whole skip decision (lock,
    stage fingerprints over the folder listing, markers) is timed."""
    from plantmix.build import run_build
    from plantmix.core.stage import done_marker
    from rich.console import Console

    folder = workdir / f"folder-{files}"
    if not (folder / "READY").exists():
        for i in range(files):
            d = folder / f"Genus{i // 500}_species{i // 100}"
            if i % 100 == 0:
                d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:07d}.jpg").write_bytes(b"\xff\xd8" + i.to_bytes(4, "big"))
        (folder / "READY").write_text("ok")
    recipe = Recipe.model_validate({"name": "noop", "sources": [
        {"name": "folder", "domain": "plant", "format": "image_folder", "path": str(folder), "caption": "scientific"}]})
    build = workdir / f"folder-{files}-build"
    console = Console(stderr=True, quiet=True)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        run_build(recipe, build, until="ingest", console=console)
        times.append(time.perf_counter() - t)
    marker = done_marker(build / "candidates.parquet")
    skipped = marker.stat().st_mtime < time.time() - times[1]  # the rerun left the ingest marker as it was
    print(f"no-op rerun over a {files:,}-file image folder (`build --until ingest`): first run {times[0]:.1f} s, "
          f"rerun {times[1]:.2f} s, ingest {'skipped' if skipped else 'RAN AGAIN'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="input rows of the synthetic world (default 1,000,000)")
    ap.add_argument("--baseline-rows", type=int, default=2_000_000, help="rows at which today's code runs (default 2,000,000, or --rows if smaller)")
    ap.add_argument("--species", type=int, default=120_000, help="plant species, Zipf-distributed (default 120,000)")
    ap.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-build"), help="cache of worlds and stage outputs (default ./bench-build)")
    ap.add_argument("--rss-limit-gib", type=float, default=9.0, help="stop a stage above this RSS (default 9)")
    ap.add_argument("--folder-files", type=int, default=100_000, help="files of the no-op rerun check's image folder (default 100,000; 0 skips it)")
    ap.add_argument("--no-today", action="store_true", help="skip today's code (no baseline, no ratios)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"stages to run, in order (default {','.join(STAGES)}); "
                    "a later stage reuses the cached outputs of earlier ones")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        wall, cpu = time.perf_counter(), time.process_time()
        result = stage_main(args.stage, args.world, args.run, args.rows)
        result.update(cpu=time.process_time() - cpu, maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      child_wall=time.perf_counter() - wall)
        print(json.dumps(result))
        return
    limit = int(args.rss_limit_gib * GiB)
    base_rows = min(args.rows, args.baseline_rows)
    world = ensure_world(args.workdir, args.rows, args.species, args.seed)
    stages = tuple(args.stages.split(","))
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    results = pipeline(world, args.workdir / f"run-{args.rows}", args.rows, limit, stages)
    if not args.no_today:
        base_world = ensure_world(args.workdir, base_rows, args.species, args.seed)
        base_run = args.workdir / f"run-{base_rows}"
        same = base_rows == args.rows
        base = results if same else pipeline(base_world, base_run, base_rows, limit, stages)
        today = {s: run_stage(f"{s}-today", base_world, base_run, base_rows, limit)
                 for s in ("ingest", "filter", "mix-manifest") if s in stages}
        print(f"ratio of rows/s, these stages at {args.rows:,} rows against today's at {base_rows:,}:")
        for s, old in today.items():
            new = results[s]
            if new["ok"] and old["ok"]:
                ratio = (new["rows"] / new["wall"]) / (old["rows"] / old["wall"])
                print(f"  {s:<13} {ratio:6.1f}x  (peak RSS per row {new['peak_rss'] / new['rows']:.0f} B vs {old['peak_rss'] / old['rows']:.0f} B)")
            if not same and base[s]["ok"] and old["ok"]:
                ratio = (base[s]["rows"] / base[s]["wall"]) / (old["rows"] / old["wall"])
                print(f"  {s:<13} {ratio:6.1f}x  at {base_rows:,} rows on both sides")
            if new["ok"] and old["ok"]:  # per CPU second: what a busy shared machine does not distort
                ratio = (new["rows"] / new["cpu"]) / (old["rows"] / old["cpu"])
                print(f"  {s:<13} {ratio:6.1f}x  per CPU second: {new['rows'] / new['cpu']:,.0f} vs {old['rows'] / old['cpu']:,.0f} rows")
            if "compute" in new and new["ok"] and old["ok"]:
                ratio = (new["rows"] / new["compute"]) / (old["rows"] / old["compute"])
                print(f"  {s:<13} {ratio:6.1f}x  the rules alone: {new['rows'] / new['compute']:,.0f} vs "
                      f"{old['rows'] / old['compute']:,.0f} rows/s (stage I/O excluded)")
                ratio = (new["rows"] / new["compute_cpu"]) / (old["rows"] / old["compute_cpu"])
                print(f"  {s:<13} {ratio:6.1f}x  the rules alone per CPU second: {new['rows'] / new['compute_cpu']:,.0f} vs "
                      f"{old['rows'] / old['compute_cpu']:,.0f} rows")
    done = [r for r in results.values() if r["ok"]]
    print(f"non-network stages at {args.rows:,} rows: {sum(r['wall'] for r in results.values()):.0f} s wall in all, "
          f"peak RSS {max(r['peak_rss'] for r in results.values()) / GiB:.2f} GiB; "
          f"{len(done)}/{len(results)} completed")
    if args.folder_files:
        noop_rerun_check(args.workdir, args.folder_files)


if __name__ == "__main__":
    main()
