"""`plantmix dedup-report BUILD`: how near-duplicate merging behaves on a build, without rebuilding it.

- a radius sweep: the decision step rerun in memory at each radius (same filters, same keep rule),
  with the rows it would merge (exact and near) and keep;
- the distribution of each image's distance to its nearest other image (mirror included), where a
  good radius sits in the valley between copies (small distances) and distinct images;
- a contact sheet of the largest duplicate groups of the build as decided, kept image first, each
  thumbnail labelled with its distance to the kept one and its reason.
Everything goes to BUILD/reports/dedup/ (CSV + PNGs).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plantmix.core.errors import PlantmixError
from plantmix.core.recipe import DedupConfig
from plantmix.core.schema import DROP_DUPLICATE_EXACT, DROP_DUPLICATE_NEAR
from plantmix.core.stage import read_parquet
from plantmix.curate.decide import decide
from plantmix.curate.dedup import MAX_RADIUS, near_pair_proposals
from plantmix.report import save_figure

THUMB = 96


def _inputs(build_dir: Path) -> tuple[pa.Table, pa.Table]:
    joined, filters = build_dir / "stages" / "joined.parquet", build_dir / "proposals" / "filters.parquet"
    for p in (joined, filters):
        if not p.is_file():
            raise PlantmixError(f"{p}: not found; run `plantmix build` (at least --until filter) first")
    return read_parquet(joined), read_parquet(filters)


def radius_sweep(joined: pa.Table, filters: pa.Table, radii: list[int], cfg: DedupConfig, priority: dict[str, int]) -> pa.Table:
    """Per radius: rows kept, merged as exact and as near duplicates (decisions not written)."""
    if not radii or any(not 0 <= r <= MAX_RADIUS for r in radii):
        raise PlantmixError(f"--radius: give radii within 0..{MAX_RADIUS}, e.g. 4,6,8; got {radii}")
    usable = joined.filter(pc.and_(joined["keep"], pc.is_valid(joined["phash"])))
    mirror = usable["phash_mirror"].to_numpy() if cfg.mirror else None
    pairs = near_pair_proposals(usable["phash"].to_numpy(), mirror, max(radii))
    out = {"radius": [], "kept": [], "duplicate_exact": [], "duplicate_near": [], "near_pairs": []}
    for r in sorted(radii):
        m = decide(joined, filters, pairs, cfg.model_copy(update={"phash_radius": r}), priority)
        reasons = m["drop_reason"]
        out["radius"].append(r)
        out["kept"].append(pc.sum(m["keep"]).as_py() or 0)
        out["duplicate_exact"].append(pc.sum(pc.equal(reasons, DROP_DUPLICATE_EXACT)).as_py() or 0)
        out["duplicate_near"].append(pc.sum(pc.equal(reasons, DROP_DUPLICATE_NEAR)).as_py() or 0)
        out["near_pairs"].append(pc.sum(pc.less_equal(pairs["distance"], r)).as_py() or 0)
    return pa.table(out)


def nearest_distances(joined: pa.Table, mirror: bool, up_to: int) -> np.ndarray:
    """Each usable image's pHash distance to its nearest other image; up_to + 1 when none is within up_to."""
    usable = joined.filter(pc.and_(joined["keep"], pc.is_valid(joined["phash"])))
    phash = usable["phash"].to_numpy()
    values, inverse, counts = np.unique(phash, return_inverse=True, return_counts=True)
    pairs = near_pair_proposals(phash, usable["phash_mirror"].to_numpy() if mirror else None, up_to)
    best = np.full(len(values), up_to + 1, np.int64)
    best[counts > 1] = 0  # another image with the very same pHash
    a = np.searchsorted(values, pairs["phash_a"].to_numpy())
    b = np.searchsorted(values, pairs["phash_b"].to_numpy())
    d = pairs["distance"].to_numpy().astype(np.int64)
    np.minimum.at(best, a, d)
    np.minimum.at(best, b, d)
    return best[inverse]


def write_dedup_report(build_dir: Path, radii: list[int], cfg: DedupConfig, priority: dict[str, int], groups: int = 8) -> Path:
    """Write BUILD/reports/dedup/{radius_sweep.csv, radius_sweep.png, nearest_distance.png, groups.png}."""
    import pyarrow.csv as pacsv

    build_dir = Path(build_dir)
    joined, filters = _inputs(build_dir)
    out = build_dir / "reports" / "dedup"
    out.mkdir(parents=True, exist_ok=True)
    sweep = radius_sweep(joined, filters, radii, cfg, priority)
    pacsv.write_csv(sweep, out / "radius_sweep.csv")
    _plot_sweep(sweep, out / "radius_sweep.png", cfg.phash_radius)
    _plot_nearest(nearest_distances(joined, cfg.mirror, max(16, max(radii))), out / "nearest_distance.png", cfg.phash_radius)
    manifest = build_dir / "manifest.parquet"
    if manifest.is_file():
        contact_sheet(build_dir, read_parquet(manifest), out / "groups.png", groups)
    return out


def _plot_sweep(sweep: pa.Table, path: Path, current: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = sweep.to_pydict()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s["radius"], s["duplicate_near"], "o-", label="near duplicates merged")
    ax.plot(s["radius"], s["duplicate_exact"], "s--", label="exact duplicates merged")
    ax.axvline(current, color="gray", ls=":", label=f"recipe radius {current}")
    ax.set(title="Rows merged per pHash radius", xlabel="radius (bits)", ylabel="rows")
    ax.legend()
    save_figure(fig, path)


def _plot_nearest(distances: np.ndarray, path: Path, current: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = int(distances.max()) if len(distances) else 1
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(distances, bins=np.arange(top + 2) - 0.5, log=True)
    ax.axvline(current + 0.5, color="red", ls=":", label=f"radius {current}")
    ax.set(title=f"Distance to the nearest other image (last bar: > {top - 1})", xlabel="pHash bits", ylabel="images")
    ax.legend()
    save_figure(fig, path)


def contact_sheet(build_dir: Path, manifest: pa.Table, path: Path, groups: int) -> Path:
    """The `groups` largest duplicate groups, one row each: the kept image, then its copies by distance."""
    from PIL import Image, ImageDraw

    rows = manifest.select(["uid", "keep", "dup_of", "dup_distance", "drop_reason", "shard", "key"]).to_pylist()
    members: dict[str, list[dict]] = {}
    by_uid = {r["uid"]: r for r in rows}
    for r in rows:
        if r["dup_of"]:
            members.setdefault(r["dup_of"], []).append(r)
    largest = sorted(members, key=lambda u: (-len(members[u]), u))[:groups]
    width = 1 + max((len(members[u]) for u in largest), default=0)
    sheet = Image.new("RGB", (max(1, width) * (THUMB + 4), max(1, len(largest)) * (THUMB + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for y, head in enumerate(largest):
        group = [by_uid[head]] + sorted(members[head], key=lambda r: (r["dup_distance"] or 0, r["uid"]))
        for x, (r, image) in enumerate(zip(group, _thumbnails(build_dir, group))):
            at = (x * (THUMB + 4), y * (THUMB + 30))
            sheet.paste(image, at)
            label = "kept" if r["keep"] else f"d={r['dup_distance']} {(r['drop_reason'] or '')[:14]}"
            draw.text((at[0], at[1] + THUMB + 2), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _thumbnails(build_dir: Path, rows: list[dict]):
    from PIL import Image

    from plantmix.mix.shards import read_images, scan_tar

    located = []
    for r in rows:
        hit = scan_tar(build_dir / r["shard"]).get(r["key"]) if r["shard"] else None
        located.append(hit)
    ok = [i for i, h in enumerate(located) if h]
    data = read_images(build_dir, [rows[i]["shard"] for i in ok], np.array([located[i][0] for i in ok]), np.array([located[i][1] for i in ok]))
    images = {i: d for i, d in zip(ok, data)}
    for i in range(len(rows)):
        try:
            im = Image.open(io.BytesIO(images[i])).convert("RGB")
            im.thumbnail((THUMB, THUMB))
        except (KeyError, OSError):
            im = Image.new("RGB", (THUMB, THUMB), "lightgray")
        tile = Image.new("RGB", (THUMB, THUMB), "white")
        tile.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
        yield tile
